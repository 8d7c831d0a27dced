"""GILL's decision head, trained on its own on labelled prompts: retrieve an image, or generate one?

As published, the head (Dropout 0.5 + Linear) reads the LM's last-layer hidden state at ``[IMG0]`` appended to the
prompt, and is trained after (and separately from) the other layers. Everything it reads is frozen at this stage,
so the hidden states are computed once and only the head runs in the loop.

Data: a TSV/CSV with a header naming a ``prompt`` (or ``text``/``caption``) and a ``label`` column; labels are
``generate``/``retrieve`` (or 0/1, the head's output order).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..backbones import pad_token_id
from ..layout import layout, retrieval_rows
from ..model import DECISION_GENERATE, DECISION_RETRIEVE
from .data import DataError
from .losses import decision_loss

if TYPE_CHECKING:
    from ..model import GroundedLM

logger = logging.getLogger(__name__)

LABELS = {
    "generate": DECISION_GENERATE,
    "retrieve": DECISION_RETRIEVE,
    str(DECISION_GENERATE): DECISION_GENERATE,
    str(DECISION_RETRIEVE): DECISION_RETRIEVE,
}


@dataclass(frozen=True)
class DecisionResult:
    losses: list[float]  # per step
    accuracy: float  # on the labelled prompts, head in eval mode, after training
    n_examples: int


def read_decision_data(path: str | Path) -> tuple[list[str], list[int]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--decision-data {path} does not exist")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise DataError(f"--decision-data {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    text_col = next((header.index(c) for c in ("prompt", "text", "caption") if c in header), None)
    if text_col is None or "label" not in header:
        raise DataError(
            f"--decision-data {path}: the header {rows[0]} needs a 'prompt' and a 'label' column, "
            f"e.g. 'prompt<TAB>label' with labels generate / retrieve"
        )
    label_col = header.index("label")
    prompts, labels = [], []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        label = row[label_col].strip().lower() if label_col < len(row) else ""
        if label not in LABELS:
            raise DataError(
                f"--decision-data {path}, line {line_no}: label {label!r} is not generate, retrieve, 0 or 1"
            )
        prompts.append(row[text_col].strip())
        labels.append(LABELS[label])
    if not prompts:
        raise DataError(f"--decision-data {path} holds no labelled prompt")
    return prompts, labels


@torch.no_grad()
def img0_hidden(
    model: GroundedLM, tokenizer, prompts: list[str], *, batch_size: int = 32, max_tokens: int = 64
) -> torch.Tensor:
    """(N, d) last-layer hidden states at [IMG0] after each prompt (the decision head's input), fp32.

    The same layout and states as ``generate.image_token_states(pipeline, prompts)[:, 0]`` (a test holds them
    equal), except that each prompt is cut to ``max_tokens`` tokens first, which that function cannot do."""
    out = []
    pad = pad_token_id(tokenizer)
    for lo in range(0, len(prompts), batch_size):
        ids = tokenizer(
            prompts[lo : lo + batch_size], add_special_tokens=False, truncation=True, max_length=max_tokens
        )["input_ids"]
        rows, first = retrieval_rows(ids, bos_id=tokenizer.bos_token_id, image_token_ids=model.image_token_ids)
        lay = layout(rows, n_visual=model.config.n_visual_tokens, pad_id=pad, ignore_ids=frozenset())
        hidden = model(lay.input_ids, lay.attention_mask, logits="none").hidden
        out.append(hidden[torch.arange(len(first)), torch.tensor(first)])
    return torch.cat(out).float()


def train_decision_head(
    model: GroundedLM,
    tokenizer,
    prompts: list[str],
    labels: list[int],
    *,
    steps: int = 500,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> DecisionResult:
    """Train ``model.decision`` alone (AdamW with the published betas); every other weight is left untouched."""
    if model.decision is None:
        raise ValueError(f"{model.config.name} has no decision head (decision_head: true in a GILL config)")
    if len(prompts) != len(labels) or not prompts:
        raise ValueError(f"need as many labels as prompts (and at least one), got {len(prompts)} and {len(labels)}")
    features = img0_hidden(model, tokenizer, prompts).to(model.device)
    target = torch.tensor(labels, device=model.device)
    head = model.decision
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    losses = []
    head.train()
    for _ in range(steps):
        idx = torch.randint(len(prompts), (min(batch_size, len(prompts)),), generator=g).to(model.device)
        loss = decision_loss(head(features[idx].to(model.dtype)), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    head.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((head(features.to(model.dtype)).argmax(-1) == target).float().mean())
    logger.info(
        "decision head: loss %.4f -> %.4f, accuracy %.3f on %d prompts", losses[0], losses[-1], accuracy, len(prompts)
    )
    return DecisionResult(losses=losses, accuracy=accuracy, n_examples=len(prompts))
