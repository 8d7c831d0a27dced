"""Reproducing the papers' tables: ``fromage-gill eval TASK`` (docs/evaluation.md).

Each task is an ``EvalTask`` (``task.py``) in a file of its own, reading the public annotation formats
(``readers.py``) with local image folders and batching through the research API (``fromage_gill.probe``);
``task.run_task`` runs any of them on one process or many (``shards.py``), resuming from per-example JSONL shards
and writing a metrics JSON (``report.py``) beside the papers' figures (``papers.py``). Metrics: ranking
(``metrics.py``), images (``image_metrics.py``: CLIP similarity, LPIPS, FID via torchmetrics), captions
(``caption_metrics.py``: pycocoevalcap).

    vist_retrieval.py   VIST contextual image retrieval, the 3 settings (FROMAGe Table 1)
    visdial_t2i.py      VisDial text-to-image retrieval (FROMAGe Table 2)
    visdial_rank.py     VisDial answer ranking by the published loss (or next-token likelihood): R@k, MRR, NDCG
    generation.py       VIST / VisDial contextual image generation vs Stable Diffusion alone (GILL)
    captioning.py       MAGIC zero-shot captioning, COCO / Flickr30k Karpathy test (MAGIC Table 1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .captioning import Captioning
from .common import EvalOptions
from .generation import VisdialGeneration, VistGeneration
from .readers import DataError
from .report import EvalReport
from .shards import Processes
from .task import AnyTask, EvalTask, Plan, run_task
from .visdial_rank import VisdialRank
from .visdial_t2i import VisdialT2I
from .vist_retrieval import VistRetrieval

if TYPE_CHECKING:  # types only: the caller loads the model
    from ..magic.model import MagicModel
    from ..pipeline import Pipeline

TASKS: dict[str, AnyTask] = {}


def register(task: AnyTask) -> AnyTask:
    """Add ``task`` to ``TASKS`` (the CLI's list) under ``task.name``; a name already taken is refused."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"an evaluation task named {task.name!r} is already registered: choose another name")
    TASKS[task.name] = task
    return task


for _task in (VistRetrieval(), VisdialT2I(), VisdialRank(), VistGeneration(), VisdialGeneration(), Captioning()):
    register(_task)


def evaluate(
    task: str | AnyTask,
    model: Pipeline | MagicModel,
    opts: EvalOptions,
    *,
    model_name: str,
    processes: Processes | None = None,
    data: object = None,
    **extra,
) -> EvalReport | None:
    """Run ``task`` (a registered name, or an ``EvalTask``) on ``model`` (a Pipeline, or a MagicModel for
    captioning) and write ``opts.out/metrics.json``. ``data``: what ``task.read(opts)`` returned, when the caller
    read the files before loading the model (the CLI does). On many processes (``shards.eval_processes``) every process
    calls this; rank 0 returns the merged report, the others None."""
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        task = TASKS[task]
    return run_task(task, model, opts, model_name=model_name, data=data, processes=processes or Processes(), **extra)


__all__ = [
    "TASKS",
    "DataError",
    "EvalOptions",
    "EvalReport",
    "EvalTask",
    "Plan",
    "Processes",
    "evaluate",
    "register",
    "run_task",
]
