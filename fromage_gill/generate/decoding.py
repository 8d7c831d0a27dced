"""Decoding strategies of the generation engine, known statically (``settings.DECODINGS`` names them).

A strategy is ``factory(pipeline, settings, images_per_row)``, called once per turn, returning
``choose(state: StepState) -> (B,) token ids``; "default" (None) is the sampler in ``sampling.py``. "magic" and
"contrastive" adapt MAGIC's rule (``fromage_gill.magic``) to the engine's KV-cached loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..config import ConfigError, MagicDecoding
from ..magic.clip import attached_clip
from ..magic.search import (
    ClipLogitsFn,
    continuation_ids,
    degeneration_penalty,
    magic_choice,
    resolve_decoding,
    top_candidates,
)
from ..settings import DECODINGS, GenerationSettings

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from transformers.cache_utils import Cache

    from ..model import GroundedLM
    from ..pipeline import Pipeline


@dataclass
class StepState:
    """What a decoding strategy sees at each step. It returns the ``(B,)`` next tokens; it may run the LM on
    ``past_key_values`` (e.g. to score candidates) but must leave the cache as it found it (``crop`` back)."""

    model: GroundedLM
    logits: torch.Tensor  # (B, V) float32 after the image-token rules
    hidden: torch.Tensor  # (B, T, d) last-layer hidden states of the last forward
    new_mask: torch.Tensor  # (B, T) 1 for the real positions of the last forward
    past_key_values: Cache
    attention_mask: torch.Tensor | None  # (B, L) over the cache, None when nothing is padded
    next_positions: torch.Tensor  # (B,) position id the next token gets
    generated: list[list[int]]  # per row: the tokens of this turn so far
    generator: torch.Generator
    settings: GenerationSettings
    rows: list[int]  # which prompt each batch row is (finished rows leave the batch)


Choose = Callable[[StepState], torch.Tensor]  # a step's state -> (B,) next tokens
DecodingFactory = Callable[["Pipeline", GenerationSettings, list[list[Image.Image]]], Choose]


# Defaults for a FROMAGe/GILL conversation: the published open-ended (story) setting, not the caption one.
ENGINE_DEFAULTS = MagicDecoding(k=5, alpha=0.6, beta=0.15)


def engine_settings(decoding: str, settings: GenerationSettings) -> MagicDecoding:
    """MagicDecoding for the engine's ``GenerationSettings``: ``decoding_options`` may set k, alpha, beta,
    clip_text_max_tokens; ``max_new_tokens`` is the engine's own."""
    options = dict(settings.decoding_options or {})
    known = {"k", "alpha", "beta", "clip_text_max_tokens"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"decoding_options {unknown} are not {decoding} options; known: {', '.join(sorted(known))}")
    base = dataclasses.replace(ENGINE_DEFAULTS, max_new_tokens=settings.max_new_tokens)
    try:
        base = dataclasses.replace(base, **options)
    except (ConfigError, TypeError) as e:
        raise ValueError(f"decoding_options: {e}") from None
    return resolve_decoding(decoding, base)


def engine_strategy(decoding: str) -> DecodingFactory:
    """MAGIC's rule as a decoding strategy (``STRATEGIES``): ``factory(pipeline, settings, images_per_row)``
    returns ``choose(state) -> (B,) tokens``. Each step scores the k candidates of every row in one batched LM
    forward (cache repeated k ways, then cropped back as the engine requires) and one CLIP batch per row.

    The degeneration penalty compares with the hidden states the engine hands over during the turn: the positions
    of this turn's prompt that were not already cached, and every token since. On a first turn that is the whole
    prefix, as in the paper; in a follow-up turn the earlier turns, served from the KV cache, are not included."""

    def factory(pipeline: Pipeline, settings: GenerationSettings, images_per_row: list[list[Image.Image]]) -> Choose:
        s = engine_settings(decoding, settings)
        model, tokenizer = pipeline.model, pipeline.tokenizer
        guides: list[ClipLogitsFn] = []  # per prompt row, when CLIP steers (beta > 0)
        if s.beta > 0:
            guide = attached_clip(pipeline)
            for images in images_per_row:
                if not images:
                    raise ValueError(
                        "magic decoding (beta > 0) needs an image in the conversation to steer "
                        "towards; add one, or use decoding='contrastive' for text only"
                    )
                guides.append(guide.logits_fn(images))
        history: dict[int, torch.Tensor] = {}  # prompt row -> (T, d) hidden states seen so far

        def decode(ids: list[int]) -> str:
            text = tokenizer.decode(ids, skip_special_tokens=True)  # image tokens add no words for CLIP
            assert isinstance(text, str), "one sequence of ids decodes to one text"
            return text

        @torch.no_grad()
        def choose(state: StepState) -> torch.Tensor:
            b, k = state.logits.shape[0], min(s.k, state.logits.shape[-1])
            for j, row in enumerate(state.rows):
                new = state.hidden[j][state.new_mask[j].to(state.hidden.device) == 1].float()
                history[row] = new if row not in history else torch.cat([history[row], new.to(history[row].device)])
            top_logits, top_ids, probs = top_candidates(state.logits, k)  # (B, k) each

            cache = state.past_key_values
            cache.batch_repeat_interleave(k)
            mask = state.attention_mask
            if mask is not None:
                mask = torch.cat([mask.repeat_interleave(k, 0), torch.ones(b * k, 1, dtype=mask.dtype)], dim=1)
            positions = state.next_positions.repeat_interleave(k)[:, None]
            out = model.forward_lm(
                model.embed_tokens(top_ids.reshape(b * k, 1).to(model.device)),
                mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits="none",
            )
            cache.crop(-1)  # leave the cache as the engine gave it
            cache.batch_select_indices(torch.arange(b, device=model.lm_device) * k)
            cand_hidden = out.hidden[:, -1].view(b, k, -1)

            chosen = []
            for j, row in enumerate(state.rows):
                penalty = degeneration_penalty(cand_hidden[j], history[row]) if s.alpha > 0 else torch.zeros(k)
                clip = None
                if s.beta > 0:
                    texts = [
                        decode(continuation_ids(state.generated[j], v, s.clip_text_max_tokens))
                        for v in top_ids[j].tolist()
                    ]
                    clip = guides[row](texts)
                _, best = magic_choice(top_logits[j], probs[j], penalty, clip, s.alpha, s.beta)
                chosen.append(top_ids[j, best])
            return torch.stack(chosen)

        return choose

    return factory


STRATEGIES: dict[str, DecodingFactory | None] = {
    "default": None,
    "magic": engine_strategy("magic"),
    "contrastive": engine_strategy("contrastive"),
}
assert tuple(STRATEGIES) == DECODINGS, "settings.DECODINGS must name exactly the strategies defined here"
