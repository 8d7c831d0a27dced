"""``fromage-gill caption IMAGE... --model magic-mscoco``: zero-shot captions with MAGIC (a plain LM + CLIP)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with MAGIC decoding (a plain LM guided by CLIP, no training)",
        description="Caption each image with an unmodified language model whose decoding is steered "
        "by CLIP (MAGIC, Su et al. 2022). Prints one 'IMAGE<TAB>caption' line per image.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
    p.add_argument(
        "--model",
        default="magic-mscoco",
        help="a MAGIC preset (magic-mscoco, magic-flickr30k, magic-story, tiny-magic) or config JSON",
    )
    p.add_argument(
        "--decoding",
        choices=["magic", "contrastive", "greedy"],
        default="magic",
        help="magic: CLIP-guided (default); contrastive: beta=0, ignores the image; greedy: argmax",
    )
    p.add_argument("--k", type=int, help="candidates per step (default: the preset's)")
    p.add_argument("--alpha", type=float, help="degeneration penalty weight in [0, 1] (default: the preset's)")
    p.add_argument("--beta", type=float, help="image guidance weight >= 0 (default: the preset's)")
    p.add_argument("--max-new-tokens", type=int, help="default: the preset's")
    p.add_argument(
        "--max-length",
        type=int,
        help="prompt + continuation tokens at most, as the reference's decoding_len (default: the preset's: "
        "16 magic-mscoco, 20 magic-flickr30k, 100 magic-story)",
    )
    p.add_argument("--prompt", default="", help="text the caption continues (magic-story: the story's title)")
    p.add_argument("--lm", help="local directory (or Hub id) to use for the language model, e.g. a train-lm output")
    p.add_argument("--clip", help="local directory (or Hub id) of a full transformers CLIP model")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="default fp32 on every device: the paper's figures are fp32 runs; bf16/fp16 change some outputs",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import MagicConfig, load_config
    from ..images import load_image
    from ..magic import load_magic, resolve_decoding

    settings = {"k": args.k, "alpha": args.alpha, "beta": args.beta, "max_new_tokens": args.max_new_tokens}
    # Every input is checked before the models load: settings, then images.
    cfg = load_config(args.model)
    if not isinstance(cfg, MagicConfig):
        raise ValueError(
            f"--model {args.model!r} is a {cfg.kind!r} model; caption needs a MAGIC preset "
            f"(magic-mscoco, magic-flickr30k, magic-story, tiny-magic) or a kind 'magic' config"
        )
    resolve_decoding(args.decoding, cfg.decoding, **settings)
    if args.max_length is not None and args.max_length < 1:
        raise ValueError(f"--max-length {args.max_length}: must be an integer >= 1 (prompt + continuation tokens)")
    images = [load_image(path) for path in args.images]
    magic = load_magic(cfg, device=args.device, dtype=args.dtype, lm=args.lm, clip=args.clip)
    for path, image in zip(args.images, images, strict=True):
        result = magic.generate([image], args.prompt, decoding=args.decoding, max_length=args.max_length, **settings)
        print(f"{path}\t{result.text}", flush=True)
    return 0
