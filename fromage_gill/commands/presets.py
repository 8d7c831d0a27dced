"""``fromage-gill presets``: list the shipped model presets."""

from __future__ import annotations

import textwrap


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the shipped model presets")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import list_presets, load_config

    for name in list_presets():
        cfg = load_config(name)
        print(f"{name:16s} {cfg.kind:8s} {'offline' if cfg.is_random else cfg.lm.source}")
        print(textwrap.indent(textwrap.fill(cfg.description, 96), " " * 18))
    return 0
