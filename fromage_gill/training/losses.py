"""The published training losses (FROMAGe / GILL), each a small pure function of tensors.

- captioning: next-token cross-entropy on ``[visual tokens; caption]`` (image, pad and special positions masked);
- retrieval LM: the same cross-entropy on ``[caption; [RET]]`` / ``[caption; [IMG0..r-1]]``, teaching the LM to
  emit the image tokens after a caption;
- contrastive: symmetric InfoNCE between the [RET]/[IMG0] text embedding and the image embedding;
- generation (GILL): per-token L2 distance between the mapper output and the diffusion text encoder's output;
- decision (GILL): cross-entropy of the retrieve-vs-generate head on labelled prompts (trained separately).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import IGNORE_INDEX


@dataclass(frozen=True)
class LossWeights:
    """How the losses add up. GILL runs its caption+[IMG] sequence twice, as a 'retrieval' and a 'generation'
    step, each weighting that cross-entropy by 0.5 (x ret_loss_scale, x gen_loss_scale, both 1.0): computed once
    here, with weight 0.5 + 0.5. FROMAGe's retrieval step weights it by ret_loss_scale = 1.0 too."""

    caption: float = 1.0
    retrieval_lm: float = 1.0
    contrastive: float = 1.0
    generation: float = 1.0

    def __post_init__(self) -> None:
        for name in ("caption", "retrieval_lm", "contrastive", "generation"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t+1]`` from ``logits[:, t]`` over unmasked targets.
    logits (B, T, V), labels (B, T). Zero (with a gradient path) when every target is masked."""
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if not (target != IGNORE_INDEX).any():
        return pred.sum() * 0.0
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) next-token top-1 predictions over unmasked targets."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    return int(((pred == target) & valid).sum()), int(valid.sum())


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``text_emb`` (N, D) matches row i of ``image_emb`` (N, D), every other row is a
    negative. ``logit_scale`` is the log temperature (CLIP's parametrisation). Embeddings are used as given
    (L2-normalised by the model)."""
    logits = logit_scale.exp() * text_emb.float() @ image_emb.float().T  # (N, N)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GILL's generation loss: the Euclidean distance between each of the Q output vectors and the diffusion
    text encoder's, averaged over tokens and examples. pred, target: (N, Q, D)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"mapper output {tuple(pred.shape)} and diffusion text-encoder output {tuple(target.shape)} "
            f"differ: mapper.num_queries/out_dim must match the diffusion text encoder"
        )
    return (pred.float() - target.float()).pow(2).sum(-1).sqrt().mean()


def decision_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the decision head: logits (N, 2) in [generate, retrieve] order, labels (N,) 0/1."""
    return F.cross_entropy(logits.float(), labels)


def recall_at_k(scores: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Text-to-image recall: ``scores`` (N, N) with the match of row i in column i. R@k = share of rows whose match
    ranks among the k best columns (ties count against the match)."""
    correct = scores.diagonal().unsqueeze(1)
    rank = (scores > correct).sum(1) + (scores == correct).sum(1) - 1  # 0 = best
    return {k: float((rank < k).float().mean()) for k in ks}
