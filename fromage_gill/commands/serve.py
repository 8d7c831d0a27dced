"""``fromage-gill serve``: the chat app, exactly as ``python app.py`` (same flags).

The app itself is ``app.py`` at the repository root (a Hugging Face Space runs that file); this command finds it
next to the package, so it works from a source checkout or an editable install. Its flags are defined once, in
``fromage_gill/chat/options.py``, which ``app.py`` reads too (app.py never imports ``fromage_gill.commands``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..chat.options import add_serve_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the chat app in the browser (same as `python app.py`)",
        description="Serve the chat app (same as `python app.py`).",
    )
    add_serve_args(p)
    p.set_defaults(func=run)


def find_app() -> Path:
    path = Path(__file__).resolve().parents[2] / "app.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `fromage-gill serve` runs the repository's app.py; use a source "
            f"checkout (pip install -e .) or run `python app.py` there"
        )
    return path


def run(args: argparse.Namespace) -> int:
    path = find_app()
    spec = importlib.util.spec_from_file_location("fromage_gill_app", path)
    assert spec is not None and spec.loader is not None, f"{path} is a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as if imported: whatever looks the module up by name (type hints) finds it
    spec.loader.exec_module(module)
    return module.serve(args)
