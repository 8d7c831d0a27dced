"""Resolving an image slot: the r hidden states at [RET] / [IMG0..r-1] become a retrieved or a generated image.

GILL's decision head picks the path in mode ``auto`` (argmax; generation on a tie, as published) and only that path
runs. Retrieval searches ``pipeline.index`` with ``text_embedding`` of the first image token, excluding images
already in the conversation; generation sends ``map_to_diffusion`` of the r states to Stable Diffusion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..backbones import pad_token_id
from ..layout import Piece, layout, retrieval_rows
from ..settings import MAX_SEED, GenerationSettings
from .diffusion import GeneratedImages, image_generator
from .events import Event, ImageProgress, ImageResult, Notice
from .prompt import Decision, ImageSegment

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from ..pipeline import Pipeline


@torch.no_grad()
def image_token_states(pipeline: Pipeline, texts: Sequence[str]) -> torch.Tensor:
    """(N, r, d) last-layer LM hidden states at the r image tokens ([RET] or [IMG0..r-1]) appended to each text,
    laid out as training lays out a caption (``BOS text [IMG0..r-1]``): what ``text_embedding`` (retrieval) and
    ``map_to_diffusion`` (generation) read."""
    m, tok = pipeline.model, pipeline.tokenizer
    ids = tok(list(texts), add_special_tokens=False).input_ids
    bos_id = tok.bos_token_id if isinstance(tok.bos_token_id, int) else None  # transformers types it loosely
    token_rows, first = retrieval_rows(ids, bos_id=bos_id, image_token_ids=m.image_token_ids)
    rows: list[list[Piece]] = [list(row) for row in token_rows]  # token ids only: no image in a caption row
    lay = layout(rows, n_visual=m.config.n_visual_tokens, pad_id=pad_token_id(tok), ignore_ids=frozenset())
    hidden = m(lay.input_ids, lay.attention_mask, logits="none").hidden
    r = len(m.image_token_ids)
    return torch.stack([hidden[i, f : f + r] for i, f in enumerate(first)])


class ImageResolver:
    """Resolves the image slots of one turn's rows (``seed``: the turn's; a generated image's seed follows it)."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: GenerationSettings,
        *,
        seed: int,
        can_retrieve: bool,
        can_generate: bool,
        stop_event: threading.Event,
    ):
        self.p, self.m, self.s = pipeline, pipeline.model, settings
        self.seed = seed
        self.can_retrieve, self.can_generate = can_retrieve, can_generate
        self.stop_event = stop_event

    def resolve(
        self, slot: int, hidden: torch.Tensor, answer: Sequence[str | ImageSegment], exclude: set[int]
    ) -> Iterator[Event]:
        """``hidden``: (r, d) at the image tokens; ``answer``: the turn's segments so far; ``exclude``: index ids not
        to show again (a retrieved id is added). Yields an ``ImageResult`` (after an ``ImageProgress`` per denoising
        step when generated) and maybe a ``Notice``, a ``Notice`` alone (no image could be had), or nothing more
        once interrupted."""
        m, s = self.m, self.s
        decision = None
        if m.decision is not None:
            probs = m.decide(hidden[:1])[0].tolist()
            decision = Decision(float(probs[0]), float(probs[1]))
        if s.mode in ("retrieve", "generate"):
            path = s.mode
        elif self.can_retrieve and self.can_generate and decision is not None:
            path = "retrieve" if decision[1] > decision[0] else "generate"
        else:
            path = "retrieve" if self.can_retrieve else "generate"
        if s.image_query == "answer":
            hidden = self._answer_states(answer, hidden)
        if path == "retrieve":
            yield from self._retrieve(hidden, slot, decision, exclude)
        else:
            yield from self._generate(hidden, slot, decision)

    def _answer_states(self, answer: Sequence[str | ImageSegment], hidden: torch.Tensor) -> torch.Tensor:
        """The image tokens' states after the answer's words since the previous image alone (``image_query``)."""
        words = []
        for seg in reversed(answer):
            if not isinstance(seg, str):
                break
            words.insert(0, seg)
        text = "".join(words).strip()
        if not text:  # the image comes first: there is nothing but the dialogue to read it from
            return hidden
        return image_token_states(self.p, [text])[0].to(hidden.device, hidden.dtype)

    def _retrieve(self, hidden: torch.Tensor, slot: int, decision: Decision | None, exclude: set[int]) -> list[Event]:
        index = self.p.index
        assert index is not None, "the retrieve path is taken only with an index (limits.image_paths)"
        query = self.m.text_embedding(hidden[:1]).cpu()  # (1, D), L2-normalised
        found = index.search(query, self.s.retrieval_candidates, exclude=set(exclude) or None)
        ids = [int(i) for i in found.ids[0] if int(i) >= 0]
        scores = {int(i): float(sc) for i, sc in zip(found.ids[0], found.scores[0], strict=True)}
        got = index.fetch_first(ids) if ids else None
        if got is None:
            return [Notice(f"image {slot + 1}: none of the {len(ids)} best matches in the index could be loaded")]
        idx, image = got
        record = index.record(idx) or {}
        exclude.add(int(idx))
        return [
            ImageResult(
                image=image,
                source="retrieved",
                score=scores.get(int(idx)),
                caption=record.get("caption"),
                url=record.get("url") or record.get("path"),
                index_id=int(idx),
                decision=decision,
                slot=slot,
            )
        ]

    def _generate(self, hidden: torch.Tensor, slot: int, decision: Decision | None) -> Iterator[Event]:
        m, s = self.m, self.s
        # The first image's seed is the turn's own: the seed shown under it, typed as the Seed setting, makes the
        # same answer and the same image again (a later image of the turn follows it: seed + slot).
        seed = (self.seed + slot) % MAX_SEED
        prompt_embeds = m.map_to_diffusion(hidden[None])  # (1, Q, D)
        out = None
        for step in image_generator(self.p).steps(
            prompt_embeds,
            guidance_scale=s.guidance_scale,
            num_inference_steps=s.num_inference_steps,
            seed=seed,
            interrupt=self.stop_event.is_set,
        ):
            if isinstance(step, GeneratedImages):
                out = step
            else:
                yield ImageProgress(slot, step, s.num_inference_steps)
        if out is None or out.interrupted:
            return
        image = out.images[0]
        # How well the picture matches what the model asked for, in the model's own retrieval space.
        feats = m.encode_images(m.vision.processor([image]))
        score = float((m.image_embedding(feats) * m.text_embedding(hidden[:1])).sum())
        events: list[Event] = [
            ImageResult(image=image, source="generated", score=score, decision=decision, seed=seed, slot=slot)
        ]
        if out.nsfw[0]:
            events.append(Notice(f"image {slot + 1}: the safety checker replaced the generated image"))
        yield from events
