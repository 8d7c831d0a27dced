"""The decode loop: B rows decoded together from a prefilled (or empty) KV cache, one token per step.

Each step the image-token rules and the sampler (``sampling.py``, or a strategy of ``decoding.py``) pick the next
token from the last logits, and it is fed back with the cache. Stops: EOS, a stop string of the dialogue template
(e.g. ``"\\nQ:"``, never shown), ``max_new_tokens``, or the stop event. When ``[RET]`` (FROMAGe) or ``[IMG0]`` (GILL)
is chosen, all r image tokens are fed in one forward and their hidden states go to the ``ImageResolver``; text
then continues after the image, up to ``max_images`` per turn. Finished rows leave the batch (and the cache).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

import torch
from PIL import Image

from ..backbones import pad_token_id
from ..settings import GenerationSettings
from .decoding import STRATEGIES, StepState
from .events import EndReason, Event, ImagePending, ImageResult, TextDelta, TurnEnd
from .limits import image_paths
from .prompt import ImageSegment
from .resolve import ImageResolver
from .sampling import image_token_logits, sample
from .stream import TextStream, published_cut, take_token

if TYPE_CHECKING:  # types only: the pipeline module imports the whole package
    from transformers.cache_utils import Cache

    from ..model import LMOutput
    from ..pipeline import Pipeline


def fresh_seed() -> int:
    return secrets.randbits(62)


@dataclass
class Row:
    exclude: set[int]  # index ids not to retrieve again (images already in the conversation)
    stream: TextStream
    images: list[Image.Image] = field(default_factory=list)  # prompt images (for decoding strategies)
    segments: list[str | ImageSegment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the answer's tokens: text (trimmed at a stop) + image tokens
    run_start: int = 0  # index in ``tokens`` where the current text run starts
    fed: list[int] = field(default_factory=list)  # tokens fed to the LM after the prompt (cache bookkeeping)
    n_sampled: int = 0
    n_images: int = 0
    reason: EndReason | None = None


class DecodeLoop:
    """Decodes B rows together from a prefilled or empty cache. ``run`` yields ``(row, event)`` pairs."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: GenerationSettings,
        rows: list[Row],
        *,
        seed: int,
        cache: Cache | None = None,
        n_past: int = 0,
        stop_event: threading.Event | None = None,
    ):
        self.p = pipeline
        self.m = pipeline.model
        self.s = settings
        self.rows = rows
        self.seed = seed
        self.cache = cache
        self.n_pos = torch.full((len(rows),), n_past, dtype=torch.long)
        self.mask: torch.Tensor | None = None  # (B, L) only once something is padded
        self.n_cached = n_past
        self.stop_event = stop_event or threading.Event()
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.active = list(range(len(rows)))
        tok = pipeline.tokenizer
        self.eos = tok.eos_token_id if settings.stop_at_eos else None
        self.pad = pad_token_id(tok)
        self.image_ids = list(self.m.image_token_ids)
        self._text_rows = cast(torch.nn.Embedding, self.m.lm.get_input_embeddings())  # the LM's rows for text tokens
        can_ret, can_gen = image_paths(pipeline, settings)
        self.images_on = settings.mode != "text" and (can_ret or can_gen)
        self.resolver = ImageResolver(
            pipeline, settings, seed=seed, can_retrieve=can_ret, can_generate=can_gen, stop_event=self.stop_event
        )
        self.style: Literal["fromage", "gill"] = "fromage" if pipeline.config.kind == "fromage" else "gill"
        # The published answer cut: decoding ends at the first newline (leading ones skipped, as the reference
        # strips them), each text run is shown once it ends, cut after its first full stop (_end_text_run)
        self.published = settings.answer_style == "published"
        if self.published:
            for row in rows:
                row.stream.stops = (*row.stream.stops, "\n")
                row.stream.skip_leading = "\n"
        factory = STRATEGIES[settings.decoding]
        self.choose = factory(pipeline, settings, [r.images for r in rows]) if factory else None

    # -- LM ---------------------------------------------------------------------------------------------------

    def _forward(self, embeds: torch.Tensor, new_mask: torch.Tensor) -> LMOutput:
        """Run the LM on (B, T, d) embeddings of the active rows; positions follow each row's real tokens."""
        new_mask = new_mask.to(torch.long)
        pos = self.n_pos[self.active][:, None] + new_mask.cumsum(1) - 1
        padded = bool((new_mask == 0).any())
        if padded and self.mask is None:
            self.mask = torch.ones(len(self.active), self.n_cached, dtype=torch.long)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.m.forward_lm(
            embeds, self.mask, position_ids=pos.clamp(min=0), past_key_values=self.cache, use_cache=True, logits="last"
        )
        self.cache = cast("Cache | None", out.past_key_values)  # the LM's transformers Cache, given or made
        self.n_pos[self.active] += new_mask.sum(1)
        self.n_cached += embeds.shape[1]
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if int(ids.max()) < self.m.n_base:  # the common case, text tokens only: the LM's own rows, no masking
            rows = self._text_rows
            return rows(ids.to(rows.weight.device)).to(device=self.m.device, dtype=self.m.dtype)
        return self.m.embed_tokens(ids.to(self.m.device))

    def _drop_finished(self) -> list[int] | None:
        """Remove finished rows from the batch (and the cache); returns the kept batch positions, None if all."""
        keep = [j for j, b in enumerate(self.active) if self.rows[b].reason is None]
        if len(keep) == len(self.active):
            return None
        self.active = [self.active[j] for j in keep]
        if keep and self.cache is not None:
            idx = torch.tensor(keep, dtype=torch.long)
            self.cache.batch_select_indices(idx.to(self.m.lm_device))
            if self.mask is not None:
                self.mask = self.mask[idx]
        return keep

    # -- one turn -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, embeds: torch.Tensor, new_mask: torch.Tensor) -> Iterator[tuple[int, Event]]:
        """``embeds``: (B, T, d) prompt positions not in the cache yet (left-padded); ``new_mask``: (B, T)."""
        out = self._forward(embeds, new_mask)
        last_mask = new_mask
        while self.active:
            if self.stop_event.is_set():
                for b in self.active:
                    yield from self._finish(b, "stopped")
                break
            next_tokens = self._choose(self._rule_logits(out), out, last_mask)
            feeds: dict[int, list[int]] = {}  # row -> the tokens it feeds next (all r image tokens after [IMG0])
            for j, b in enumerate(self.active):
                feed = yield from self._take(b, int(next_tokens[j]))
                if feed is not None:
                    feeds[b] = feed
            self._drop_finished()
            if not self.active:
                break
            out, last_mask = self._feed(feeds)
            yield from self._resolve_images(out, feeds)
            keep = self._drop_finished()
            if keep and len(keep) < out.hidden.shape[0]:  # the next step reads the kept rows' logits
                out = dataclasses.replace(out, logits=self._logits(out)[keep], hidden=out.hidden[keep])
                last_mask = last_mask[keep]

    @staticmethod
    def _logits(out: LMOutput) -> torch.Tensor:
        assert out.logits is not None, "the loop's forwards compute the last position's logits"
        return out.logits

    def _rule_logits(self, out: LMOutput) -> torch.Tensor:
        """(B', V) next-token logits of the active rows after the image-token rules (images allowed per row)."""
        logits = self._logits(out)[:, -1].float()
        allow = torch.tensor(
            [
                self.images_on
                and self.rows[b].n_images < self.s.max_images
                and self.rows[b].n_sampled >= self.s.min_word_tokens
                for b in self.active
            ]
        )
        return image_token_logits(
            logits,
            self.image_ids,
            allow_image=allow.to(logits.device),
            style=self.style,
            ret_scale_factor=self.s.ret_scale_factor,
            gen_scale_factor=self.s.gen_scale_factor,
            bias=self.s.image_logit_bias,
        )

    def _take(self, b: int, tok: int) -> Generator[tuple[int, Event], None, list[int] | None]:
        """Row ``b`` takes the chosen token: its events, and what it feeds next (None once the row ended)."""
        row = self.rows[b]
        if self.eos is not None and tok == self.eos:
            yield from self._finish(b, "eos")
            return None
        row.n_sampled += 1
        if tok == self.image_ids[0]:
            yield from self._end_text_run(b)
            yield b, ImagePending(row.n_images)
            return list(self.image_ids)
        if take_token(row.stream, row.tokens, row.run_start, tok):
            yield from self._finish(b, "turn_boundary")
            return None
        delta = "" if self.published else row.stream.delta()
        if delta:
            yield b, TextDelta(delta)
        if row.n_sampled >= self.s.max_new_tokens:
            yield from self._finish(b, "max_new_tokens")
            return None
        return [tok]

    def _feed(self, feeds: dict[int, list[int]]) -> tuple[LMOutput, torch.Tensor]:
        """One forward of every active row's feed, left-padded to the longest; the output and its (B', W) mask."""
        width = max(len(feeds[b]) for b in self.active)
        ids = torch.full((len(self.active), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(self.active), width, dtype=torch.long)
        for j, b in enumerate(self.active):
            f = feeds[b]
            ids[j, width - len(f) :] = torch.tensor(f)
            mask[j, width - len(f) :] = 1
            self.rows[b].fed += f
        return self._forward(self._embed(ids), mask), mask

    def _resolve_images(self, out: LMOutput, feeds: dict[int, list[int]]) -> Iterator[tuple[int, Event]]:
        """The rows that fed image tokens get their image (``ImageResolver``), then go on or end."""
        r = len(self.image_ids)
        for j, b in enumerate(self.active):
            if feeds[b][0] != self.image_ids[0]:
                continue
            row = self.rows[b]
            row.tokens += self.image_ids
            row.run_start = len(row.tokens)
            hidden = out.hidden[j, out.hidden.shape[1] - r :]  # (r, d) at [IMG0..r-1], the last r positions
            for event in self.resolver.resolve(row.n_images, hidden, row.segments, row.exclude):
                if isinstance(event, ImageResult):
                    row.segments.append(event)
                yield b, event
            row.n_images += 1
            if self.stop_event.is_set():
                yield from self._finish(b, "stopped")
            elif not self.s.text_after_images or (self.published and row.n_images >= self.s.max_images):
                yield from self._finish(b, "image")
            elif row.n_sampled >= self.s.max_new_tokens:
                yield from self._finish(b, "max_new_tokens")

    def _choose(self, logits: torch.Tensor, out: LMOutput, last_mask: torch.Tensor) -> torch.Tensor:
        if self.choose is None:
            return sample(
                logits, temperature=self.s.temperature, top_p=self.s.top_p, top_k=self.s.top_k, generator=self.generator
            )
        assert self.cache is not None, "a strategy chooses after the prompt's forward, which made the cache"
        state = StepState(
            model=self.m,
            logits=logits,
            hidden=out.hidden,
            new_mask=last_mask,
            past_key_values=self.cache,
            attention_mask=self.mask,
            next_positions=self.n_pos[self.active].clone(),
            generated=[list(self.rows[b].tokens) for b in self.active],
            generator=self.generator,
            settings=self.s,
            rows=list(self.active),
        )
        return self.choose(state)

    def _end_text_run(self, b: int, *, last: bool = False) -> Iterator[tuple[int, Event]]:
        row = self.rows[b]
        delta = row.stream.delta(final=True)
        text = row.stream.text
        if self.published:  # the reference's cut; the text after the answer's last image is dropped
            start, end = (0, 0) if last and row.n_images else published_cut(text)
            row.tokens[row.run_start :] = row.stream.cut(end) if end else []
            # decoded with the space clean-up that was transformers' default then (" ." -> "."), which the
            # published history then re-tokenizes; it removes spaces only, so it commutes with the cut
            delta = text = self.p.tokenizer.clean_up_tokenization(text[start:end])
        if delta:
            yield b, TextDelta(delta)
        if text:
            row.segments.append(text)
        row.stream = TextStream(row.stream.tok, row.stream.stops)

    def _finish(self, b: int, reason: EndReason) -> Iterator[tuple[int, Event]]:
        row = self.rows[b]
        if row.reason is not None:
            return
        yield from self._end_text_run(b, last=True)
        row.reason = reason
        yield b, TurnEnd(reason, self.seed)

    def finish_silently(self, b: int, reason: EndReason) -> None:
        """End a row without events (the consumer went away): keep what was generated."""
        for _ in self._finish(b, reason):
            pass
