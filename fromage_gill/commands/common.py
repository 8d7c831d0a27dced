"""Arguments shared by the sub-commands that load a model."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    p.add_argument("--model", required=default is None, default=default,
                   help="preset name (see `fromage-gill presets`), model directory, or Hub repo id")
    p.add_argument("--weights", help="trained layers to use instead of the model's own (directory, repo or 'random')")
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-8bit", action="store_true", help="load the LM in 8-bit (bitsandbytes)")
    q.add_argument("--load-4bit", action="store_true", help="load the LM in 4-bit NF4 (bitsandbytes)")
    p.add_argument("--device-map", help="e.g. 'auto' to spread the LM over several GPUs / CPU with accelerate")
    p.add_argument("--lm", help="local directory (or Hub id) to use for the language model")
    p.add_argument("--vision", help="local directory (or Hub id) to use for the vision encoder")
    p.add_argument("--diffusion", help="local directory (or Hub id) to use for Stable Diffusion")
    p.add_argument("--no-decision-model", dest="decision_model", action="store_false",
                   help="run GILL without its decision head (e.g. no decision_model.pth.tar): every image follows "
                        "the mode setting")


def load_from_args(args: argparse.Namespace, **extra):
    from ..pipeline import load_pipeline

    quant = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
    return load_pipeline(args.model, device=args.device, dtype=args.dtype, quantization=quant,
                         device_map=args.device_map, weights=args.weights, lm=args.lm, vision=args.vision,
                         diffusion=args.diffusion, decision_model=args.decision_model, **extra)
