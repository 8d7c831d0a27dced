"""``train(TrainConfig)``: the FROMAGe / GILL training loop on top of accelerate.

The same function runs on one CPU (``fromage-gill train ...``) and on many GPUs or nodes
(``accelerate launch [--num_processes N] -m fromage_gill.cli train ...``). Only the trained layers
(``GroundedLM.trained_parameters()``) get gradients; the LM and vision encoder stay bit-identical.

``train`` runs in five stages: check every input, build the model, set up the objective and optimizer (resuming
their state), open the run directory and the data, then take the steps (validating and checkpointing on the way).
Every input is checked before anything is written, so a bad argument never leaves a half-made run. The run
directory ``OUT`` holds:

    OUT/config.json, OUT/model.safetensors   the latest trained layers (``load_pipeline(OUT)``)
    OUT/checkpoints/step-0000500/            the same, plus optimizer, scheduler, step and RNG state (``checkpoints``)
    OUT/logs/                                TensorBoard scalars
    OUT/run.json                             the arguments of the run

Data order is a function of (seed, step), never of what ran before, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ..config import ConfigError, MagicConfig, ModelConfig
from .checkpoints import (
    check_fresh_run,
    check_resume,
    load_trained_layers,
    resolve_resume,
    restore_trainer_state,
    save_checkpoint,
)
from .data import (
    Batch,
    DataError,
    ImageCaptionDataset,
    MicroBatches,
    PrecomputedDataset,
    Records,
    collate,
    read_records,
    split_train_val,
)
from .distributed import ignore_frozen_backbones, training_accelerator
from .losses import LossWeights
from .objective import LOSS_NAMES, Objective, check_vocabulary, mean_embedding_norm, renormalize_image_tokens
from .precompute import PrecomputedStore
from .validation import validate

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..model import GroundedLM
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

# Published recipe (FORMATS.md): AdamW (0.9, 0.95), FROMAGe lr 3e-4, GILL lr 1e-3 with 2000 warm-up steps.
DEFAULT_LR = {"fromage": 3e-4, "gill": 1e-3}
DEFAULT_WARMUP = {"fromage": 0, "gill": 2000}
METRIC_KEYS = ("total", *LOSS_NAMES, "caption_correct", "caption_counted")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # preset, config JSON or model directory (its trained layers are the starting point)
    data: str
    out: str
    image_root: str | None = None
    allow_images_outside_root: bool = False  # let the data's image paths resolve outside image_root
    max_steps: int = 1000
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1
    lr: float | None = None  # None: the published value for the model kind
    warmup: int | None = None
    weight_decay: float = 0.0
    lr_decay_steps: int | None = None  # multiply the lr by 0.1 every N steps after warm-up (published StepLR)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    val_fraction: float = 0.05
    val_every: int = 500
    validate_at_start: bool = True  # a step-0 validation on a fresh run: the baseline the later ones compare to
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    max_caption_tokens: int = 32
    concat_prob: float = 0.5
    # Text supervised after every caption in the captioning loss: the chat's end of turn (e.g. "\n"), so the model
    # learns that words about a shown image end there rather than with an image token. "" (the papers): nothing.
    caption_end: str = ""
    loss_weights: LossWeights = field(default_factory=LossWeights)
    resume: str | None = None
    trust_pickle: bool = False  # resume from a checkpoint whose state needs a full (code-running) unpickle
    from_scratch: bool = False  # seeded random trained layers instead of the model's own weights
    precomputed: str | None = None
    workers: int = 0
    seed: int = 0
    cpu: bool = False
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_size",
            "grad_accum",
            "val_every",
            "save_every",
            "log_every",
            "max_caption_tokens",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"--lr-decay-steps must be >= 1, got {self.lr_decay_steps}")
        if not 0 <= self.concat_prob <= 1:
            raise ValueError(f"--concat-prob must be in [0, 1], got {self.concat_prob}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.grad_clip <= 0:
            raise ValueError(f"--grad-clip must be > 0, got {self.grad_clip}")


@dataclass
class TrainResult:
    out: Path
    step: int
    history: list[dict[str, float]]  # one entry per optimizer step of this call: losses (global mean), lr
    validation: list[dict[str, float]]  # one entry per validation: step, losses, caption_acc, R@1/5/10
    skipped: int  # examples skipped (missing at read time + unreadable during training)
    model: object = None  # the GroundedLM, trained layers as left by the last step
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step (data + compute)
    is_main_process: bool = True


# ---------------------------------------------------------------------------------------------- schedule


def lr_lambda(warmup: int, decay_steps: int | None):
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 ** ((step - warmup) // decay_steps) if decay_steps else 1.0

    return f


# ---------------------------------------------------------------------------------------------- train


def train(tc: TrainConfig) -> TrainResult:
    """Train the layers of ``tc.model`` that ground its LM to images on ``tc.data``, writing the run to ``tc.out``.

    Under torchrun / ``accelerate launch`` the process group this call sets up is destroyed before it returns; a
    caller that uses torch.distributed afterwards sets its group up before calling (it is then left alone)."""
    with training_accelerator(cpu=tc.cpu, precision=tc.precision) as accelerator:
        plan = _check_inputs(tc, accelerator.num_processes)  # 1. nothing is written before this passes
        pipe, trained = _build_model(tc, plan, accelerator)  # 2. frozen backbones, trained layers in fp32
        opt = _build_optimisation(tc, plan, pipe, trained, accelerator)  # 3. objective, AdamW, schedule (resumed)
        data = _open_run(tc, plan, pipe, opt.step, accelerator)  # 4. run directory, batches from this step on
        return _run_steps(tc, plan, opt, data, accelerator)  # 5. steps, validation, checkpoints


@dataclass
class _Plan:
    """What stage 1 checked: the model's config, the examples and their split, and where to resume from."""

    out: Path
    cfg: ModelConfig
    records: Records
    store: PrecomputedStore | None
    resume: Path | None
    train_idx: list[int]
    val_idx: list[int]


@dataclass
class _Optimisation:
    """Stage 3: what an optimizer step uses and changes."""

    model: GroundedLM
    objective: Objective
    wrapped: nn.Module  # the objective as accelerate prepared it (DDP on many processes)
    trained: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    token_norm: tuple[float, float | None]  # see renormalize_image_tokens
    step: int  # optimizer steps taken so far


@dataclass
class _Data:
    """Stage 4: the examples, the training batches from the current step on, and the TensorBoard writer."""

    dataset: torch.utils.data.Dataset
    batches: Iterator[Batch]
    writer: SummaryWriter | None  # main process only


def _check_inputs(tc: TrainConfig, world: int) -> _Plan:
    from ..pipeline import resolve_config

    out = Path(tc.out)
    cfg = resolve_config(tc.model)
    if isinstance(cfg, MagicConfig):
        raise ConfigError(
            f"{tc.model} is a MAGIC model: it has no trained layers (an unmodified LM guided by CLIP), so there is "
            f"nothing to train; pick a FROMAGe or GILL preset"
        )
    if cfg.weights is None or tc.from_scratch:
        cfg = dataclasses.replace(cfg, weights="random")  # a preset without weights, or asked: start from scratch
    records = read_records(tc.data, tc.image_root, allow_outside_root=tc.allow_images_outside_root)
    store = None
    if tc.precomputed:
        store = PrecomputedStore(tc.precomputed)
        store.check(cfg, records, need_text=cfg.kind == "gill")
    resume = resolve_resume(tc.resume) if tc.resume else None
    if resume is not None:
        check_resume(resume, cfg)
    else:
        check_fresh_run(out)
    train_idx, val_idx = split_train_val(len(records), tc.val_fraction, tc.seed)
    if len(train_idx) < tc.batch_size * world:
        raise DataError(
            f"{len(train_idx)} training example(s) are fewer than one batch ({tc.batch_size} x "
            f"{world} process(es)); lower --batch-size or add data"
        )
    return _Plan(out=out, cfg=cfg, records=records, store=store, resume=resume, train_idx=train_idx, val_idx=val_idx)


def _build_model(tc: TrainConfig, plan: _Plan, accelerator) -> tuple[Pipeline, list[nn.Parameter]]:
    """The pipeline on the accelerator's device, and the parameters that train: the trained layers, less the
    decision head (trained separately on labelled prompts)."""
    from ..devices import parse_dtype
    from ..pipeline import build_pipeline

    cfg = plan.cfg
    pipe = build_pipeline(
        cfg,
        device=accelerator.device,
        dtype=parse_dtype(tc.precision),
        load_diffusion_pipeline=cfg.kind == "gill" and plan.store is None,
    )
    model = pipe.model
    model.trained_layers_to(accelerator.device, torch.float32)  # master weights in fp32; autocast does the rest
    check_vocabulary(model, pipe.tokenizer)
    if cfg.mapper is not None and pipe.diffusion is not None:  # GILL (ModelConfig: a mapper is GILL's)
        q = pipe.diffusion.tokenizer.model_max_length
        if q != cfg.mapper.num_queries:
            raise ValueError(
                f"mapper.num_queries is {cfg.mapper.num_queries} but the diffusion tokenizer pads "
                f"captions to {q} tokens; set mapper.num_queries to {q}"
            )
    model.requires_grad_(False)
    trained = [p for k, p in model.trained_parameters().items() if not k.startswith("decision.")]
    for p in trained:
        p.requires_grad_(True)
    if plan.resume is not None:
        load_trained_layers(model, plan.resume)
    return pipe, trained


def _build_optimisation(
    tc: TrainConfig, plan: _Plan, pipe: Pipeline, trained: list[nn.Parameter], accelerator
) -> _Optimisation:
    model, kind = pipe.model, plan.cfg.kind
    lr = tc.lr if tc.lr is not None else DEFAULT_LR[kind]
    warmup = tc.warmup if tc.warmup is not None else DEFAULT_WARMUP[kind]
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=tc.betas, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, tc.lr_decay_steps))
    token_norm = mean_embedding_norm(model)  # the published recipe keeps the trained token rows at this scale
    objective = Objective(
        model,
        pipe.tokenizer,
        weights=tc.loss_weights,
        max_caption_tokens=tc.max_caption_tokens,
        caption_end=tc.caption_end,
        accelerator=accelerator,
        diffusion=pipe.diffusion,
    )
    if accelerator.num_processes > 1:
        ignore_frozen_backbones(objective)
    wrapped, optimizer = accelerator.prepare(objective, optimizer)
    step = 0
    if plan.resume is not None:
        step = restore_trainer_state(
            plan.resume, optimizer, scheduler, accelerator.process_index, trust_pickle=tc.trust_pickle
        )
    return _Optimisation(
        model=model,
        objective=objective,
        wrapped=wrapped,
        trained=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        token_norm=token_norm,
        step=step,
    )


def _open_run(tc: TrainConfig, plan: _Plan, pipe: Pipeline, step: int, accelerator) -> _Data:
    """The run directory (run.json, logs/) and the training batches from optimizer step ``step`` on."""
    dataset = (
        PrecomputedDataset(plan.records.items, plan.store)
        if plan.store is not None
        else ImageCaptionDataset(plan.records.items, pipe.image_processor)
    )
    writer = None
    if accelerator.is_main_process:
        plan.out.mkdir(parents=True, exist_ok=True)
        (plan.out / "run.json").write_text(json.dumps(_jsonable(dataclasses.asdict(tc)), indent=2) + "\n")
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(plan.out / "logs"))
    accelerator.wait_for_everyone()
    sampler = MicroBatches(
        len(plan.train_idx),
        batch_size=tc.batch_size,
        world=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=tc.seed,
        start=step * tc.grad_accum,
        stop=tc.max_steps * tc.grad_accum,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, plan.train_idx),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=tc.workers,
    )
    return _Data(dataset=dataset, batches=iter(loader), writer=writer)


def _run_steps(tc: TrainConfig, plan: _Plan, opt: _Optimisation, data: _Data, accelerator) -> TrainResult:
    """Optimizer steps up to ``tc.max_steps``, validating every ``val_every`` and saving every ``save_every`` steps
    (and both at the end)."""
    from tqdm.auto import tqdm

    main, world = accelerator.is_main_process, accelerator.num_processes
    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []

    def run_validation() -> None:
        metrics = validate(opt.objective, data.dataset, plan.val_idx, batch_size=tc.batch_size, accelerator=accelerator)
        metrics["step"] = opt.step
        validation.append(metrics)
        if main:
            logger.info(
                "step %d validation: %s", opt.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step")
            )
            _add_scalars(data.writer, "val", metrics, opt.step)

    if plan.val_idx and tc.validate_at_start and opt.step == 0:
        run_validation()
    bar = tqdm(total=tc.max_steps, initial=opt.step, desc="train", unit="step", disable=not (main and tc.progress))
    opt.wrapped.train()
    seen = 0
    skipped: dict[str, str] = {}  # unreadable examples met while training: each logged and counted once, not per epoch
    step_seconds: list[float] = []
    while opt.step < tc.max_steps:
        t_step = time.perf_counter()
        done = _optimizer_step(tc, opt, data.batches, accelerator)
        step_seconds.append(time.perf_counter() - t_step)
        seen += done.seen
        for key, why in done.skipped:
            if key not in skipped:
                skipped[key] = why
                logger.warning("skipped %s: %s", key, why)
        record = _global_means(done.sums, done.counts, accelerator)
        record["lr"] = done.lr
        history.append(record)
        if main:
            elapsed = sum(step_seconds)  # training time only: validation and checkpoints excluded
            bar.set_postfix(loss=f"{record['total']:.3f}", ex_s=f"{seen * world / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            if opt.step % tc.log_every == 0 or opt.step == tc.max_steps:
                _add_scalars(data.writer, "train", record, opt.step)
        if plan.val_idx and (opt.step % tc.val_every == 0 or opt.step == tc.max_steps):
            run_validation()
            opt.wrapped.train()
        if opt.step % tc.save_every == 0 or opt.step == tc.max_steps:
            save_checkpoint(
                plan.out, opt.step, opt.model, opt.optimizer, opt.scheduler, accelerator, keep=tc.keep_checkpoints
            )
    bar.close()
    if data.writer is not None:
        data.writer.close()
    n_skipped = len(skipped)
    if world > 1:  # the same example may fail on two processes in different epochs: count it once
        from accelerate.utils import gather_object

        n_skipped = len(set(gather_object(list(skipped))))
    return TrainResult(
        out=plan.out,
        step=opt.step,
        history=history,
        validation=validation,
        skipped=plan.records.skipped.total + n_skipped,
        model=opt.model,
        step_seconds=step_seconds,
        is_main_process=main,
    )


@dataclass
class _StepDone:
    """One optimizer step on this process: sums and counts of each loss over its micro-batches, the examples it
    trained on and skipped (unreadable), and the learning rate the step used."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seen: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    lr: float = 0.0


def _optimizer_step(tc: TrainConfig, opt: _Optimisation, batches: Iterator[Batch], accelerator) -> _StepDone:
    """One optimizer step over ``tc.grad_accum`` micro-batches; the trained token rows are rescaled after it."""
    done = _StepDone()
    for micro in range(tc.grad_accum):
        batch: Batch = next(batches)
        done.skipped += batch.skipped
        u = opt.step * tc.grad_accum + micro  # the global micro-batch index: with the seed, all that decides
        concat = random.Random(tc.seed * 1_000_003 + u).random() < tc.concat_prob
        features = batch.image_features(opt.model, accelerator.device)
        # Gradients are averaged across processes once per step, on the last micro-batch.
        sync = contextlib.nullcontext() if micro == tc.grad_accum - 1 else accelerator.no_sync(opt.wrapped)
        with sync:
            parts = opt.wrapped(
                features, batch.captions, batch.text_cond, concat, batch.queries, batch.prompts, batch.histories
            )
            accelerator.backward(parts["total"] / tc.grad_accum)
        for k, v in parts.items():
            done.sums[k] = done.sums.get(k, 0.0) + float(v.detach())
            done.counts[k] = done.counts.get(k, 0) + 1
        done.seen += len(batch)
    accelerator.clip_grad_norm_(opt.trained, tc.grad_clip)
    done.lr = float(opt.scheduler.get_last_lr()[0])
    opt.optimizer.step()
    renormalize_image_tokens(opt.model, opt.token_norm)
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.step += 1
    return done


def _global_means(sums: dict[str, float], counts: dict[str, int], accelerator) -> dict[str, float]:
    """Means over every micro-batch of every process. One reduction of a fixed-length vector, so that a process
    whose micro-batch was empty (all images unreadable) still matches the others."""
    n = len(METRIC_KEYS)
    vec = torch.tensor(
        [sums.get(k, 0.0) for k in METRIC_KEYS] + [float(counts.get(k, 0)) for k in METRIC_KEYS],
        device=accelerator.device,
        dtype=torch.float64,
    )
    vec = accelerator.reduce(vec, "sum").tolist()
    total, count = dict(zip(METRIC_KEYS, vec[:n], strict=True)), dict(zip(METRIC_KEYS, vec[n:], strict=True))
    record = {k: total[k] / count[k] for k in ("total", *LOSS_NAMES) if count[k]}
    if total["caption_counted"]:
        record["caption_acc"] = total["caption_correct"] / total["caption_counted"]
    return record


def _add_scalars(writer, prefix: str, values: dict[str, float], step: int) -> None:
    if writer is not None:
        for k, v in values.items():
            if k != "step":
                writer.add_scalar(f"{prefix}/{k}", v, step)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
