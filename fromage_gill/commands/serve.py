"""``fromage-gill serve``: the chat app, exactly as ``python app.py`` (same flags).

The app itself is ``app.py`` at the repository root (a Hugging Face Space runs that file); this command finds it
next to the package, so it works from a source checkout or an editable install.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from .common import add_model_args

DEFAULT_MODEL = "gill"  # the published GILL model; offline, use --model toy-gill


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The app's flags (shared by ``python app.py`` and ``fromage-gill serve``)."""
    add_model_args(p, default=os.environ.get("FROMAGE_GILL_MODEL", DEFAULT_MODEL))
    p.add_argument("--index", action="append", metavar="[NAME=]DIR",
                   help="image index directory to retrieve from; repeat to offer a choice in the app (default: the "
                        "shipped index of a tiny preset, if any)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 to accept other machines; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                   help="port to listen on (default 7860)")
    p.add_argument("--share", action="store_true", help="also serve on a temporary public gradio.live link")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the model; more are refused with 'queue is full' (default 16)")
    p.add_argument("--concurrency", type=int, default=1, help="turns using the model at the same time (default 1)")
    p.add_argument("--clip", metavar="SOURCE",
                   help="full CLIP (vision and text) for the 'magic' decoding: a Hub id or directory of a "
                        "transformers CLIPModel, or a MAGIC preset such as tiny-magic (default: none; 'magic' then "
                        "says in the chat how to add one)")


def register(sub) -> None:
    p = sub.add_parser("serve", help="the chat app in the browser (same as `python app.py`)",
                       description="Serve the chat app (same as `python app.py`).")
    add_serve_args(p)
    p.set_defaults(func=run)


def find_app() -> Path:
    path = Path(__file__).resolve().parents[2] / "app.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `fromage-gill serve` runs the repository's app.py; use a source "
                                f"checkout (pip install -e .) or run `python app.py` there")
    return path


def run(args: argparse.Namespace) -> int:
    path = find_app()
    spec = importlib.util.spec_from_file_location("fromage_gill_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module.serve(args)
