"""``fromage-gill precompute``: run the frozen vision encoder (and GILL's diffusion text encoder) once per example."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "precompute",
        help="compute frozen image features (and diffusion caption targets) for training",
        description="Writes safetensors shards that `fromage-gill train --precomputed DIR` reads "
        "instead of re-encoding every image at every step. Resumable: run the same "
        "command again to finish an interrupted run.",
    )
    p.add_argument("--model", required=True, help="preset, config JSON or model directory (its frozen parts are used)")
    p.add_argument("--data", required=True, help="same as for `train`")
    p.add_argument("--image-root", help="folder the image paths in a .tsv/.csv are relative to")
    p.add_argument(
        "--allow-images-outside-root",
        action="store_true",
        help="let image paths resolve outside the image root (as for `fromage-gill train`)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard file (default 1024)")
    p.add_argument("--no-text", action="store_true", help="GILL: skip the diffusion text-encoder outputs")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline import load_pipeline
    from ..training.data import read_records
    from ..training.precompute import precompute

    records = read_records(args.data, args.image_root, allow_outside_root=args.allow_images_outside_root)
    text = False if args.no_text else None
    pipe = load_pipeline(
        args.model, device=args.device, dtype=args.dtype, weights="random", load_diffusion_pipeline=not args.no_text
    )
    res = precompute(
        pipe,
        records,
        args.out,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        text=text,
        progress=not args.no_progress,
    )
    print(
        f"precomputed {res.n_written} of {res.n_records} examples into {res.out} "
        f"({res.n_skipped} unreadable, {res.shards_computed} shard(s) computed now, "
        f"{records.skipped.total} skipped while reading the data)"
    )
    return 0
