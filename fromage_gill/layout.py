"""The sequence layout: where image embeddings and the new image tokens go among text tokens, for training and
inference alike.

A row is a list of pieces: token ids (ints), ``Context(ids)`` (tokens read but never targets) and ``Visual(i)``
markers that stand for the ``n_visual_tokens`` embeddings of image ``i``. ``layout`` turns rows into right-padded
ids, the attention mask, the labels (visual, context, pad and special positions masked) and where each visual slot
takes its embedding from; ``splice_visual`` puts the image embeddings there (``GroundedLM.forward`` calls it, and
so does a chat prompt's ``Prompt.embed``). Right padding keeps every row's positions 0..len-1, as at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # a label the losses skip (torch's cross_entropy default)


@dataclass(frozen=True)
class Visual:
    image: int  # index into the batch's images


@dataclass(frozen=True)
class Context:
    ids: tuple[int, ...]  # token ids the LM reads but is not trained to predict (a captioning prompt)


@dataclass
class Layout:
    input_ids: torch.Tensor  # (B, T); 0 at visual slots, pad id after the end
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) next-token targets, IGNORE_INDEX where masked
    visual_slot: torch.Tensor  # (B, T) index into the flattened (N * n_visual, d) visual embeddings, or -1


Piece = int | Visual | Context


def _width(piece: Piece, n_visual: int) -> int:
    return n_visual if isinstance(piece, Visual) else len(piece.ids) if isinstance(piece, Context) else 1


def layout(rows: Sequence[Sequence[Piece]], *, n_visual: int, pad_id: int, ignore_ids: frozenset[int]) -> Layout:
    length = max(sum(_width(p, n_visual) for p in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    slot = torch.full((len(rows), length), -1, dtype=torch.long)
    unsupervised = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, row in enumerate(rows):
        t = 0
        for piece in row:
            if isinstance(piece, Visual):
                slot[b, t : t + n_visual] = torch.arange(piece.image * n_visual, (piece.image + 1) * n_visual)
                ids[b, t : t + n_visual] = 0
                t += n_visual
            elif isinstance(piece, Context):
                ids[b, t : t + len(piece.ids)] = torch.tensor(piece.ids, dtype=torch.long)
                unsupervised[b, t : t + len(piece.ids)] = True
                t += len(piece.ids)
            else:
                ids[b, t] = piece
                t += 1
        mask[b, :t] = 1
    labels = mask_labels(ids, mask, ignore_ids, keep=(slot >= 0) | unsupervised)
    return Layout(ids, mask, labels, slot)


def mask_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    ignore_ids: set[int] | frozenset[int],
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T) ids -> labels with padding and the ``ignore_ids`` (BOS/EOS/pad) set to IGNORE_INDEX; ``keep`` (B, T)
    bool marks positions that are never targets (visual tokens)."""
    labels = input_ids.clone()
    drop = attention_mask == 0
    for i in ignore_ids:
        drop |= input_ids == i
    if keep is not None:
        drop |= keep
    return labels.masked_fill(drop, IGNORE_INDEX)


def splice_visual(embeds: torch.Tensor, visual: torch.Tensor | None, visual_slot: torch.Tensor | None) -> torch.Tensor:
    """The one place image embeddings enter the token sequence: (B, T, d) token embeddings with every visual slot
    (``visual_slot >= 0``) replaced by its row of the flattened ``visual`` (N, n_visual, d)."""
    if visual is None or visual_slot is None or not (visual_slot >= 0).any():
        return embeds
    flat = visual.reshape(-1, visual.shape[-1]).to(device=embeds.device, dtype=embeds.dtype)  # (N * n_visual, d)
    is_vis = (visual_slot >= 0).to(embeds.device)
    picked = flat[visual_slot.clamp(min=0).to(flat.device)]  # (B, T, d)
    return torch.where(is_vis[..., None], picked, embeds)


def caption_rows(
    captions: list[list[int]],
    *,
    bos_id: int | None,
    concat: bool,
    prompts: list[list[int]] | None = None,
    histories: list[list[int]] | None = None,
) -> list[list[Piece]]:
    """[Visual(i); BOS; prompt_i; caption_i] (the prompt read, not predicted; most data has none); with ``concat``
    (FROMAGe/GILL's interleaving, 50% of steps) each row is followed by the next example's image, prompt and
    caption: [Visual(i); BOS; prompt_i; caption_i; Visual(j); BOS; prompt_j; caption_j]. A row with a history
    (earlier turns, read and not predicted) is laid out as a chat lays out a later turn's image:
    [BOS; history_i; Visual(i); prompt_i; caption_i]."""
    bos = [bos_id] if bos_id is not None else []
    prompts = prompts or [[] for _ in captions]
    histories = histories or [[] for _ in captions]

    def row(i: int, cap: list[int], p: list[int], h: list[int]) -> list[Piece]:
        prompt: list[Piece] = [Context(tuple(p))] if p else []
        if h:
            return [*bos, Context(tuple(h)), Visual(i), *prompt, *cap]
        return [Visual(i), *bos, *prompt, *cap]

    rows = [row(i, *parts) for i, parts in enumerate(zip(captions, prompts, histories, strict=True))]
    if concat and len(rows) > 1:
        rows = [rows[i] + rows[(i + 1) % len(rows)] for i in range(len(rows))]
    return rows


def retrieval_rows(
    captions: list[list[int]],
    *,
    bos_id: int | None,
    image_token_ids: list[int],
    histories: list[list[int]] | None = None,
) -> tuple[list[list[Piece]], list[int]]:
    """[BOS; caption; [RET]] or [BOS; caption; [IMG0..r-1]], and the position of the first image token per row.
    A row with a history reads it first, not predicted: [BOS; history; caption; [IMG0..r-1]]."""
    bos = [bos_id] if bos_id is not None else []
    histories = histories or [[] for _ in captions]
    rows: list[list[Piece]] = [
        [*bos, *([Context(tuple(h))] if h else []), *cap, *image_token_ids]
        for cap, h in zip(captions, histories, strict=True)
    ]
    return rows, [len(bos) + len(h) + len(cap) for cap, h in zip(captions, histories, strict=True)]
