"""Reproducing the papers' tables: ``fromage-gill eval TASK`` (docs/evaluation.md).

One file per task, reading the public annotation formats (``readers.py``) with local image folders, batching
through the research API (``fromage_gill.probe``), resuming from a per-example JSONL and writing a metrics JSON
(``report.py``) beside the papers' figures (``papers.py``). Metrics: ranking (``metrics.py``), images
(``image_metrics.py``: CLIP similarity, LPIPS, FID via torchmetrics), captions (``caption_metrics.py``:
pycocoevalcap).

    vist_retrieval.py   VIST contextual image retrieval, the 3 settings (FROMAGe Table 1)
    visdial_t2i.py      VisDial text-to-image retrieval (FROMAGe Table 2)
    visdial_rank.py     VisDial answer ranking by summed log-likelihood: R@k, MRR, NDCG
    generation.py       VIST / VisDial contextual image generation vs Stable Diffusion alone (GILL)
    captioning.py       MAGIC zero-shot captioning, COCO / Flickr30k Karpathy test (MAGIC Table 1)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import captioning, generation, visdial_rank, visdial_t2i, vist_retrieval
from .common import EvalOptions
from .readers import DataError
from .report import EvalReport

if TYPE_CHECKING:
    from ..magic.model import MagicModel
    from ..pipeline import Pipeline


@dataclass(frozen=True)
class Task:
    run: Callable[..., EvalReport]
    needs: str  # "pipeline" (a FROMAGe/GILL Pipeline), "gill" (one that generates) or "magic" (a MagicModel)
    help: str


TASKS: dict[str, Task] = {
    "vist-retrieval": Task(vist_retrieval.run, "pipeline", "VIST contextual image retrieval, R@1/5/10 (3 settings)"),
    "visdial-t2i": Task(visdial_t2i.run, "pipeline", "VisDial text-to-image retrieval, R@1/5/10"),
    "visdial-rank": Task(visdial_rank.run, "pipeline", "VisDial answer ranking: R@1/5/10, MRR, NDCG"),
    "vist-generation": Task(generation.run_vist, "gill", "VIST image generation: CLIP sim, LPIPS, FID vs SD"),
    "visdial-generation": Task(generation.run_visdial, "gill", "VisDial image generation: CLIP sim, LPIPS, FID vs SD"),
    "captioning": Task(captioning.run, "magic", "MAGIC captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE"),
}


def evaluate(task: str, model: Pipeline | MagicModel, opts: EvalOptions, *, model_name: str, **kwargs) -> EvalReport:
    """Run ``task`` on ``model`` (a Pipeline, or a MagicModel for captioning) and write ``opts.out/metrics.json``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    report = TASKS[task].run(model, opts, model_name=model_name, **kwargs)
    report.save(opts.out)
    return report


__all__ = ["TASKS", "DataError", "EvalOptions", "EvalReport", "Task", "evaluate"]
