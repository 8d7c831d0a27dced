"""Validation on the held-out slice: the training losses, caption token accuracy and text-to-image R@1/5/10.

The slice is fixed (``data.split_train_val``) and sharded over processes; retrieval ranks every held-out caption
against every held-out image, gathered from all processes.
"""

from __future__ import annotations

import torch

from .data import collate
from .distributed import gather_varlen
from .losses import contrastive_loss, recall_at_k
from .objective import Objective


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
        batch = collate([dataset[i] for i in mine[lo : lo + batch_size]])
        feats = batch.image_features(m, accelerator.device)
        n = feats.shape[0]
        if n == 0:
            continue
        with accelerator.autocast():
            parts = objective.local_parts(
                feats, batch.captions, batch.text_cond, False, batch.queries, batch.prompts, batch.histories
            )
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
    metrics = {
        "caption": float(sums[0]) / n,
        "retrieval_lm": float(sums[1]) / n,
        "caption_acc": float(sums[4] / sums[5].clamp(min=1)),
    }
    if m.mapper is not None:
        metrics["generation"] = float(sums[2]) / n
    if text.shape[0]:
        metrics["contrastive"] = float(contrastive_loss(text, image, m.logit_scale))
        scores = text.float() @ image.float().T
        metrics.update({f"R@{k}": v for k, v in recall_at_k(scores).items()})
    return metrics
