"""``fromage-gill toy build``: pretrain the toy world's frozen backbones (and export its training data)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("toy", help="the toy world: a CPU-sized world in which the whole method really learns")
    toy = p.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    b = toy.add_parser("build", help="pretrain the toy backbones (CLIP, LM, VAE, UNet) and export the training data")
    b.add_argument("--out", default="checkpoints/toy", help="output directory (default: checkpoints/toy)")
    b.add_argument("--stage", action="append", dest="stages", metavar="STAGE",
                   help="run only this stage (repeatable): tokenizer, clip, lm, vae, unet, data. Default: all")
    b.add_argument("--data-dir", help="where the 'data' stage writes the training set (default: OUT/../toy-data)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the machinery, not quality")
    b.set_defaults(func=run_build)


def run_build(args) -> int:
    from ..toy.build import build
    from ..toy.pretrain import Recipe

    recipe = Recipe.smoke() if args.smoke else Recipe()
    report = build(args.out, stages=args.stages, recipe=recipe, data_dir=args.data_dir, threads=args.threads)
    print(json.dumps(report["stages"], indent=2))
    return 0
