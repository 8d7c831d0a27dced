"""The one place that reaches the Hugging Face Hub. Everything goes through huggingface_hub (its cache, its
progress bars, HF_HUB_OFFLINE); a failure becomes one error that says what could not be fetched and how to
pass a local path instead."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class HubUnavailableError(OSError):
    """A component could not be found locally nor fetched from the Hub."""


def _advice(what: str, repo: str, filename: str | None = None) -> str:
    offline = "HF_HUB_OFFLINE=1 is set" if os.environ.get("HF_HUB_OFFLINE") == "1" else "no network or no access?"
    shown = f"{repo}/{filename}" if filename else repo
    return (
        f"could not load {what} {shown!r}: it is not a local path and could not be fetched from the Hugging Face "
        f"Hub ({offline}). Download it where the Hub is reachable (`hf download {repo}"
        f"{' ' + filename if filename else ''} --local-dir DIR`) and pass DIR instead (e.g. --weights/--lm/--vision/"
        f"--diffusion DIR, or load_pipeline(..., weights=DIR)), or run the offline demo: "
        f"`fromage-gill serve --model toy-gill`."
    )


def from_hub_or_path(what: str, source: str, load: Callable[[str], T]) -> T:
    """Call ``load(source)`` (a ``from_pretrained``), turning a failed Hub fetch into a clear error."""
    try:
        return load(source)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise  # a real local directory that fails to load: the library's own error is the useful one
        raise HubUnavailableError(_advice(what, source) + f"\nUnderlying error: {e}") from e


def fetch_file(repo_id_or_dir: str, filename: str, *, what: str, revision: str | None = None) -> Path:
    """A file from a local directory, or downloaded (and cached) from a Hub model repo."""
    local = Path(repo_id_or_dir)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {path} does not exist; the directory must hold {filename!r}")
        return path
    if local.suffix and local.exists():
        raise FileNotFoundError(f"{what}: expected a directory or a Hub repo id, got the file {local}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id_or_dir, filename, revision=revision))
    except Exception as e:  # huggingface_hub raises a family of errors for offline / missing / gated
        raise HubUnavailableError(_advice(what, repo_id_or_dir, filename) + f"\nUnderlying error: {e}") from e
