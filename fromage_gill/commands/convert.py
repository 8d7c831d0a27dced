"""``fromage-gill convert``: published FROMAGe/GILL checkpoint -> this project's format (safetensors + config)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a published FROMAGe/GILL checkpoint to this project's format",
        description="SRC is a directory (or Hub repo) holding pretrained_ckpt.pth.tar and "
        "model_args.json (and, for GILL, decision_model.pth.tar). Only the backbones' "
        "configs and tokenizer are read, never their weights.",
    )
    p.add_argument("src", help="directory or Hub repo with the published files")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--preset", help="base preset (default: guessed from model_args.json)")
    p.add_argument("--lm", help="local directory to record for the language model")
    p.add_argument("--vision", help="local directory to record for the vision encoder")
    p.add_argument("--diffusion", help="local directory to record for Stable Diffusion")
    p.add_argument(
        "--no-decision-model",
        dest="decision_model",
        action="store_false",
        help="convert a GILL checkpoint without decision_model.pth.tar (the result has no decision head)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build the backbones' architectures from the shipped configs (offline, no weights, no tokenizer "
        "download): enough to check and convert the trained layers; config.json still names the real backbones",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from ..checkpoint import save_native
    from ..config import ConfigError, MagicConfig
    from ..pipeline import load_pipeline, resolve_config

    pipe = load_pipeline(
        args.src,
        preset=args.preset,
        lm=args.lm,
        vision=args.vision,
        diffusion=args.diffusion,
        decision_model=args.decision_model,
        device="cpu",
        dtype="fp32",
        skeleton=True,
        random_weights=args.random_weights,
    )
    config = pipe.config
    if args.random_weights:  # the layers were checked against random stand-ins; they belong to the real backbones
        real = resolve_config(args.src, preset=args.preset)
        if isinstance(real, MagicConfig):  # load_pipeline took it, so its preset has trained layers: not MAGIC
            raise ConfigError(f"{args.src} is a MAGIC model: it has no trained layers to convert")
        config = dataclasses.replace(config, lm=real.lm, vision=real.vision, diffusion=real.diffusion)
    out = save_native(pipe.model, args.out, config)
    n = sum(p.numel() for p in pipe.model.trained_parameters().values())
    print(f"converted {args.src} -> {out} ({n:,} trained parameters, preset {pipe.config.name})")
    return 0
