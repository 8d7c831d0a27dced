"""``fromage-gill``: thin sub-commands that parse arguments and call library functions.

Each sub-command lives in ``fromage_gill/commands/<name>.py`` with a ``register(subparsers)`` that adds its parser
and sets ``func``; add new ones to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = [
    "presets",
    "convert",
    "toy",
    "index",
    "train",
    "precompute",
    "caption",
    "train_lm",
    "serve",
    "api",
    "generate",
    "eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fromage-gill", description="Ground a frozen language model to images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fromage_gill.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # user errors: one clear line, no traceback (use -v for one)
        if args.verbose:
            raise
        print(f"fromage-gill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
