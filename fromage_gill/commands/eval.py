"""``fromage-gill eval TASK --model ... --data ...``: reproduce a paper table (docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .common import add_model_args, load_from_args

if TYPE_CHECKING:
    from ..pipeline import Pipeline

DEFAULT_JUDGE = "openai/clip-vit-large-patch14"  # GILL's image-image similarity model


def register(sub) -> None:
    from ..evaluate import TASKS

    p = sub.add_parser(
        "eval",
        help="reproduce a paper table: retrieval, answer ranking, image generation or captioning",
        description="Run one of the papers' evaluations on its public annotations and a local image folder; "
        "writes OUT/metrics.json and OUT/results.jsonl (a rerun resumes) and prints the run beside the paper. "
        "Under `accelerate launch` or `torchrun` every process takes its share of the examples and rank 0 "
        "writes the merged metrics. "
        "Tasks: " + "; ".join(f"{name}: {t.help}" for name, t in TASKS.items()),
    )
    p.add_argument("task", choices=list(TASKS), metavar="TASK", help=", ".join(TASKS))
    add_model_args(p)
    p.add_argument(
        "--data", required=True, type=Path, help="annotation file (VIST sis JSON, VisDial JSON, Karpathy JSON)"
    )
    p.add_argument("--images", type=Path, help="folder holding the dataset's images")
    p.add_argument("--out", type=Path, help="results folder (default: eval/TASK-MODEL)")
    p.add_argument("--limit", type=int, help="only the first N examples (quick runs; candidates shrink with them)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts (or answer options) per forward (default 16)")
    p.add_argument("--dense", type=Path, help="visdial-rank: the dense annotations JSON, for NDCG")
    p.add_argument(
        "--scoring",
        choices=["published", "next-token"],
        default="published",
        help="visdial-rank: 'published' (default: the authors' script, '\\nA: ' then each option with its own "
        "special tokens, loss without shift) or 'next-token' ('\\nA:' then ' option', next-token likelihood)",
    )
    p.add_argument("--split", default="test", help="captioning: the Karpathy split (default test)")
    p.add_argument("--seed", type=int, default=42, help="generation: the diffusion seed (default 42, as published)")
    p.add_argument("--steps", type=int, default=50, help="generation: denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="generation: guidance scale (default 7.5)")
    p.add_argument(
        "--judge-clip",
        default=DEFAULT_JUDGE,
        help=f"generation: the CLIP whose image embeddings compare images (default {DEFAULT_JUDGE}; a Hub id, "
        f"a directory or a MAGIC preset)",
    )
    p.add_argument("--lpips-net", choices=["alex", "vgg", "squeeze"], default="alex", help="generation: LPIPS backbone")
    p.add_argument(
        "--metrics",
        help="captioning: a comma-separated subset of B@1,B@2,B@3,B@4,METEOR,ROUGE-L,CIDEr,SPICE (default: all)",
    )
    p.add_argument("--clip", help="captioning: local directory (or Hub id) of MAGIC's CLIP instead of the preset's")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="log lines instead of a progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import TASKS, EvalOptions, evaluate
    from ..evaluate.readers import DataError
    from ..evaluate.shards import eval_processes

    task = TASKS[args.task]
    if not args.data.is_file():
        raise DataError(f"--data {args.data}: no such file")
    if args.images is not None and not args.images.is_dir():
        raise DataError(f"--images {args.images}: no such folder")
    if args.dense is not None and not args.dense.is_file():
        raise DataError(f"--dense {args.dense}: no such file")
    out = args.out or Path("eval") / f"{args.task}-{Path(str(args.model)).name}"
    opts = EvalOptions(
        data=args.data,
        images=args.images,
        out=out,
        limit=args.limit,
        batch_size=args.batch_size,
        dense=args.dense,
        split=args.split,
        seed=args.seed,
        guidance_scale=args.guidance,
        num_inference_steps=args.steps,
        scoring=args.scoring,
        progress=args.progress,
        caption_metrics=tuple(m.strip() for m in args.metrics.split(",")) if args.metrics else None,
    )
    data = task.read(opts)  # a malformed file is refused here, before minutes of model loading
    with eval_processes(cpu=str(args.device or "").startswith("cpu")) as processes:
        if processes.device is not None and args.device is None:
            args.device = str(processes.device)  # each process on the device its launcher gave it
        kwargs = {}
        if task.needs == "magic":
            model = _load_magic(args)
        else:
            model = load_from_args(args, load_diffusion_pipeline=task.needs == "gill")
            if task.needs == "gill":
                kwargs = _generation_metrics(args, model)
        report = evaluate(task, model, opts, model_name=str(args.model), processes=processes, data=data, **kwargs)
    if report is not None:  # rank 0: the merged run
        print(report.table())
        print(f"wrote {out / 'metrics.json'} and the per-example results in {out}")
    return 0


def _load_magic(args):
    from ..config import MagicConfig, load_config
    from ..magic import load_magic

    cfg = load_config(args.model)
    if not isinstance(cfg, MagicConfig):
        raise ValueError(
            f"captioning runs MAGIC: --model must be a MAGIC config (a preset such as magic-mscoco, magic-flickr30k or "
            f'tiny-magic, or a directory whose config.json has "kind": "magic"), got {args.model!r}, a '
            f"{getattr(cfg, 'kind', type(cfg).__name__)} model"
        )
    return load_magic(cfg, device=args.device, dtype=args.dtype, lm=args.lm, clip=args.clip)


def _generation_metrics(args, pipeline: Pipeline) -> dict:
    from ..config import ClipSpec, MagicConfig, list_presets, load_config
    from ..hub import HubUnavailableError
    from ..magic import load_clip

    spec = ClipSpec(source=args.judge_clip)
    if args.judge_clip in list_presets():
        cfg = load_config(args.judge_clip)
        if isinstance(cfg, MagicConfig):
            spec = cfg.clip
    try:
        judge = load_clip(spec, device=pipeline.device, dtype=pipeline.dtype)
    except HubUnavailableError as e:
        return {"judge": None, "judge_error": f"--judge-clip {args.judge_clip}: {e}", "lpips_backbone": args.lpips_net}
    return {"judge": judge, "lpips_backbone": args.lpips_net}
