"""Portable paths: ``repo:REL`` names a path inside the repository checkout that holds this package, so a shipped
preset (the toy world's) and what depends on its paths (an index's model fingerprint) are the same in every clone,
whatever the working directory."""

from __future__ import annotations

from pathlib import Path
from typing import overload

CHECKOUT_PREFIX = "repo:"  # "repo:checkpoints/toy/lm"
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent  # the folder above fromage_gill/


def portable_source(source: str | None) -> str | None:
    """The inverse of ``checkout_path``: a path inside the repository checkout -> ``repo:REL``; anything else
    unchanged."""
    if source is None or source.startswith(CHECKOUT_PREFIX) or not Path(source).is_absolute():
        return source  # hub ids, "random", relative paths
    try:
        return CHECKOUT_PREFIX + Path(source).resolve().relative_to(CHECKOUT_ROOT).as_posix()
    except (ValueError, OSError):
        return source


@overload
def checkout_path(source: str, *, must_exist: bool = True) -> str: ...
@overload
def checkout_path(source: None, *, must_exist: bool = True) -> None: ...
def checkout_path(source: str | None, *, must_exist: bool = True) -> str | None:
    """``repo:REL`` -> the absolute path of REL in the repository checkout; anything else unchanged."""
    if source is None or not source.startswith(CHECKOUT_PREFIX):
        return source
    path = CHECKOUT_ROOT / source[len(CHECKOUT_PREFIX) :]
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"{source!r} means {path}, which does not exist. It is built inside the repository checkout; for the "
            f"toy presets run `fromage-gill toy build` from the repository root (see its README section)"
        )
    return str(path)
