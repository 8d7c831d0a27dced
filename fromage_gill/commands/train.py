"""``fromage-gill train``: train the layers that ground a frozen LM to images (FROMAGe / GILL recipe).

One CPU: ``fromage-gill train --model tiny-fromage --data captions.tsv --out run/``.
Many GPUs / nodes: ``accelerate launch [--num_processes N] -m fromage_gill.cli train ...``.
"""

from __future__ import annotations

import argparse

from ..retrieve.sources import unescape_text


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the grounding layers (input mapping, retrieval, GILL mapper) on image-caption data",
        description="Trains only the layers between the frozen LM and vision encoder. Defaults follow "
        "the published recipe: AdamW (0.9, 0.95), grad clip 1.0; lr 3e-4 (FROMAGe) or "
        "1e-3 with 2000 warm-up steps (GILL). Run under `accelerate launch` for several "
        "processes.",
    )
    _data_arguments(p)
    _optimizer_arguments(p)
    _checkpoint_arguments(p)
    _caption_arguments(p)
    _run_arguments(p)
    p.set_defaults(func=run)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    """What to train and on what: the model, the data and its images, the run directory."""
    p.add_argument("--model", required=True, help="preset, config JSON, or model directory to start from")
    p.add_argument(
        "--data",
        help="caption<TAB>image .tsv/.csv, folder of images + .txt captions, or .tar shard(s) "
        "(webdataset / img2dataset)",
    )
    p.add_argument(
        "--decision-data",
        help="GILL: train only the decision head, on a prompt<TAB>label file (labels "
        "generate / retrieve), starting from --model's trained layers",
    )
    p.add_argument("--image-root", help="folder the image paths in a .tsv/.csv are relative to (default: its folder)")
    p.add_argument(
        "--allow-images-outside-root",
        action="store_true",
        help="let image paths in --data resolve outside the image root (../, absolute paths, symlinks pointing "
        "out); by default they are refused, so a data file cannot make training read any file on this machine",
    )
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final trained layers)")


def _optimizer_arguments(p: argparse.ArgumentParser) -> None:
    """Steps, batches and AdamW's schedule (defaults: the published recipe)."""
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per process and micro-step (default 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4 FROMAGe, 1e-3 GILL)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: 0 FROMAGe, 2000 GILL)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--lr-decay-steps", type=int, help="multiply the lr by 0.1 every N steps after warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default 1.0)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="mixed precision of the forward pass (trained weights stay fp32); default fp32",
    )


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """Validation, checkpoints and logs."""
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share for validation (default 0.05)")
    p.add_argument("--val-every", type=int, default=500, help="validate every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars every N steps")


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    """How captions become training text."""
    p.add_argument("--max-caption-tokens", type=int, default=32, help="captions are cut to this many tokens")
    p.add_argument(
        "--concat-prob",
        type=float,
        default=0.5,
        help="share of steps whose captioning batch concatenates two examples (default 0.5)",
    )
    p.add_argument(
        "--caption-end",
        default="",
        type=unescape_text,
        help="text the captioning loss supervises after every caption, e.g. '\\n' (escapes \\n \\t "
        "understood): the chat's end of turn, so a shown image's description ends in words rather "
        "than with an image token (default: nothing, as in the papers)",
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """Resuming, starting over, precomputed features and the process's own settings."""
    p.add_argument("--resume", help="run or checkpoint directory to continue from (same --model)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="let --resume read a checkpoint whose state files need a full unpickle (those of older versions); "
        "unpickling can run code, so pass it only for checkpoints you wrote yourself",
    )
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="start the trained layers from seeded random values instead of --model's weights",
    )
    p.add_argument(
        "--precomputed",
        help="directory written by `fromage-gill precompute` for this --data and model "
        "(default: run the frozen encoders on the fly)",
    )
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.decision_data:
        return run_decision(args)
    if not args.data:
        raise ValueError("--data is required (or --decision-data to train GILL's decision head)")
    from ..training.loop import TrainConfig, train

    tc = TrainConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        image_root=args.image_root,
        allow_images_outside_root=args.allow_images_outside_root,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        lr_decay_steps=args.lr_decay_steps,
        grad_clip=args.grad_clip,
        precision=args.precision,
        val_fraction=args.val_fraction,
        val_every=args.val_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        max_caption_tokens=args.max_caption_tokens,
        concat_prob=args.concat_prob,
        caption_end=args.caption_end,
        resume=args.resume,
        trust_pickle=args.trust_pickle,
        from_scratch=args.from_scratch,
        precomputed=args.precomputed,
        workers=args.workers,
        seed=args.seed,
        cpu=args.cpu,
        progress=not args.no_progress,
    )
    result = train(tc)
    if not result.is_main_process:
        return 0
    last = result.validation[-1] if result.validation else {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
    print(
        f"trained {result.step} steps -> {result.out} ({result.skipped} example(s) skipped)"
        + (f"; validation: {summary}" if summary else "")
    )
    return 0


def run_decision(args) -> int:
    from ..checkpoint import save_native
    from ..pipeline import load_pipeline
    from ..training.decision import read_decision_data, train_decision_head

    prompts, labels = read_decision_data(args.decision_data)
    pipe = load_pipeline(args.model, device="cpu" if args.cpu else None, dtype="fp32", load_diffusion_pipeline=False)
    if pipe.model.decision is None:
        raise ValueError(f"--model {args.model} has no decision head (a GILL config with decision_head: true)")
    res = train_decision_head(
        pipe.model,
        pipe.tokenizer,
        prompts,
        labels,
        steps=args.max_steps,
        lr=args.lr if args.lr is not None else 1e-3,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    save_native(pipe.model, args.out, pipe.config)
    print(
        f"decision head trained on {res.n_examples} prompts: loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}, "
        f"accuracy {res.accuracy:.3f} -> {args.out}"
    )
    return 0
