"""``generate_batch``: several prompts decoded together (left padding, an attention mask, per-row positions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..settings import GenerationSettings
from .events import GenerationOutput, Notice
from .limits import check_settings, context_length, image_positions, too_long
from .loop import DecodeLoop, Row, fresh_seed
from .prompt import (
    ImageSegment,
    Piece,
    Prompt,
    TokenIds,
    Turn,
    VisionCache,
    dialogue_pieces,
    encode_pieces,
    normalize_message,
)
from .stream import TextStream

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from ..pipeline import Pipeline


def generate_batch(
    pipeline: Pipeline,
    prompts: Sequence[Sequence[str | Image.Image | ImageSegment | TokenIds]],
    settings: GenerationSettings | None = None,
    *,
    dialogue: bool = False,
) -> list[GenerationOutput]:
    """Decode several prompts together (left padding, attention mask, per-row positions).

    ``prompts``: each a list of str and images in order, and ``TokenIds`` for exact token prompts (no template unless
    ``dialogue``: then each prompt is one user turn of the model's dialogue template, text and images). Under greedy
    decoding each output equals the unbatched one.
    """
    settings = settings or GenerationSettings.for_model(pipeline.config)
    check_settings(pipeline, settings)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    m, cfg = pipeline.model, pipeline.config
    stops = settings.stop_strings if settings.stop_strings is not None else cfg.dialogue.stop_strings
    encoded: list[Prompt] = []
    rows: list[Row] = []
    budget = context_length(pipeline) - settings.max_new_tokens - image_positions(pipeline, settings)
    for i, p in enumerate(prompts):
        pieces: Sequence[Piece]
        if dialogue:  # one user turn of the dialogue template: text and images (token ids are for exact prompts)
            pieces = dialogue_pieces(
                [Turn("user", normalize_message(p, name=f"prompts[{i}]"))], cfg.dialogue, m.image_token_ids
            )
        else:
            pieces = normalize_message(p, name=f"prompts[{i}]", allow_token_ids=True)
        prompt = encode_pieces(pipeline.tokenizer, pieces, cfg.n_visual_tokens)
        if len(prompt) > budget:
            raise too_long(pipeline, settings, len(prompt), f"prompts[{i}]")
        encoded.append(prompt)
        rows.append(
            Row(
                exclude=set(),
                stream=TextStream(pipeline.tokenizer, stops),
                images=[s.image for s in prompt.images()],
            )
        )
    seed = settings.seed if settings.seed is not None else fresh_seed()
    cache = VisionCache()
    with torch.no_grad():
        width = max(len(p) for p in encoded)
        embeds = torch.zeros(len(encoded), width, m.hidden_size, device=m.device, dtype=m.dtype)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for i, p in enumerate(encoded):
            embeds[i, width - len(p) :] = p.embed(m, cache)
            mask[i, width - len(p) :] = 1
        loop = DecodeLoop(pipeline, settings, rows, seed=seed)
        notices: list[list[str]] = [[] for _ in rows]
        for b, ev in loop.run(embeds, mask):
            if isinstance(ev, Notice):
                notices[b].append(ev.text)
    return [
        GenerationOutput(r.segments, r.tokens, r.reason or "stopped", seed, n)
        for r, n in zip(rows, notices, strict=True)
    ]
