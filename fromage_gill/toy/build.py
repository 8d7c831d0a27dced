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

import contextlib
import csv
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import asdict
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import method, pretrain
from . import world as W

logger = logging.getLogger(__name__)

REPORT = "build_report.json"
DATA_STAGE = "data"
STAGES = (*pretrain.STAGES, DATA_STAGE, *method.KINDS)


# What each stage reads from an earlier one, and the order a parallel build starts ready stages in: the longest
# remaining chain first (clip -> unet -> gill takes most of the build; vae has no input and unet needs it)
DEPENDS: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "vae": (),
    "data": (),
    "clip": ("tokenizer",),
    "lm": ("tokenizer",),
    "unet": ("tokenizer", "clip", "vae"),
    "fromage": ("tokenizer", "clip", "lm", "data"),
    "gill": ("tokenizer", "clip", "lm", "unet", "data"),
}
PRIORITY = ("tokenizer", "vae", "clip", "unet", "lm", "data", "gill", "fromage")


def build(
    out: str | Path,
    *,
    stages: list[str] | None = None,
    recipe: pretrain.Recipe | None = None,
    data_dir: str | Path | None = None,
    n_data: int = 5000,
    threads: int | None = None,
    jobs: int = 1,
) -> dict:
    """Run ``stages`` (default: all) into ``out`` and return the merged build report. Stages that depend on an
    earlier one (clip/lm on tokenizer, unet on clip and vae) read it from ``out``, so they can be re-run alone.

    ``jobs`` > 1 runs independent stages at the same time, each in its own process with ``threads`` torch threads
    (default: the CPU count shared out); every stage seeds itself, so one thread per stage gives the weights a
    one-job build with ``threads=1`` gives. Each stage's progress bars then go to ``out/logs/<stage>.log``."""
    recipe = recipe or pretrain.Recipe()
    out = Path(out)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    wanted = list(stages) if stages else list(STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown --stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    data_dir = Path(data_dir) if data_dir else out.parent / "toy-data"
    _check_inputs(out, wanted, data_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once the request is known to be good: a bad one leaves nothing
    t0 = time.time()
    if jobs == 1:
        if threads is not None:
            torch.set_num_threads(threads)
        report: dict = {}
        for name in [s for s in STAGES if s in wanted]:  # dependency order, whatever order they were asked in
            logger.info("toy build: stage %s", name)
            report = _record(out, recipe, name, run_stage(name, out, recipe, data_dir, n_data))
    else:
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        report = _run_parallel(wanted, jobs, threads, out, recipe, data_dir, n_data)
    logger.info("toy build: %s in %.0f s (%d job(s))", ", ".join(wanted), time.time() - t0, jobs)
    return report


def run_stage(name: str, out: Path, recipe: pretrain.Recipe, data_dir: Path, n_data: int) -> dict:
    """One stage, in this process; returns its report entry (wall time, threads, the quality it reached)."""
    t0 = time.time()
    if name in pretrain.STAGES:
        entry = pretrain.STAGES[name](out, recipe).metrics
    elif name == DATA_STAGE:
        entry = export_training_data(
            data_dir,
            n=n_data,
            seed=recipe.seed,
            answer_share=recipe.answer_caption_share,
            prompt_share=recipe.prompt_caption_share,
            decision_earlier_share=recipe.decision_earlier_share,
        )
    else:
        entry = method.train_method(name, out, data_dir, recipe)
    return {"seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(), **entry}


def _stage_process(
    name: str, out: Path, recipe: pretrain.Recipe, data_dir: Path, n_data: int, threads: int, log: Path, result: Path
) -> None:
    """A parallel build's worker: one stage, its bars and logs to ``log``, its report entry to ``result``."""
    torch.set_num_threads(threads)
    with open(log, "w") as f, contextlib.redirect_stderr(f):
        logging.basicConfig(stream=f, level=logging.INFO, force=True)
        try:
            result.write_text(json.dumps(run_stage(name, out, recipe, data_dir, n_data)))
        except BaseException:
            traceback.print_exc()  # into the log, whose end the parent shows
            raise


def _run_parallel(
    wanted: list[str], jobs: int, threads: int, out: Path, recipe: pretrain.Recipe, data_dir: Path, n_data: int
) -> dict:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited from a fork
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    done = {s for s in STAGES if s not in wanted}  # not asked for: _check_inputs found their outputs on disk
    pending = [s for s in PRIORITY if s in wanted]
    running: dict[str, BaseProcess] = {}
    report: dict = {}
    with tqdm(total=len(pending), desc="toy build", unit="stage", dynamic_ncols=True) as bar:
        try:
            while pending or running:
                for name in [s for s in pending if all(d in done for d in DEPENDS[s])][: jobs - len(running)]:
                    pending.remove(name)
                    (logs / f"{name}.json").unlink(missing_ok=True)
                    proc = ctx.Process(
                        target=_stage_process,
                        name=f"toy-{name}",
                        args=(
                            name,
                            out,
                            recipe,
                            data_dir,
                            n_data,
                            threads,
                            logs / f"{name}.log",
                            logs / f"{name}.json",
                        ),
                    )
                    proc.start()
                    running[name] = proc
                    logger.info("toy build: stage %s started (log: %s)", name, logs / f"{name}.log")
                bar.set_postfix_str("running " + ", ".join(running))
                ready = multiprocessing.connection.wait([p.sentinel for p in running.values()])
                for name, proc in list(running.items()):
                    if proc.sentinel not in ready:
                        continue
                    proc.join()  # its sentinel is ready: it has exited, join only reaps it
                    del running[name]
                    result = logs / f"{name}.json"
                    if proc.exitcode != 0 or not result.is_file():
                        raise RuntimeError(
                            f"toy build: stage {name} failed (exit code {proc.exitcode}); the end of "
                            f"{logs / f'{name}.log'}:\n{_tail(logs / f'{name}.log')}"
                        )
                    report = _record(out, recipe, name, json.loads(result.read_text()))
                    result.unlink()
                    done.add(name)
                    bar.update()
        finally:
            for proc in running.values():  # a failed stage stops the build: the others' outputs would be stale
                proc.terminate()
                proc.join()
    return report


def _tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _record(out: Path, recipe: pretrain.Recipe, stage: str, entry: dict) -> dict:
    """Merge one stage's entry into the report file right after the stage (re-read first: a crash or a stage
    re-run alone keeps the other stages' figures). Stages are listed in build order."""
    path = out / REPORT
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["recipe"] = asdict(recipe)
    stages = {**report.get("stages", {}), stage: entry}
    report["stages"] = {s: stages[s] for s in STAGES if s in stages}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    return report


def _check_inputs(out: Path, wanted: list[str], data_dir: Path) -> None:
    present = {
        "tokenizer": (out / "clip" / "tokenizer.json").is_file(),
        "clip": (out / "clip" / "model.safetensors").is_file(),
        "lm": (out / "lm" / "model.safetensors").is_file(),
        "vae": (out / "diffusion" / "vae").is_dir(),
        "unet": (out / "diffusion" / "unet").is_dir(),
        "data": (data_dir / "train" / "captions.tsv").is_file(),
    }
    for stage in wanted:
        missing = [d for d in DEPENDS[stage] if d not in wanted and not present[d]]
        if missing:
            raise FileNotFoundError(
                f"stage {stage!r} needs the output of {', '.join(missing)} in {out}; run those stages first "
                f"(--stage {' --stage '.join(missing)}) or build everything without --stage"
            )


def export_training_data(
    directory: Path,
    *,
    n: int,
    seed: int,
    answer_share: float = 0.0,
    prompt_share: float = 0.0,
    decision_earlier_share: float = 0.0,
) -> dict:
    """The training set for the method stage: ``train/captions.tsv`` (CC3M-style ``caption<TAB>image``),
    ``val/captions.tsv`` from held-out scenes, and GILL's labelled decision prompts (``decision_train.tsv``)."""
    train = W.export_captions(
        directory / "train",
        W.scenes(n, split="train", seed=seed + 70),
        seed=seed,
        answer_share=answer_share,
        prompt_share=prompt_share,
        progress=lambda it: tqdm(it, total=n, desc="export train images"),
    )
    val = W.export_captions(directory / "val", W.scenes(max(100, n // 10), split="test", seed=seed + 71), seed=seed + 1)
    with open(directory / "decision_train.tsv", "w", newline="") as f:  # prompts hold newlines: csv quotes them
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["prompt", "label"])
        writer.writerows(W.decision_prompts(2000, split="train", seed=seed, earlier_share=decision_earlier_share))
    return {"train_tsv": str(train), "val_tsv": str(val), "train_images": n}
