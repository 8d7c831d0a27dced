"""Text-only domain adaptation for MAGIC: fine-tune a causal LM on a caption corpus with the SimCTG objective.

SimCTG (Su et al. 2022, "A Contrastive Framework for Neural Text Generation") adds to the usual next-token loss a
token-level contrastive term that pushes apart the last-layer representations of different positions of the same
sequence, so that contrastive search / MAGIC have distinct hidden states to compare:

    L = L_MLE + 1/|pairs| * sum_{i != j valid} max(0, margin - (cos(h_i, h_i) - cos(h_i, h_j)))

with margin 0.5 (as published). Each caption becomes ``<start token> caption <eos>``: the published caption LMs
start from ``<-start_of_text->`` and stop at ``<|endoftext|>``; ``magic-mscoco``'s prompt is that start token.

The run directory ``OUT`` holds:

    OUT/config.json, model.safetensors, tokenizer files   the latest LM (``load_magic(..., lm=OUT)``,
                                                           ``fromage-gill caption --lm OUT``)
    OUT/checkpoints/step-0000500/                         the same, plus trainer_state.pt (optimizer, scheduler,
                                                           step, rng); written as .tmp-step-... then renamed
    OUT/run.json                                          the arguments of the run

Data order is a function of (seed, step), so a resumed run sees exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..backbones import load_lm, load_tokenizer, pad_token_id
from ..config import ConfigError, LMSpec, MagicConfig, load_config
from ..model import input_embeddings
from ..resume_state import load_state, save_state

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

START_TOKEN = "<-start_of_text->"  # the published caption LMs' start-of-caption token
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
IGNORE = -100


# ------------------------------------------------------------------------------------------ the objective


def contrastive_token_loss(hidden: torch.Tensor, mask: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """SimCTG's token-level contrastive loss. hidden (B, T, d) last-layer states, mask (B, T) 1 on real tokens.
    Mean over ordered pairs (i, j), i != j, both real, of relu(margin - (s_ii - s_ij)), s = cosine similarity."""
    h = F.normalize(hidden.float(), dim=-1)
    sim = h @ h.transpose(1, 2)  # (B, T, T)
    gold = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # (B, T, 1): s_ii, 1 up to rounding
    loss = F.relu(margin - (gold - sim))
    m = mask.float()
    pairs = m.unsqueeze(2) * m.unsqueeze(1) * (1 - torch.eye(h.shape[1], device=h.device))  # (B, T, T)
    return (loss * pairs).sum() / pairs.sum().clamp(min=1)


def simctg_loss(
    logits: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, margin: float = 0.5
) -> dict[str, torch.Tensor]:
    """logits (B, T, V), hidden (B, T, d), labels (B, T) next tokens with -100 where ignored, mask (B, T) inputs.
    Returns {"total", "mle", "contrastive"}."""
    mle = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    cl = contrastive_token_loss(hidden, mask, margin)
    return {"total": mle + cl, "mle": mle, "contrastive": cl}


# ------------------------------------------------------------------------------------------ data


class CorpusError(ValueError):
    """A caption corpus that cannot be trained on; the message names the file and the problem."""


def read_captions(path: str | Path) -> list[str]:
    """One caption per line (.txt), or MAGIC's JSON: a list of {"captions": [...]} (or a list of strings)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"--data {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"--data {path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise CorpusError(f"--data {path}: expected a JSON list of captions or of {{'captions': [...]}}")
        captions = []
        for item in items:
            captions.extend(item.get("captions", []) if isinstance(item, dict) else [item])
        lines = [c for c in captions if isinstance(c, str)]
    else:
        lines = text.splitlines()
    captions = [" ".join(line.split()) for line in lines]
    captions = [c for c in captions if c]
    if not captions:
        raise CorpusError(f"--data {path}: no captions found (one per line, or MAGIC's JSON format)")
    return captions


def encode_captions(captions: list[str], tokenizer, *, start_id: int, eos_id: int, max_len: int) -> list[list[int]]:
    """``[start] + caption tokens (at most max_len) + [eos]``; captions of fewer than 2 tokens are dropped (as
    published: too short to teach anything)."""
    out = []
    for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]:
        if len(ids) >= 2:
            out.append([start_id, *ids[:max_len], eos_id])
    return out


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input ids (B, T), labels (B, T) with -100 on padding, input mask (B, T); T = longest - 1."""
    t = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        inputs[i, :n] = torch.tensor(s[:-1])
        labels[i, :n] = torch.tensor(s[1:])
        mask[i, :n] = 1
    return inputs, labels, mask


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step ``step``: epoch-wise shuffles, a pure function of (seed, step)."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    picked = order[pos * batch_size : (pos + 1) * batch_size]
    return picked if len(picked) == batch_size else (picked + order)[:batch_size]


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class SimCTGConfig:
    model: str  # a MAGIC preset (its LM), an LM directory, or a Hub id
    data: str
    out: str
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-5  # published
    warmup: int = 0
    margin: float = 0.5  # published
    max_len: int = 64  # caption tokens kept
    grad_clip: float = 1.0
    start_token: str = START_TOKEN
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    trust_pickle: bool = False  # resume from a trainer_state.pt that needs a full (code-running) unpickle
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "max_len", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 < self.margin <= 2:
            raise ValueError(f"--margin must be in (0, 2] (cosine differences lie in [0, 2]), got {self.margin}")
        if not self.grad_clip > 0:
            raise ValueError(f"--grad-clip must be > 0, got {self.grad_clip}")
        if not self.start_token:
            raise ValueError("--start-token must not be empty")


@dataclass
class SimCTGResult:
    out: Path
    step: int
    history: list[dict[str, float]]  # per optimizer step of this call: total, mle, contrastive, lr
    lm: object = None
    tokenizer: object = None


def lm_spec(model: str) -> tuple[LMSpec, int]:
    """(the LM to fine-tune, seed): a MAGIC preset's LM, or a directory / Hub id."""
    try:
        cfg = load_config(model)
    except ConfigError:
        return LMSpec(source=model), 0
    if not isinstance(cfg, MagicConfig):
        raise ValueError(
            f"--model {model!r} is a {cfg.kind!r} model; train-lm fine-tunes a plain LM: pass a MAGIC "
            f"preset (its LM), an LM directory or a Hub id"
        )
    return cfg.lm, cfg.seed


def train_lm(tc: SimCTGConfig) -> SimCTGResult:
    from tqdm.auto import tqdm

    out = Path(tc.out)
    device = torch.device(tc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # 1. Check every input before writing anything.
    run = _prepare_run(tc, out, device)
    lm = run.lm
    # 2. Optimizer; a resumed run continues from its step, optimizer and rng.
    lm.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tc.warmup) if tc.warmup else 1.0
    )
    step = 0 if run.resume is None else _resume(run.resume, optimizer, scheduler, tc.trust_pickle)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(dataclasses.asdict(tc), indent=2) + "\n")

    # 3. The loop.
    history: list[dict[str, float]] = []
    bar = tqdm(total=tc.max_steps, initial=step, desc="train-lm", unit="step", disable=not tc.progress)
    t0, seen = time.perf_counter(), 0
    while step < tc.max_steps:
        batch = [run.seqs[i] for i in batch_indices(len(run.seqs), tc.batch_size, tc.seed, step)]
        record = _train_step(run, batch, optimizer, scheduler, tc, device)
        step += 1
        seen += len(batch)
        history.append(record)
        bar.set_postfix(
            loss=f"{record['total']:.3f}",
            cl=f"{record['contrastive']:.3f}",
            ex_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}",
        )
        bar.update(1)
        if step % tc.save_every == 0 or step == tc.max_steps:
            save_checkpoint(out, step, lm, run.tokenizer, optimizer, scheduler, keep=tc.keep_checkpoints)
    bar.close()
    lm.eval().requires_grad_(False)
    return SimCTGResult(out=out, step=step, history=history, lm=lm, tokenizer=run.tokenizer)


@dataclass
class _Run:
    """What a train-lm run trains on, checked before anything is written."""

    lm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    seqs: list[list[int]]  # encoded captions: [start] + tokens + [eos]
    pad_id: int
    resume: Path | None  # the checkpoint to continue from


def _prepare_run(tc: SimCTGConfig, out: Path, device: torch.device) -> _Run:
    captions = read_captions(tc.data)
    resume = resolve_resume(Path(tc.resume)) if tc.resume else None
    if resume is None and (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()):
        raise FileExistsError(
            f"--out {out} already holds a run; pass --resume {out} to continue it, or choose a new --out"
        )
    spec, seed = lm_spec(tc.model)
    if resume is not None:
        spec, seed = LMSpec(source=str(resume)), tc.seed  # the checkpoint holds the LM and its tokenizer
    tokenizer = load_tokenizer(spec)
    if tc.start_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([tc.start_token])  # an ordinary added token, as the published caption LMs have it
    lm = load_lm(spec, tokenizer, dtype=torch.float32, device=device, seed=seed)
    if len(tokenizer) > input_embeddings(lm).num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    start_id = tokenizer.convert_tokens_to_ids(tc.start_token)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"the tokenizer of {spec.source} has no EOS token: captions could never end")
    assert isinstance(start_id, int) and isinstance(eos_id, int), "one token in, one id out"
    seqs = encode_captions(captions, tokenizer, start_id=start_id, eos_id=eos_id, max_len=tc.max_len)
    if len(seqs) < tc.batch_size:
        raise CorpusError(
            f"--data {tc.data}: {len(seqs)} usable caption(s) are fewer than one batch "
            f"({tc.batch_size}); lower --batch-size or add captions"
        )
    pad_id = pad_token_id(tokenizer)  # EOS is known to exist here, so backbones' last resort (0) never applies
    return _Run(lm=lm, tokenizer=tokenizer, seqs=seqs, pad_id=pad_id, resume=resume)


def _resume(
    resume: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, trust_pickle: bool
) -> int:
    """Load the optimizer, scheduler and rng state of checkpoint ``resume``; -> its step."""
    state = load_state(resume / TRAINER_STATE, trust_pickle=trust_pickle)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    torch.set_rng_state(state["rng"])
    logger.info("resumed from %s at step %d", resume, step)
    return step


def _train_step(
    run: _Run,
    batch: list[list[int]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    tc: SimCTGConfig,
    device: torch.device,
) -> dict[str, float]:
    """One optimizer step on ``batch``; -> its losses (total, mle, contrastive) and the learning rate it used."""
    lm = run.lm
    inputs, labels, mask = (t.to(device) for t in collate(batch, run.pad_id))
    hidden = lm.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state
    head = lm.get_output_embeddings()
    assert head is not None, "a causal LM has an output head"
    parts = simctg_loss(head(hidden), hidden, labels, mask, tc.margin)
    parts["total"].backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), tc.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    record = {k: float(v.detach()) for k, v in parts.items()}
    record["lr"] = float(scheduler.get_last_lr()[0])
    return record


def resolve_resume(path: Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    if (path / TRAINER_STATE).is_file():
        return path
    done = sorted(p for p in (path / CHECKPOINTS).glob("step-*") if (p / TRAINER_STATE).is_file())
    if not done:
        raise FileNotFoundError(
            f"--resume {path}: no checkpoint there (expected {path}/{CHECKPOINTS}/step-*/ with {TRAINER_STATE})"
        )
    return done[-1]


def save_checkpoint(out: Path, step: int, lm, tokenizer, optimizer, scheduler, *, keep: int) -> Path:
    """OUT/checkpoints/step-N, complete or absent (written under a temporary name, renamed at the end); the
    latest LM is also written to OUT itself, again through a temporary directory."""
    final = out / CHECKPOINTS / f"step-{step:07d}"
    tmp = out / CHECKPOINTS / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_state(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
        },
        tmp / TRAINER_STATE,
    )
    if final.exists():  # the same step again after a resume
        shutil.rmtree(final)
    tmp.rename(final)
    # OUT's own copy of the LM: files staged beside it and moved in one by one (each move is atomic).
    staged = out / f".tmp-latest-{step:07d}"
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(final, staged, ignore=shutil.ignore_patterns(TRAINER_STATE))
    for f in staged.iterdir():
        f.replace(out / f.name)
    staged.rmdir()
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old)
    return final
