"""The method stage of the toy build: train ``toy-fromage`` and ``toy-gill`` on the frozen toy backbones with the
project's own training code, exactly as ``fromage-gill train`` trains on CC3M, then GILL's decision head, then
the gallery index the app retrieves from.

With the backbones in ``OUT`` (``checkpoints/toy`` by default) it writes, next to ``OUT``::

    toy-fromage/, toy-gill/             config.json + model.safetensors: the presets' trained layers
    indexes/toy-fromage/, toy-gill/     the held-out gallery embedded by each model (the app's default index)
    indexes/toy-gallery/                the gallery's images and captions
    toy-data/runs/toy-*/                the training runs (checkpoints, logs; not shipped)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from ..config import MapperSpec, ModelConfig, load_preset
from ..paths import checkout_path
from . import world as W
from .pretrain import Recipe

logger = logging.getLogger(__name__)

KINDS = ("fromage", "gill")
DEFAULT_OUT = "repo:checkpoints/toy"  # where the shipped presets expect the backbones


def method_config(kind: str, out: Path) -> ModelConfig:
    """The ``toy-<kind>`` preset; for backbones elsewhere than the shipped ones (a smoke build, another recipe),
    the same preset pointed at ``out`` with the mapper sized to its diffusion text encoder."""
    cfg = load_preset(f"toy-{kind}")  # not load_config: a ./toy-gill folder would shadow the preset
    assert isinstance(cfg, ModelConfig), f"toy-{kind} is a FROMAGe/GILL preset"
    if out.resolve() == Path(checkout_path(DEFAULT_OUT, must_exist=False)).resolve():
        return cfg
    text = json.loads((out / "clip" / "config.json").read_text())["text_config"]
    lm = dataclasses.replace(cfg.lm, source=str(out / "lm"))
    vision = dataclasses.replace(cfg.vision, source=str(out / "clip"))
    diffusion = cfg.diffusion and dataclasses.replace(cfg.diffusion, source=str(out / "diffusion"))
    mapper = cfg.mapper and MapperSpec(
        **{
            **dataclasses.asdict(cfg.mapper),
            "out_dim": text["hidden_size"],
            "num_queries": text["max_position_embeddings"],
        }
    )
    return dataclasses.replace(cfg, lm=lm, vision=vision, diffusion=diffusion, mapper=mapper, weights=None)


def train_method(kind: str, out: Path, data_dir: Path, recipe: Recipe) -> dict:
    """Train ``toy-<kind>`` on the backbones in ``out`` and write its trained layers and gallery index."""
    from ..checkpoint import save_native
    from ..pipeline import load_pipeline
    from ..training.decision import read_decision_data, train_decision_head
    from ..training.loop import TrainConfig, train

    if kind not in KINDS:
        raise ValueError(f"unknown toy model {kind!r}; choose from {', '.join(KINDS)}")
    data = data_dir / "train" / "captions.tsv"
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: run the 'data' stage first (fromage-gill toy build --stage data)")
    cfg = method_config(kind, out)
    runs = data_dir / "runs"
    run = runs / cfg.name
    if run.exists():
        shutil.rmtree(run)  # a rebuild trains from scratch, as the first build did
    runs.mkdir(parents=True, exist_ok=True)
    model_json = runs / f"{cfg.name}.json"  # what `fromage-gill train --model` reads
    model_json.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    result = train(
        TrainConfig(
            model=str(model_json),
            from_scratch=True,
            data=str(data),
            out=str(run),
            max_steps=recipe.method_steps,
            batch_size=recipe.method_batch,
            lr=recipe.method_lr,
            warmup=recipe.method_warmup,
            val_every=max(1, recipe.method_steps // 3),
            save_every=recipe.method_steps,
            keep_checkpoints=1,
            seed=recipe.seed,
            cpu=True,
            caption_end=recipe.gill_caption_end if kind == "gill" else "",
            tensorboard=False,
        )
    )
    metrics: dict = {
        "train_steps": result.step,
        "validation": {k: round(v, 4) for k, v in (result.validation[-1] if result.validation else {}).items()},
    }
    pipe = load_pipeline(run, device="cpu", dtype="fp32", load_diffusion_pipeline=False)
    if kind == "gill":
        prompts, labels = read_decision_data(data_dir / "decision_train.tsv")
        res = train_decision_head(
            pipe.model,
            pipe.tokenizer,
            prompts,
            labels,
            steps=recipe.decision_steps,
            lr=recipe.decision_lr,
            seed=recipe.seed,
        )
        metrics["decision_train_accuracy"] = round(res.accuracy, 3)
    save_native(pipe.model, out.parent / cfg.name, cfg)
    metrics["gallery"] = build_gallery(pipe, out.parent / "indexes", cfg.name, recipe.gallery_images, seed=recipe.seed)
    return metrics


def build_gallery(pipe, indexes: Path, name: str, n: int, *, seed: int = 0) -> dict:
    """Render the gallery scenes once (shared by both models) and embed them with ``pipe`` through
    ``fromage-gill index build``'s code path: a caption TSV in, an index folder out."""
    from ..retrieve import build_index

    tsv = W.export_captions(indexes / "toy-gallery", W.gallery_scenes(n, seed), seed=seed + W.GALLERY_SEED)
    out = indexes / name
    if out.exists():
        shutil.rmtree(out)
    with torch.no_grad():
        report = build_index(pipe, tsv, out, progress=False, num_workers=1)
    if report.skipped:
        raise RuntimeError(f"gallery images could not be embedded: {report.skipped[:3]}")
    return {"images": report.count, "index": f"{indexes.name}/{name}"}
