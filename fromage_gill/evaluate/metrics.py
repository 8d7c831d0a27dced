"""Ranking metrics: R@k, MRR and VisDial's NDCG (the challenge's definition, as the FROMAGe notebook copies it).

A *rank* is 1-based: the position of the ground truth when candidates are sorted by score, best first; ties keep
the candidates' order (a stable sort), so a tied ground truth ranks after the candidates listed before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rank_of(scores: torch.Tensor, target: int) -> int:
    """1-based rank of ``target`` among ``scores`` (C,), higher is better; ties go to the earlier candidate."""
    if not 0 <= target < scores.shape[-1]:
        raise ValueError(f"target {target} is not one of the {scores.shape[-1]} candidates")
    order = torch.argsort(scores, descending=True, stable=True)
    return int((order == target).nonzero()[0, 0]) + 1


def recall_at(ranks: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"R@k": % of examples whose ground truth ranks within the top k}."""
    if not ranks:
        return {}
    return {f"R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in ks}


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    return sum(1.0 / r for r in ranks) / len(ranks) if ranks else float("nan")


def ndcg(scores: torch.Tensor, relevance: torch.Tensor) -> float:
    """VisDial NDCG of one round: ``scores`` (C,) of the model, ``relevance`` (C,) dense annotations. Like the
    challenge's code, the sum runs over the top K of the model's ranking, K = the number of relevant options,
    against the top K of the ideal ranking (discounts log2(i + 1), i 1-based)."""
    relevance = relevance.float()
    k = int((relevance != 0).sum())
    if k == 0:
        return float("nan")
    order = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    best = torch.argsort(relevance, descending=True, stable=True)[:k]
    discounts = torch.log2(torch.arange(k, dtype=torch.float32) + 2)
    return float((relevance[order] / discounts).sum() / (relevance[best] / discounts).sum())
