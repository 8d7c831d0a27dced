"""``train(TrainConfig)``: the FROMAGe / GILL training loop on top of accelerate.

The same function runs on one CPU (``fromage-gill train ...``) and on many GPUs or nodes
(``accelerate launch [--num_processes N] -m fromage_gill.cli train ...``). Only the trained layers
(``GroundedLM.trained_parameters()``) get gradients; the LM and vision encoder stay bit-identical.

Every input is checked before anything is written, so a bad argument never leaves a half-made run. The run
directory ``OUT`` holds:

    OUT/config.json, OUT/model.safetensors   the latest trained layers (``load_pipeline(OUT)``)
    OUT/checkpoints/step-0000500/            the same, plus trainer_state.pt (optimizer, scheduler, step) and
                                             rng-<rank>.pt; written as .tmp-step-... and renamed when complete
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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..config import ModelConfig
from ..layout import caption_rows, layout, retrieval_rows
from .data import (
    Batch,
    DataError,
    ImageCaptionDataset,
    PrecomputedDataset,
    collate,
    read_records,
    split_train_val,
)
from .losses import (
    LossWeights,
    contrastive_loss,
    l2_loss,
    next_token_loss,
    recall_at_k,
    token_accuracy,
)
from .precompute import PrecomputedStore, encode_captions_for_diffusion

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
# Published recipe (FORMATS.md): AdamW (0.9, 0.95), FROMAGe lr 3e-4, GILL lr 1e-3 with 2000 warm-up steps.
DEFAULT_LR = {"fromage": 3e-4, "gill": 1e-3}
DEFAULT_WARMUP = {"fromage": 0, "gill": 2000}
LOSS_NAMES = ("caption", "retrieval_lm", "contrastive", "generation")
METRIC_KEYS = ("total", *LOSS_NAMES, "caption_correct", "caption_counted")


@dataclass(frozen=True)
class TrainConfig:
    model: str  # preset, config JSON or model directory (its trained layers are the starting point)
    data: str
    out: str
    image_root: str | None = None
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
    from_scratch: bool = False  # seeded random trained layers instead of the model's own weights
    precomputed: str | None = None
    workers: int = 0
    seed: int = 0
    cpu: bool = False
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "val_every", "save_every", "log_every",
                    "max_caption_tokens", "keep_checkpoints")
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


# ---------------------------------------------------------------------------------------------- distributed


def gather_with_grad(x: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' rows in rank order, this process's part keeping its gradient (the others are constants):
    the contrastive loss then sees every process's negatives, as in the published code. Ranks may hold
    different numbers of rows (unreadable images are dropped)."""
    if accelerator.num_processes == 1:
        return x
    parts = _gather_parts(x.detach(), accelerator)
    parts[accelerator.process_index] = x
    return torch.cat(parts)


def gather_varlen(x: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return x
    return torch.cat(_gather_parts(x.detach(), accelerator))


def _gather_parts(x: torch.Tensor, accelerator) -> list[torch.Tensor]:
    sizes = accelerator.gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    pad = torch.zeros((max(sizes) - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    every = accelerator.gather(torch.cat([x, pad])).view(len(sizes), max(sizes), *x.shape[1:])
    return [every[r, :n] for r, n in enumerate(sizes)]


# ---------------------------------------------------------------------------------------------- objective


class Objective(nn.Module):
    """All published losses for one batch; a module so that accelerate can wrap it (DDP) for many processes."""

    def __init__(self, model, tokenizer, *, weights: LossWeights, max_caption_tokens: int, accelerator,
                 diffusion=None, caption_end: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self.max_caption_tokens = max_caption_tokens
        self.accelerator = accelerator
        self.diffusion = diffusion  # for on-the-fly GILL targets; not a submodule (not saved, not wrapped)
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.ignore_ids = frozenset(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                tokenizer.pad_token_id, tokenizer.unk_token_id) if i is not None)
        self.caption_end_ids = tokenizer(caption_end, add_special_tokens=False)["input_ids"] if caption_end else []
        if caption_end and (not self.caption_end_ids or set(self.caption_end_ids) & self.ignore_ids):
            raise ValueError(f"--caption-end {caption_end!r} tokenizes to {self.caption_end_ids}, which the loss "
                             "cannot supervise (empty, or a BOS/EOS/pad/unk id it masks): pass the text that ends "
                             "a chat turn, e.g. '\\n'")

    def tokenize(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer(captions, add_special_tokens=False, truncation=True,
                              max_length=self.max_caption_tokens)["input_ids"]

    def prompted(self, prompt: str, caption: str) -> tuple[list[int], list[int]]:
        """The ids of a captioning prompt and of the caption after it, tokenized as one text (the caption after a
        space unless the prompt ends in whitespace: ``Q: ...\\nA:`` + `` a cat``, as a chat lays out an answer), so
        the caption's first token is the one it is in a chat. Both are cut to ``max_caption_tokens`` (the prompt
        keeping its end)."""
        sep = "" if prompt[-1:].isspace() else " "
        head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = self.tokenizer(prompt + sep + caption, add_special_tokens=False)["input_ids"]
        if whole[:len(head)] == head:
            tail = whole[len(head):]
        else:  # a merge across the seam: tokenize the caption on its own
            tail = self.tokenizer(sep + caption, add_special_tokens=False)["input_ids"]
        return head[-self.max_caption_tokens:], tail[:self.max_caption_tokens]

    def local_parts(self, features: torch.Tensor, captions: list[str], text_cond: torch.Tensor | None,
                    concat: bool, queries: list[str] | None = None, prompts: list[str] | None = None
                    ) -> dict[str, torch.Tensor]:
        """The per-process losses of a non-empty batch, and the [RET]/[IMG0] text and image embeddings for the
        contrastive loss. features (B, vision_dim) frozen image features. ``queries``: the text the image tokens
        follow in the retrieval and generation parts (default: the captions); captioning and the diffusion target
        always use the captions. ``prompts``: text read between each image and its caption in the captioning
        part ("" or None: none)."""
        m = self.model
        cfg = m.config
        ids = self.tokenize(captions)
        out: dict[str, torch.Tensor] = {}

        # 1. Captioning: [visual tokens; BOS; prompt; caption; end] (+ the next example's, to teach interleaving).
        heads: list[list[int]] = [[] for _ in captions]
        targets = list(ids)
        for i, prompt in enumerate(prompts or []):
            if prompt:
                heads[i], targets[i] = self.prompted(prompt, captions[i])
        ended = [cap + self.caption_end_ids for cap in targets] if self.caption_end_ids else targets
        lay = layout(caption_rows(ended, bos_id=self.bos_id, concat=concat, prompts=heads),
                     n_visual=cfg.n_visual_tokens, pad_id=self.pad_id, ignore_ids=self.ignore_ids)
        lm_out = m(lay.input_ids, lay.attention_mask, features=features, visual_slot=lay.visual_slot)
        labels = lay.labels.to(lm_out.logits.device)
        out["caption"] = next_token_loss(lm_out.logits, labels)
        correct, counted = token_accuracy(lm_out.logits.detach(), labels)
        out["caption_correct"] = torch.tensor(float(correct))
        out["caption_counted"] = torch.tensor(float(counted))

        # 2. Retrieval LM: [BOS; caption (or query); [RET] | [IMG0..r-1]] -- teaches emitting the image tokens.
        query_ids = ids if queries is None or queries == captions else self.tokenize(queries)
        rows, first = retrieval_rows(query_ids, bos_id=self.bos_id, image_token_ids=m.image_token_ids)
        lay = layout(rows, n_visual=cfg.n_visual_tokens, pad_id=self.pad_id, ignore_ids=self.ignore_ids)
        lm_out = m(lay.input_ids, lay.attention_mask)
        out["retrieval_lm"] = next_token_loss(lm_out.logits, lay.labels.to(lm_out.logits.device))
        hidden = lm_out.hidden  # (B, T, d)
        pos = torch.tensor(first, device=hidden.device)[:, None] + torch.arange(len(m.image_token_ids),
                                                                                device=hidden.device)
        img_hidden = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, r, d)
        out["text_emb"] = m.text_embedding(img_hidden[:, 0])
        out["image_emb"] = m.image_embedding(features)

        # 3. GILL: mapper output vs the caption's diffusion text-encoder output.
        if m.mapper is not None:
            if text_cond is None:
                text_cond = encode_captions_for_diffusion(self.diffusion, captions)
            out["generation"] = l2_loss(m.map_to_diffusion(img_hidden), text_cond.to(m.device))
        return out

    def forward(self, features: torch.Tensor, captions: list[str], text_cond: torch.Tensor | None,
                concat: bool, queries: list[str] | None = None, prompts: list[str] | None = None
                ) -> dict[str, torch.Tensor]:
        """The weighted ``total`` and each loss for this process's batch. B may be 0 on a process whose images
        were all unreadable: it still takes part in the gather of the contrastive loss."""
        m, w = self.model, self.weights
        # Touch every trained parameter so that each process's backward covers the same set (DDP requirement).
        total = sum(p.sum() for p in m.parameters() if p.requires_grad) * 0.0
        out: dict[str, torch.Tensor] = {}
        if features.shape[0]:
            out = self.local_parts(features, captions, text_cond, concat, queries, prompts)
            text_emb, image_emb = out.pop("text_emb"), out.pop("image_emb")
            total = total + w.caption * out["caption"] + w.retrieval_lm * out["retrieval_lm"]
            if "generation" in out:
                total = total + w.generation * out["generation"]
        else:
            text_emb = image_emb = torch.zeros(0, m.config.retrieval_dim, device=m.device)
        # 4. Contrastive, with every process's examples as negatives.
        all_text = gather_with_grad(text_emb, self.accelerator)
        all_image = gather_with_grad(image_emb, self.accelerator)
        if all_text.shape[0]:
            out["contrastive"] = contrastive_loss(all_text, all_image, m.logit_scale)
            total = total + w.contrastive * out["contrastive"]
        out["total"] = total
        return out


# ---------------------------------------------------------------------------------------------- setup checks


def check_vocabulary(model, tokenizer) -> None:
    """Every id the training feeds or predicts must exist in the LM (or be one of the new image tokens)."""
    n_base = model.n_base
    head = model.lm.get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else 0
    if rows < n_base:
        raise ValueError(f"the LM's output layer has {rows} rows but its tokenizer {n_base} tokens: token ids "
                         f"{rows}..{n_base - 1} have no logits. Use the tokenizer that belongs to the LM "
                         f"(lm.tokenizer) or a matching lm.config.vocab_size")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None and not 0 <= i < n_base:
            raise ValueError(f"the tokenizer's {name} is {i}, beyond the LM vocabulary of {n_base}; fix the "
                             f"tokenizer's special tokens or lm.config")


def _comparable(config: ModelConfig) -> dict:
    d = config.to_dict()
    for k in ("weights", "weights_format", "description"):
        d.pop(k, None)
    return d


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path} is not a directory")
    if (path / TRAINER_STATE).is_file():
        return path
    found = sorted((path / CHECKPOINTS).glob("step-*")) if (path / CHECKPOINTS).is_dir() else []
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume {path} holds no checkpoint ({TRAINER_STATE} or {CHECKPOINTS}/step-*)")
    return found[-1]


def check_resume(resume: Path, config: ModelConfig) -> None:
    theirs = json.loads((resume / ckpt.CONFIG_NAME).read_text()) if (resume / ckpt.CONFIG_NAME).is_file() else None
    if theirs is None:
        raise FileNotFoundError(f"--resume {resume} has no {ckpt.CONFIG_NAME}")
    ours = _comparable(config)
    theirs = _comparable(ModelConfig.from_dict(theirs))
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
        raise ValueError(f"--resume {resume} was written by another model ({theirs.get('name')!r}, differing in "
                         f"{', '.join(diff)}) than --model {config.name!r}; resume with the same --model")


# ---------------------------------------------------------------------------------------------- schedule


def lr_lambda(warmup: int, decay_steps: int | None):
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 ** ((step - warmup) // decay_steps) if decay_steps else 1.0

    return f


class MicroBatches:
    """Index lists (into the training split) of micro-batches ``start..stop-1``. Global micro-batch u covers rows
    [j * B * W, (j + 1) * B * W) of epoch e's permutation (e, j = divmod(u, per_epoch)); process ``rank`` takes its
    B-slice. A function of (seed, u) only: resuming at u gives the batches an uninterrupted run would see."""

    def __init__(self, n_train: int, *, batch_size: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.b, self.w, self.rank, self.seed = n_train, batch_size, world, rank, seed
        self.start, self.stop = start, stop
        self.per_epoch = n_train // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        epoch, perm = -1, None
        for u in range(self.start, self.stop):
            e, j = divmod(u, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            lo = j * self.b * self.w + self.rank * self.b
            yield perm[lo:lo + self.b].tolist()


# ---------------------------------------------------------------------------------------------- train


def train(tc: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..devices import parse_dtype
    from ..pipeline import build_pipeline, resolve_config

    mixed = {"fp32": "no"}.get(tc.precision, tc.precision)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    try:
        accelerator = Accelerator(cpu=tc.cpu, mixed_precision=mixed, kwargs_handlers=handlers)
    except ValueError:  # an earlier train() in this process fixed another precision: that part of the state resets
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        accelerator = Accelerator(cpu=tc.cpu, mixed_precision=mixed, kwargs_handlers=handlers)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    out = Path(tc.out)

    # 1. Check every input before writing anything.
    cfg, _ = resolve_config(tc.model)
    if cfg.weights is None or tc.from_scratch:
        cfg = dataclasses.replace(cfg, weights="random")  # a preset without weights, or asked: start from scratch
    records = read_records(tc.data, tc.image_root)
    store = None
    if tc.precomputed:
        store = PrecomputedStore(tc.precomputed)
        store.check(cfg, records, need_text=cfg.kind == "gill")
    resume = resolve_resume(tc.resume) if tc.resume else None
    if resume is not None:
        check_resume(resume, cfg)
    elif (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        raise FileExistsError(f"--out {out} already holds a run; pass --resume {out} to continue it, or choose a "
                              f"new --out")
    train_idx, val_idx = split_train_val(len(records), tc.val_fraction, tc.seed)
    if len(train_idx) < tc.batch_size * world:
        raise DataError(f"{len(train_idx)} training example(s) are fewer than one batch ({tc.batch_size} x "
                        f"{world} process(es)); lower --batch-size or add data")
    frozen_dtype = parse_dtype(tc.precision)
    pipe = build_pipeline(cfg, device=accelerator.device, dtype=frozen_dtype,
                          load_diffusion_pipeline=cfg.kind == "gill" and store is None)
    model, tokenizer = pipe.model, pipe.tokenizer
    model.trained_layers_to(accelerator.device, torch.float32)  # master weights in fp32; autocast does the rest
    check_vocabulary(model, tokenizer)
    if cfg.kind == "gill" and pipe.diffusion is not None:
        q = pipe.diffusion.tokenizer.model_max_length
        if q != cfg.mapper.num_queries:
            raise ValueError(f"mapper.num_queries is {cfg.mapper.num_queries} but the diffusion tokenizer pads "
                             f"captions to {q} tokens; set mapper.num_queries to {q}")

    # 2. What trains: the trained layers, less the decision head (trained separately on labelled prompts).
    model.requires_grad_(False)
    trained = {k: p for k, p in model.trained_parameters().items() if not k.startswith("decision.")}
    for p in trained.values():
        p.requires_grad_(True)
    if resume is not None:
        ckpt.load_trained_layers(model, ckpt.read_native(resume / ckpt.WEIGHTS_NAME), source=str(resume))
    lr = tc.lr if tc.lr is not None else DEFAULT_LR[cfg.kind]
    warmup = tc.warmup if tc.warmup is not None else DEFAULT_WARMUP[cfg.kind]
    optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, betas=tc.betas, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, tc.lr_decay_steps))
    # The published code (FROMAGe and GILL) rescales the trained [RET]/[IMG] rows after every step to the mean norm
    # of the LM's own embedding rows, so the new tokens stay on the scale the frozen LM expects; untied output rows
    # get the same treatment against the LM's output rows.
    token_norm = mean_embedding_norm(model)
    objective = Objective(model, tokenizer, weights=tc.loss_weights, max_caption_tokens=tc.max_caption_tokens,
                          caption_end=tc.caption_end,
                          accelerator=accelerator, diffusion=pipe.diffusion)
    if world > 1:
        # The frozen backbones are identical everywhere by construction: DDP need not broadcast or watch them.
        frozen = [n for n, _ in objective.named_parameters() if n.split(".")[1] in ("lm", "vision")]
        frozen += [n for n, _ in objective.named_buffers() if n.split(".")[1] in ("lm", "vision")]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    wrapped, optimizer = accelerator.prepare(objective, optimizer)

    step = 0
    if resume is not None:
        state = torch.load(resume / TRAINER_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rng_file = resume / f"rng-{rank}.pt"
        if rng_file.is_file():
            _set_rng(torch.load(rng_file, map_location="cpu", weights_only=False))  # numpy state: our own file
        logger.info("resumed from %s at step %d", resume, step)

    # 3. Data.
    dataset = (PrecomputedDataset(records.items, store) if store is not None
               else ImageCaptionDataset(records.items, pipe.image_processor))
    train_set = torch.utils.data.Subset(dataset, train_idx)
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(_jsonable(dataclasses.asdict(tc)), indent=2) + "\n")
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "logs"))
    accelerator.wait_for_everyone()

    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    skipped_during = 0
    first_micro = step * tc.grad_accum
    sampler = MicroBatches(len(train_idx), batch_size=tc.batch_size, world=world, rank=rank, seed=tc.seed,
                           start=first_micro, stop=tc.max_steps * tc.grad_accum)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=tc.workers)
    batches = iter(loader)
    from tqdm.auto import tqdm

    def run_validation() -> None:
        metrics = validate(objective, dataset, val_idx, batch_size=tc.batch_size, accelerator=accelerator)
        metrics["step"] = step
        validation.append(metrics)
        if main:
            logger.info("step %d validation: %s", step,
                        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "step"))
            if writer is not None:
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(f"val/{k}", v, step)

    if val_idx and tc.validate_at_start and step == 0:
        run_validation()
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=not (main and tc.progress))
    wrapped.train()
    seen = 0
    step_seconds: list[float] = []
    while step < tc.max_steps:
        t_step = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for micro in range(tc.grad_accum):
            batch: Batch = next(batches)
            skipped_during += len(batch.skipped)
            for key, why in batch.skipped:
                logger.warning("skipped %s: %s", key, why)
            u = step * tc.grad_accum + micro
            concat = random.Random(tc.seed * 1_000_003 + u).random() < tc.concat_prob
            features = _features(model, batch, accelerator.device)
            sync = contextlib.nullcontext() if micro == tc.grad_accum - 1 else accelerator.no_sync(wrapped)
            with sync:
                parts = wrapped(features, batch.captions, batch.text_cond, concat, batch.queries, batch.prompts)
                accelerator.backward(parts["total"] / tc.grad_accum)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            seen += len(batch)
        accelerator.clip_grad_norm_(list(trained.values()), tc.grad_clip)
        lr_used = scheduler.get_last_lr()[0]
        optimizer.step()
        renormalize_image_tokens(model, token_norm)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds.append(time.perf_counter() - t_step)
        record = _global_means(sums, counts, accelerator)
        record["lr"] = lr_used
        history.append(record)
        if main:
            elapsed = sum(step_seconds)  # training time only: validation and checkpoints excluded
            bar.set_postfix(loss=f"{record['total']:.3f}", ex_s=f"{seen * world / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            if writer is not None and (step % tc.log_every == 0 or step == tc.max_steps):
                for k, v in record.items():
                    writer.add_scalar(f"train/{k}", v, step)
        if val_idx and (step % tc.val_every == 0 or step == tc.max_steps):
            run_validation()
            wrapped.train()
        if step % tc.save_every == 0 or step == tc.max_steps:
            save_checkpoint(out, step, model, optimizer, scheduler, accelerator, keep=tc.keep_checkpoints)
    bar.close()
    if writer is not None:
        writer.close()
    total_skipped = int(accelerator.reduce(torch.tensor(skipped_during, device=accelerator.device), "sum"))
    return TrainResult(out=out, step=step, history=history, validation=validation,
                       skipped=records.skipped.total + total_skipped, model=model,
                       step_seconds=step_seconds, is_main_process=main)


@torch.no_grad()
def mean_embedding_norm(model) -> tuple[float, float | None]:
    """Mean L2 norm of the LM's input embedding rows (and of its output rows when untied)."""
    def mean_norm(weight: torch.Tensor) -> float:
        return float(weight[: model.n_base].float().norm(dim=-1).mean())

    out = None if model.tied else mean_norm(model.lm.get_output_embeddings().weight)
    return mean_norm(model.lm.get_input_embeddings().weight), out


@torch.no_grad()
def renormalize_image_tokens(model, norms: tuple[float, float | None]) -> None:
    rows = [(model.image_token_embeddings, norms[0])]
    if model.image_token_output is not None:
        rows.append((model.image_token_output, norms[1]))
    for param, norm in rows:
        param.mul_(norm / param.float().norm(dim=-1, keepdim=True).clamp(min=1e-12))


def _features(model, batch: Batch, device) -> torch.Tensor:
    if batch.features is not None:
        return batch.features.to(device=device, dtype=torch.float32)
    if batch.pixels is None:  # every image of this micro-batch was unreadable
        return torch.zeros(0, model.vision.out_dim, device=device)
    return model.encode_images(batch.pixels.to(device))


def _global_means(sums: dict[str, float], counts: dict[str, int], accelerator) -> dict[str, float]:
    """Means over every micro-batch of every process. One reduction of a fixed-length vector, so that a process
    whose micro-batch was empty (all images unreadable) still matches the others."""
    n = len(METRIC_KEYS)
    vec = torch.tensor([sums.get(k, 0.0) for k in METRIC_KEYS] + [float(counts.get(k, 0)) for k in METRIC_KEYS],
                       device=accelerator.device, dtype=torch.float64)
    vec = accelerator.reduce(vec, "sum").tolist()
    total, count = dict(zip(METRIC_KEYS, vec[:n], strict=True)), dict(zip(METRIC_KEYS, vec[n:], strict=True))
    record = {k: total[k] / count[k] for k in ("total", *LOSS_NAMES) if count[k]}
    if total["caption_counted"]:
        record["caption_acc"] = total["caption_correct"] / total["caption_counted"]
    return record


@torch.no_grad()
def validate(objective: Objective, dataset, val_idx: list[int], *, batch_size: int, accelerator) -> dict[str, float]:
    """Losses, caption token accuracy and text-to-image R@1/5/10 over the held-out slice (sharded over processes;
    retrieval ranks every held-out caption against every held-out image)."""
    objective.eval()
    m = objective.model
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = val_idx[rank::world]
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # cap, ret_lm, gen, n, correct, counted
    texts, images = [], []
    for lo in range(0, max(len(mine), 1), batch_size):
        batch = collate([dataset[i] for i in mine[lo:lo + batch_size]])
        feats = _features(m, batch, accelerator.device)
        n = feats.shape[0]
        if n == 0:
            continue
        with accelerator.autocast():
            parts = objective.local_parts(feats, batch.captions, batch.text_cond, False, batch.queries,
                                          batch.prompts)
        sums[0] += float(parts["caption"]) * n
        sums[1] += float(parts["retrieval_lm"]) * n
        sums[2] += float(parts.get("generation", torch.tensor(0.0))) * n
        sums[3] += n
        sums[4] += float(parts["caption_correct"])
        sums[5] += float(parts["caption_counted"])
        texts.append(parts["text_emb"])
        images.append(parts["image_emb"])
    sums = accelerator.reduce(sums, "sum")
    d = m.config.retrieval_dim
    text = gather_varlen(torch.cat(texts) if texts else torch.zeros(0, d, device=accelerator.device), accelerator)
    image = gather_varlen(torch.cat(images) if images else torch.zeros(0, d, device=accelerator.device), accelerator)
    n = max(float(sums[3]), 1.0)
    metrics = {"caption": float(sums[0]) / n, "retrieval_lm": float(sums[1]) / n,
               "caption_acc": float(sums[4] / sums[5].clamp(min=1))}
    if m.mapper is not None:
        metrics["generation"] = float(sums[2]) / n
    if text.shape[0]:
        metrics["contrastive"] = float(contrastive_loss(text, image, m.logit_scale))
        scores = text.float() @ image.float().T
        metrics.update({f"R@{k}": v for k, v in recall_at_k(scores).items()})
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, accelerator, *, keep: int) -> Path:
    """OUT/checkpoints/step-N, complete or absent: written under a temporary name, renamed at the end. The newest
    trained layers are also copied to OUT/ (config.json + model.safetensors) so ``load_pipeline(OUT)`` works."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    tmp = out / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_get_rng(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.save_native(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
                   tmp / TRAINER_STATE)
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        tmp.rename(final)
        ckpt.save_native(model, out)
        done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
