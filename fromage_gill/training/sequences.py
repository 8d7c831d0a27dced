"""Laying out training sequences: captions, visual tokens and image tokens in one padded batch.

A row is a list of pieces: token ids (ints) and ``Visual(i)`` markers that stand for the ``n_visual_tokens``
embeddings of image ``i``. ``layout`` turns rows into right-padded ids, the attention mask, the labels (visual,
pad and special positions masked) and where each visual slot takes its embedding from; ``embed_layout`` builds the
LM input embeddings from that. Right padding keeps every row's positions 0..len-1, as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .losses import mask_labels


@dataclass(frozen=True)
class Visual:
    image: int  # index into the batch's images


@dataclass
class Layout:
    input_ids: torch.Tensor  # (B, T); 0 at visual slots, pad id after the end
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE_INDEX where masked
    visual_slot: torch.Tensor  # (B, T) index into the flattened (N * n_visual, d) visual embeddings, or -1


def layout(rows: list[list[int | Visual]], *, n_visual: int, pad_id: int, ignore_ids: frozenset[int]) -> Layout:
    length = max(sum(n_visual if isinstance(p, Visual) else 1 for p in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    slot = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for piece in row:
            if isinstance(piece, Visual):
                slot[b, t:t + n_visual] = torch.arange(piece.image * n_visual, (piece.image + 1) * n_visual)
                ids[b, t:t + n_visual] = 0
                t += n_visual
            else:
                ids[b, t] = piece
                t += 1
        mask[b, :t] = 1
    labels = mask_labels(ids, mask, ignore_ids, keep=slot >= 0)
    return Layout(ids, mask, labels, slot)


def embed_layout(model, lay: Layout, visual: torch.Tensor | None) -> torch.Tensor:
    """(B, T, d) input embeddings: token embeddings, with the visual slots taken from ``visual`` (N, n, d)."""
    embeds = model.embed_tokens(lay.input_ids)
    if visual is None or not (lay.visual_slot >= 0).any():
        return embeds
    flat = visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)
    is_vis = (lay.visual_slot >= 0).to(embeds.device)
    picked = flat[lay.visual_slot.clamp(min=0).to(flat.device)]  # (B, T, d)
    return torch.where(is_vis[..., None], picked, embeds)


def caption_rows(captions: list[list[int]], *, bos_id: int | None, concat: bool) -> list[list[int | Visual]]:
    """[Visual(i); BOS; caption_i]; with ``concat`` (FROMAGe/GILL's interleaving, 50% of steps) each row is followed
    by the next example's image and caption: [Visual(i); BOS; caption_i; Visual(j); BOS; caption_j]."""
    bos = [bos_id] if bos_id is not None else []
    rows: list[list[int | Visual]] = [[Visual(i), *bos, *cap] for i, cap in enumerate(captions)]
    if concat and len(rows) > 1:
        rows = [rows[i] + rows[(i + 1) % len(rows)] for i in range(len(rows))]
    return rows


def retrieval_rows(captions: list[list[int]], *, bos_id: int | None, image_token_ids: list[int]
                   ) -> tuple[list[list[int]], list[int]]:
    """[BOS; caption; [RET]] or [BOS; caption; [IMG0..r-1]], and the position of the first image token per row."""
    bos = [bos_id] if bos_id is not None else []
    rows = [[*bos, *cap, *image_token_ids] for cap in captions]
    return rows, [len(bos) + len(cap) for cap in captions]
