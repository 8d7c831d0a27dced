"""``build``: every stage of the toy world's recipe, in order, into one directory (default ``checkpoints/toy``).

Layout of ``out``::

    lm/            OPT-style causal LM + its BPE tokenizer (transformers)
    clip/          CLIPModel (vision + text towers) + its tokenizer (transformers)
    diffusion/     StableDiffusionPipeline: vae/, unet/, text_encoder/ (the CLIP's text tower), tokenizer/
    build_report.json   per stage: wall time and the quality reached on held-out world data
    *.png          sample grids written by the evaluations (VAE reconstructions, diffusion samples)

Stages: tokenizer, clip, lm, vae, unet (``pretrain.STAGES``), then ``data`` (the CC3M-style training set for
``fromage-gill train``), then the method: ``fromage`` and ``gill`` train the toy-fromage / toy-gill layers on the
frozen backbones and build their gallery indexes (``method.py``; written next to ``out``).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import method, pretrain
from . import world as W

logger = logging.getLogger(__name__)

REPORT = "build_report.json"
DATA_STAGE = "data"
STAGES = (*pretrain.STAGES, DATA_STAGE, *method.KINDS)


def build(out: str | Path, *, stages: list[str] | None = None, recipe: pretrain.Recipe | None = None,
          data_dir: str | Path | None = None, n_data: int = 5000, threads: int | None = None) -> dict:
    """Run ``stages`` (default: all) into ``out`` and return the merged build report. Stages that depend on an
    earlier one (clip/lm on tokenizer, unet on clip and vae) read it from ``out``, so they can be re-run alone."""
    recipe = recipe or pretrain.Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    wanted = list(stages) if stages else list(STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown --stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    data_dir = Path(data_dir) if data_dir else out.parent / "toy-data"
    _check_inputs(out, wanted, data_dir)
    report: dict = {}
    for name, fn in pretrain.iter_stages([s for s in wanted if s in pretrain.STAGES]):
        logger.info("toy build: stage %s", name)
        stage = fn(out, recipe)
        report = _record(out, recipe, name, {"seconds": round(stage.seconds, 1), "threads": torch.get_num_threads(),
                                             **stage.metrics})
    if DATA_STAGE in wanted:
        t0 = time.time()
        info = export_training_data(data_dir, n=n_data, seed=recipe.seed, answer_share=recipe.answer_caption_share)
        report = _record(out, recipe, DATA_STAGE, {"seconds": round(time.time() - t0, 1), **info})
    for kind in method.KINDS:
        if kind in wanted:
            logger.info("toy build: stage %s (toy-%s)", kind, kind)
            report = _record(out, recipe, kind, method.train_method(kind, out, data_dir, recipe))
    return report


def _record(out: Path, recipe: pretrain.Recipe, stage: str, entry: dict) -> dict:
    """Merge one stage's entry into the report file right after the stage (re-read first: a crash or a stage
    re-run alone keeps the other stages' figures)."""
    path = out / REPORT
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["recipe"] = asdict(recipe)
    report.setdefault("stages", {})[stage] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return report


def _check_inputs(out: Path, wanted: list[str], data_dir: Path) -> None:
    backbones = ["tokenizer", "clip", "lm"]
    needs = {"clip": ["tokenizer"], "lm": ["tokenizer"], "unet": ["tokenizer", "clip", "vae"],
             "fromage": [*backbones, "data"], "gill": [*backbones, "unet", "data"]}
    present = {"tokenizer": (out / "clip" / "tokenizer.json").is_file(),
               "clip": (out / "clip" / "model.safetensors").is_file(),
               "lm": (out / "lm" / "model.safetensors").is_file(),
               "vae": (out / "diffusion" / "vae").is_dir(),
               "unet": (out / "diffusion" / "unet").is_dir(),
               "data": (data_dir / "train" / "captions.tsv").is_file()}
    for stage in wanted:
        missing = [d for d in needs.get(stage, []) if d not in wanted and not present[d]]
        if missing:
            raise FileNotFoundError(
                f"stage {stage!r} needs the output of {', '.join(missing)} in {out}; run those stages first "
                f"(--stage {' --stage '.join(missing)}) or build everything without --stage"
            )


def export_training_data(directory: Path, *, n: int, seed: int, answer_share: float = 0.0) -> dict:
    """The training set for the method stage: ``train/captions.tsv`` (CC3M-style ``caption<TAB>image``),
    ``val/captions.tsv`` from held-out scenes, and GILL's labelled decision prompts (``decision_train.tsv``)."""
    train = W.export_captions(directory / "train", W.scenes(n, split="train", seed=seed + 70), seed=seed,
                              answer_share=answer_share,
                              progress=lambda it: tqdm(it, total=n, desc="export train images"))
    val = W.export_captions(directory / "val", W.scenes(max(100, n // 10), split="test", seed=seed + 71), seed=seed + 1)
    with open(directory / "decision_train.tsv", "w", newline="") as f:  # prompts hold newlines: csv quotes them
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["prompt", "label"])
        writer.writerows(W.decision_prompts(2000, split="train", seed=seed))
    return {"train_tsv": str(train), "val_tsv": str(val), "train_images": n}
