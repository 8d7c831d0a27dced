"""The generation engine: interleaved prompts in; streamed text and inline images out, with a KV cache.

Layout (one turn):
1. The prompt (``prompt.py``) is compared with what the conversation's KV cache already holds; the LM runs only on
   the positions after the longest common prefix, so turn 10 costs its new tokens, not the whole history again.
2. Each step: the image-token rules and the sampler (``sampling.py``) pick the next token from the last logits;
   the token is fed back with the cache. Stops: EOS, a stop string of the dialogue template (e.g. ``"\\nQ:"``,
   never shown), ``max_new_tokens``, or ``Chat.stop()``.
3. When ``[RET]`` (FROMAGe) or ``[IMG0]`` (GILL) is chosen, all r image tokens are fed in one forward; their
   hidden states resolve the image: GILL's decision head picks retrieval or generation in mode ``auto`` and only
   that path runs; retrieval searches ``pipeline.index`` with ``text_embedding`` of the first image token,
   excluding images already shown; generation sends ``map_to_diffusion`` of the r hidden states to Stable
   Diffusion (``diffusion.py``). Text generation then continues after the image, up to ``max_images`` per turn.

Events: ``TextDelta``, ``ImagePending`` (an image slot is being resolved), ``ImageResult``, ``Notice`` and
``TurnEnd``. ``Chat`` keeps one conversation (history, vision-feature cache, KV cache); ``generate_batch`` decodes
several prompts together with left padding and equals the unbatched output under greedy decoding.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import logging
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from ..images import load_image
from ..layout import layout, retrieval_rows
from ..settings import MAX_SEED, GenerationSettings
from .decoding import STRATEGIES, StepState
from .prompt import (
    ImageSegment,
    Prompt,
    TokenIds,
    Turn,
    VisionCache,
    dialogue_pieces,
    encode_pieces,
    normalize_message,
)
from .sampling import image_token_logits, sample

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ImagePending:
    slot: int  # index of the image within the turn


@dataclass(frozen=True)
class ImageResult:
    slot: int
    image: Image.Image
    source: Literal["retrieved", "generated"]
    score: float | None = None  # retrieval score, or the generated image's similarity to the request
    caption: str | None = None
    url: str | None = None
    index_id: int | None = None
    decision: tuple[float, float] | None = None  # (p_generate, p_retrieve), GILL only
    seed: int | None = None  # diffusion seed (generated images)

    def to_segment(self) -> ImageSegment:
        return ImageSegment(self.image, self.source, self.score, self.caption, self.url, self.index_id,
                            self.decision, self.seed)


@dataclass(frozen=True)
class Notice:
    text: str


@dataclass(frozen=True)
class TurnEnd:
    reason: Literal["eos", "turn_boundary", "max_new_tokens", "stopped", "image"]
    seed: int


Event = TextDelta | ImagePending | ImageResult | Notice | TurnEnd


@dataclass
class GenerationOutput:
    """One prompt's result from ``generate_batch``."""

    segments: list[str | ImageSegment]
    tokens: list[int]  # the tokens the answer put in the context (text and image tokens)
    reason: str
    seed: int
    notices: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]


# ---------------------------------------------------------------------------------------------- checks


def context_length(pipeline) -> int:
    """Positions the LM can attend over (``max_position_embeddings`` of its config)."""
    cfg = pipeline.model.lm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return 2048


def image_paths(pipeline, settings: GenerationSettings) -> tuple[bool, bool]:
    """(can retrieve, can generate) for this pipeline and mode."""
    can_ret = pipeline.index is not None and settings.mode in ("auto", "retrieve")
    can_gen = pipeline.config.can_generate and pipeline.diffusion is not None and settings.mode in ("auto", "generate")
    return can_ret, can_gen


def check_settings(pipeline, settings: GenerationSettings) -> None:
    """Refuse a mode the pipeline cannot serve, with the fix."""
    name = pipeline.config.name
    if settings.mode == "retrieve" and pipeline.index is None:
        raise ValueError(f"mode='retrieve' needs an image index, and {name} has none loaded (pipeline.index is None): "
                         f"load one (e.g. --index DIR) or use mode='auto' or 'text'")
    if settings.mode == "generate":
        if not pipeline.config.can_generate:
            raise ValueError(f"mode='generate' needs an image generator, and {name} is a {pipeline.config.kind} "
                             f"model (retrieval only): use mode='retrieve', 'auto' or 'text'")
        if pipeline.diffusion is None:
            raise ValueError(f"mode='generate' needs Stable Diffusion, and {name} was loaded without it "
                             f"(load_diffusion_pipeline=False): reload it with the pipeline")


def _image_positions(pipeline, settings: GenerationSettings) -> int:
    """Extra positions the forced [IMG1..r-1] tokens may take in one turn."""
    if settings.mode == "text" or not any(image_paths(pipeline, settings)):
        return 0
    return (pipeline.model.config.num_image_tokens - 1) * settings.max_images


def _too_long(pipeline, settings: GenerationSettings, n_prompt: int, what: str) -> ValueError:
    n_ctx = context_length(pipeline)
    extra = _image_positions(pipeline, settings)
    more = f" + {extra} for image tokens" if extra else ""
    return ValueError(
        f"{what} is {n_prompt} tokens, and with max_new_tokens={settings.max_new_tokens}{more} it needs "
        f"{n_prompt + settings.max_new_tokens + extra} positions, but the LM fits {n_ctx}: at most "
        f"{max(n_ctx - settings.max_new_tokens - extra, 0)} prompt tokens fit (each image takes "
        f"{pipeline.config.n_visual_tokens}). Shorten it or lower max_new_tokens."
    )


def _fresh_seed() -> int:
    return secrets.randbits(62)


# ---------------------------------------------------------------------------------------------- text streaming


class _TextStream:
    """Incremental detokenization of one run of text tokens, holding back text that may begin a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tok = tokenizer
        self.stops = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> None:
        # Decode a small window so that a multi-byte character split over tokens appears once it is complete.
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def find_stop(self) -> int | None:
        """Character index where the first stop string starts, if one has appeared."""
        longest = max((len(s) for s in self.stops), default=0)
        start = max(self.emitted - longest, 0)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def delta(self, final: bool = False) -> str:
        """Text that can be shown now: all of it when ``final``, else all but a suffix that may start a stop string."""
        if final:
            rest = self._decode(self.ids[self._prefix:])
            before = self._decode(self.ids[self._prefix:self._read])
            if len(rest) > len(before):
                self.text += rest[len(before):]
                self._prefix = self._read = len(self.ids)
            end = len(self.text)
        else:
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
            end = len(self.text) - hold
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def truncate(self, at: int) -> None:
        """Forget the text from ``at`` on (a stop string) and anything not decoded yet."""
        self.text = self.text[:at]
        self._prefix = self._read = len(self.ids)
        self.emitted = min(self.emitted, at)

    def cut(self, at: int) -> list[int]:
        """Token ids that spell exactly ``text[:at]``: the longest prefix of the run's tokens that fits, then the
        rest re-tokenized (a stop string may begin inside a token)."""
        want = self.text[:at]
        for k in range(len(self.ids), -1, -1):
            t = self._decode(self.ids[:k])
            if want.startswith(t):
                rest = want[len(t):]
                extra = self.tok(rest, add_special_tokens=False).input_ids if rest else []
                return self.ids[:k] + list(extra)
        return list(self.tok(want, add_special_tokens=False).input_ids)


# ---------------------------------------------------------------------------------------------- the decode loop


@dataclass
class _Row:
    exclude: set[int]  # index ids not to retrieve again (images already in the conversation)
    stream: _TextStream
    images: list[Image.Image] = field(default_factory=list)  # prompt images (for decoding strategies)
    segments: list[str | ImageSegment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the answer's tokens: text (trimmed at a stop) + image tokens
    run_start: int = 0  # index in ``tokens`` where the current text run starts
    fed: list[int] = field(default_factory=list)  # tokens fed to the LM after the prompt (cache bookkeeping)
    n_sampled: int = 0
    n_images: int = 0
    reason: str | None = None


class _DecodeLoop:
    """Decodes B rows together from a prefilled or empty cache. ``run`` yields ``(row, event)`` pairs."""

    def __init__(self, pipeline, settings: GenerationSettings, rows: list[_Row], *, seed: int,
                 cache: Any = None, n_past: int = 0, stop_event: threading.Event | None = None):
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
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.image_ids = list(self.m.image_token_ids)
        self.can_ret, self.can_gen = image_paths(pipeline, settings)
        self.images_on = settings.mode != "text" and (self.can_ret or self.can_gen)
        self.style = "fromage" if pipeline.config.kind == "fromage" else "gill"
        factory = STRATEGIES[settings.decoding]
        self.choose = factory(pipeline, settings, [r.images for r in rows]) if factory else None

    # -- LM ---------------------------------------------------------------------------------------------------

    def _forward(self, embeds: torch.Tensor, new_mask: torch.Tensor):
        """Run the LM on (B, T, d) embeddings of the active rows; positions follow each row's real tokens."""
        new_mask = new_mask.to(torch.long)
        pos = self.n_pos[self.active][:, None] + new_mask.cumsum(1) - 1
        padded = bool((new_mask == 0).any())
        if padded and self.mask is None:
            self.mask = torch.ones(len(self.active), self.n_cached, dtype=torch.long)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.m.forward_lm(embeds, self.mask, position_ids=pos.clamp(min=0),
                                past_key_values=self.cache, use_cache=True, logits="last")
        self.cache = out.past_key_values
        self.n_pos[self.active] += new_mask.sum(1)
        self.n_cached += embeds.shape[1]
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if int(ids.max()) < self.m.n_base:  # the common case, text tokens only: the LM's own rows, no masking
            emb = self.m.lm.get_input_embeddings()
            return emb(ids.to(emb.weight.device)).to(device=self.m.device, dtype=self.m.dtype)
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
            logits = out.logits[:, -1].float()  # (B', V)
            allow = torch.tensor([self.images_on and self.rows[b].n_images < self.s.max_images
                                  and self.rows[b].n_sampled >= self.s.min_word_tokens for b in self.active])
            logits = image_token_logits(
                logits, self.image_ids, allow_image=allow.to(logits.device), style=self.style,
                ret_scale_factor=self.s.ret_scale_factor, gen_scale_factor=self.s.gen_scale_factor,
                bias=self.s.image_logit_bias,
            )
            next_tokens = self._choose(logits, out, last_mask)

            feeds: dict[int, list[int]] = {}
            for j, b in enumerate(self.active):
                row, tok = self.rows[b], int(next_tokens[j])
                if self.eos is not None and tok == self.eos:
                    yield from self._finish(b, "eos")
                    continue
                row.n_sampled += 1
                if tok == self.image_ids[0]:
                    yield from self._end_text_run(b)
                    yield b, ImagePending(row.n_images)
                    feeds[b] = list(self.image_ids)
                    continue
                row.tokens.append(tok)
                row.stream.add(tok)
                at = row.stream.find_stop()
                if at is not None:
                    row.tokens[row.run_start:] = row.stream.cut(at)
                    row.stream.truncate(at)
                    yield from self._finish(b, "turn_boundary")
                    continue
                delta = row.stream.delta()
                if delta:
                    yield b, TextDelta(delta)
                if row.n_sampled >= self.s.max_new_tokens:
                    yield from self._finish(b, "max_new_tokens")
                    continue
                feeds[b] = [tok]

            self._drop_finished()
            if not self.active:
                break
            width = max(len(feeds[b]) for b in self.active)
            ids = torch.full((len(self.active), width), self.pad, dtype=torch.long)
            mask = torch.zeros(len(self.active), width, dtype=torch.long)
            for j, b in enumerate(self.active):
                f = feeds[b]
                ids[j, width - len(f):] = torch.tensor(f)
                mask[j, width - len(f):] = 1
                self.rows[b].fed += f
            out = self._forward(self._embed(ids), mask)
            last_mask = mask

            for j, b in enumerate(self.active):
                if feeds[b][0] == self.image_ids[0]:
                    row = self.rows[b]
                    row.tokens += self.image_ids
                    row.run_start = len(row.tokens)
                    hidden = out.hidden[j, width - len(self.image_ids):]  # (r, d) at [IMG0..r-1]
                    yield from self._resolve(b, hidden)
                    row.n_images += 1
                    if self.stop_event.is_set():
                        yield from self._finish(b, "stopped")
                    elif not self.s.text_after_images:
                        yield from self._finish(b, "image")
                    elif row.n_sampled >= self.s.max_new_tokens:
                        yield from self._finish(b, "max_new_tokens")
            keep = self._drop_finished()
            if keep and len(keep) < out.logits.shape[0]:  # the next step reads the kept rows' logits
                out = dataclasses.replace(out, logits=out.logits[keep], hidden=out.hidden[keep])
                last_mask = last_mask[keep]

    def _choose(self, logits: torch.Tensor, out, last_mask: torch.Tensor) -> torch.Tensor:
        if self.choose is None:
            return sample(logits, temperature=self.s.temperature, top_p=self.s.top_p, top_k=self.s.top_k,
                          generator=self.generator)
        state = StepState(
            model=self.m, logits=logits, hidden=out.hidden, new_mask=last_mask, past_key_values=self.cache,
            attention_mask=self.mask, next_positions=self.n_pos[self.active].clone(),
            generated=[list(self.rows[b].tokens) for b in self.active], generator=self.generator, settings=self.s,
            rows=list(self.active),
        )
        return self.choose(state)

    def _end_text_run(self, b: int) -> Iterator[tuple[int, Event]]:
        row = self.rows[b]
        delta = row.stream.delta(final=True)
        if delta:
            yield b, TextDelta(delta)
        if row.stream.text:
            row.segments.append(row.stream.text)
        row.stream = _TextStream(row.stream.tok, row.stream.stops)

    def _finish(self, b: int, reason: str) -> Iterator[tuple[int, Event]]:
        row = self.rows[b]
        if row.reason is not None:
            return
        yield from self._end_text_run(b)
        row.reason = reason
        yield b, TurnEnd(reason, self.seed)

    def finish_silently(self, b: int, reason: str) -> None:
        """End a row without events (the consumer went away): keep what was generated."""
        for _ in self._finish(b, reason):
            pass

    # -- images -------------------------------------------------------------------------------------------------

    def _resolve(self, b: int, hidden: torch.Tensor) -> Iterator[tuple[int, Event]]:
        """Turn the r image-token hidden states of row b into an ImageResult (or a Notice if none can be had)."""
        row, m, s = self.rows[b], self.m, self.s
        slot = row.n_images
        decision = None
        if m.decision is not None:
            probs = m.decide(hidden[:1])[0].tolist()
            decision = (float(probs[0]), float(probs[1]))
        if s.mode in ("retrieve", "generate"):
            path = s.mode
        elif self.can_ret and self.can_gen and decision is not None:
            # The decision head picks (argmax; generation on a tie, as published); only that path runs.
            path = "retrieve" if decision[1] > decision[0] else "generate"
        else:
            path = "retrieve" if self.can_ret else "generate"
        if s.image_query == "answer":
            hidden = self._answer_states(row, hidden)
        if path == "retrieve":
            result = self._retrieve(row, hidden, slot, decision)
        else:
            result = self._generate(hidden, slot, decision)
        if isinstance(result, Notice):
            yield b, result
            return
        if result is None:
            return
        image_result, notice = result
        row.segments.append(image_result.to_segment())
        yield b, image_result
        if notice is not None:
            yield b, notice

    def _answer_states(self, row: _Row, hidden: torch.Tensor) -> torch.Tensor:
        """The image tokens' states after the answer's words since the previous image alone (``image_query``)."""
        words = []
        for seg in reversed(row.segments):
            if not isinstance(seg, str):
                break
            words.insert(0, seg)
        text = "".join(words).strip()
        if not text:  # the image comes first: there is nothing but the dialogue to read it from
            return hidden
        return image_token_states(self.p, [text])[0].to(hidden.device, hidden.dtype)

    def _retrieve(self, row: _Row, hidden: torch.Tensor, slot: int, decision):
        index = self.p.index
        query = self.m.text_embedding(hidden[:1]).cpu()  # (1, D), L2-normalised
        found = index.search(query, self.s.retrieval_candidates, exclude=set(row.exclude) or None)
        ids = [int(i) for i in found.ids[0] if int(i) >= 0]
        scores = {int(i): float(sc) for i, sc in zip(found.ids[0], found.scores[0], strict=True)}
        got = index.fetch_first(ids) if ids else None
        if got is None:
            return Notice(f"image {slot + 1}: none of the {len(ids)} best matches in the index could be loaded")
        idx, image = got
        record = index.record(idx) or {}
        row.exclude.add(int(idx))
        result = ImageResult(slot, image, "retrieved", score=scores.get(int(idx)), caption=record.get("caption"),
                             url=record.get("url") or record.get("path"), index_id=int(idx), decision=decision)
        return result, None

    def _generate(self, hidden: torch.Tensor, slot: int, decision):
        from .diffusion import image_generator

        m, s = self.m, self.s
        seed = (self.seed + 1 + slot) % MAX_SEED
        prompt_embeds = m.map_to_diffusion(hidden[None])  # (1, Q, D)
        out = image_generator(self.p)(prompt_embeds, guidance_scale=s.guidance_scale,
                                      num_inference_steps=s.num_inference_steps, seed=seed,
                                      interrupt=self.stop_event.is_set)
        if out.interrupted:
            return None
        image = out.images[0]
        # How well the picture matches what the model asked for, in the model's own retrieval space.
        feats = m.encode_images(m.vision.processor([image]))
        score = float((m.image_embedding(feats) * m.text_embedding(hidden[:1])).sum())
        result = ImageResult(slot, image, "generated", score=score, decision=decision, seed=seed)
        notice = Notice(f"image {slot + 1}: the safety checker replaced the generated image") if out.nsfw[0] else None
        return result, notice


# ---------------------------------------------------------------------------------------------- image-token states


@torch.no_grad()
def image_token_states(pipeline, texts: Sequence[str]) -> torch.Tensor:
    """(N, r, d) last-layer LM hidden states at the r image tokens ([RET] or [IMG0..r-1]) appended to each text,
    laid out as training lays out a caption (``BOS text [IMG0..r-1]``): what ``text_embedding`` (retrieval) and
    ``map_to_diffusion`` (generation) read."""
    m, tok = pipeline.model, pipeline.tokenizer
    ids = tok(list(texts), add_special_tokens=False).input_ids
    rows, first = retrieval_rows(ids, bos_id=tok.bos_token_id, image_token_ids=m.image_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    lay = layout(rows, n_visual=m.config.n_visual_tokens, pad_id=pad, ignore_ids=frozenset())
    hidden = m(lay.input_ids, lay.attention_mask, logits="none").hidden
    r = len(m.image_token_ids)
    return torch.stack([hidden[i, f:f + r] for i, f in enumerate(first)])


# ---------------------------------------------------------------------------------------------- batches


def generate_batch(pipeline, prompts: Sequence[Sequence[str | Image.Image]], settings: GenerationSettings | None = None,
                   *, dialogue: bool = False) -> list[GenerationOutput]:
    """Decode several prompts together (left padding, attention mask, per-row positions).

    ``prompts``: each a list of str and images in order, and ``TokenIds`` for exact token prompts (no template unless
    ``dialogue``: then each prompt is one user turn of the model's dialogue template). Under greedy decoding each
    output equals the unbatched one.
    """
    settings = settings or GenerationSettings.for_model(pipeline.config)
    check_settings(pipeline, settings)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    m, cfg = pipeline.model, pipeline.config
    stops = settings.stop_strings if settings.stop_strings is not None else cfg.dialogue.stop_strings
    encoded: list[Prompt] = []
    rows: list[_Row] = []
    budget = context_length(pipeline) - settings.max_new_tokens - _image_positions(pipeline, settings)
    for i, p in enumerate(prompts):
        segs = normalize_message(p, name=f"prompts[{i}]", allow_token_ids=True)
        pieces = dialogue_pieces([Turn("user", segs)], cfg.dialogue, m.image_token_ids) if dialogue else segs
        prompt = encode_pieces(pipeline.tokenizer, pieces, cfg.n_visual_tokens)
        if len(prompt) > budget:
            raise _too_long(pipeline, settings, len(prompt), f"prompts[{i}]")
        encoded.append(prompt)
        rows.append(_Row(exclude=set(), stream=_TextStream(pipeline.tokenizer, stops),
                         images=[s.image for s in segs if isinstance(s, ImageSegment)]))
    seed = settings.seed if settings.seed is not None else _fresh_seed()
    cache = VisionCache()
    with torch.no_grad():
        width = max(len(p) for p in encoded)
        embeds = torch.zeros(len(encoded), width, m.hidden_size, device=m.device, dtype=m.dtype)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for i, p in enumerate(encoded):
            embeds[i, width - len(p):] = p.embed(m, cache)
            mask[i, width - len(p):] = 1
        loop = _DecodeLoop(pipeline, settings, rows, seed=seed)
        notices: list[list[str]] = [[] for _ in rows]
        for b, ev in loop.run(embeds, mask):
            if isinstance(ev, Notice):
                notices[b].append(ev.text)
    return [GenerationOutput(r.segments, r.tokens, r.reason or "stopped", seed, n) for r, n in zip(rows, notices,
                                                                                                      strict=True)]


# ---------------------------------------------------------------------------------------------- chat


class Chat:
    """One conversation: its history, the vision features of its images, and the KV cache of its prompt so far.

    ``send`` validates at once (raising before anything changes) and returns an iterator of events; the turn is
    added to the history as it runs. Use one thread per Chat; ``stop()`` may be called from any thread.
    """

    def __init__(self, pipeline, *, dialogue=None):
        self.pipeline = pipeline
        self.dialogue = dialogue or pipeline.config.dialogue
        self.history: list[Turn] = []
        self.vision_cache = VisionCache()
        self._cache: Any = None
        self._cache_keys: list = []  # what each cached position holds (see Prompt.keys)
        self._first = 0  # first history turn still in the prompt (older ones were left out to fit)
        self._stop = threading.Event()
        self._active: Iterator[Event] | None = None
        self._told_no_images = False

    # -- public API ------------------------------------------------------------------------------------------------

    def send(self, message: Sequence[str | Image.Image], settings: GenerationSettings | None = None) -> Iterator[Event]:
        """Add a user message (str and images, in order) and stream the answer's events."""
        settings = settings or GenerationSettings.for_model(self.pipeline.config)
        self._close_active()
        check_settings(self.pipeline, settings)
        user = Turn("user", normalize_message(message))
        prompt, first = self._plan([*self.history, user], settings)
        return self._start(self._turn(prompt, first, settings, add=user))

    def regenerate(self, settings: GenerationSettings | None = None) -> Iterator[Event]:
        """Run the last answer again (a new seed unless ``settings.seed`` is set)."""
        settings = settings or GenerationSettings.for_model(self.pipeline.config)
        self._close_active()
        check_settings(self.pipeline, settings)
        if not self.history or self.history[-1].role != "assistant":
            raise ValueError("nothing to regenerate: the conversation has no answer yet")
        prompt, first = self._plan(self.history[:-1], settings)
        return self._start(self._turn(prompt, first, settings, drop_last=True))

    def stop(self) -> None:
        """End the running turn at the next token (thread-safe); what streamed so far is kept."""
        self._stop.set()

    def undo(self) -> list[Turn]:
        """Drop the last user + assistant exchange; returns the removed turns ([] if the chat is empty)."""
        self._close_active()
        removed: list[Turn] = []
        if self.history and self.history[-1].role == "assistant":
            removed.insert(0, self.history.pop())
        if self.history and self.history[-1].role == "user":
            removed.insert(0, self.history.pop())
        self._first = min(self._first, len(self.history))
        return removed

    def truncate(self, n_turns: int) -> None:
        """Keep the first ``n_turns`` turns (e.g. to edit a past user message and branch from there)."""
        self._close_active()
        if not isinstance(n_turns, int) or not 0 <= n_turns <= len(self.history):
            raise ValueError(f"n_turns must be an integer in [0, {len(self.history)}], got {n_turns!r}")
        del self.history[n_turns:]
        self._first = min(self._first, n_turns)

    def clear(self) -> None:
        self.truncate(0)

    @property
    def context_length(self) -> int:
        return context_length(self.pipeline)

    @property
    def cached_tokens(self) -> int:
        """Prompt positions held in the KV cache."""
        return len(self._cache_keys)

    # -- export / import ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able: text, images as PNG base64 with their metadata, and each answer's tokens."""
        turns = []
        for t in self.history:
            segs = []
            for s in t.segments:
                if isinstance(s, str):
                    segs.append({"type": "text", "text": s})
                else:
                    buf = io.BytesIO()
                    s.image.save(buf, format="PNG")
                    segs.append({"type": "image", "png": base64.b64encode(buf.getvalue()).decode("ascii"),
                                 "source": s.source, "score": s.score, "caption": s.caption, "url": s.url,
                                 "index_id": s.index_id, "decision": list(s.decision) if s.decision else None,
                                 "seed": s.seed})
            turn = {"role": t.role, "segments": segs}
            if t.tokens is not None:
                turn["tokens"] = list(t.tokens)
            turns.append(turn)
        return {"format": "fromage_gill.chat", "version": 1, "model": self.pipeline.config.name, "turns": turns}

    @classmethod
    def from_dict(cls, pipeline, data: Mapping) -> Chat:
        """Rebuild a chat from ``to_dict`` output; raises ``ValueError`` saying what is wrong."""
        if not isinstance(data, Mapping) or data.get("format") != "fromage_gill.chat":
            raise ValueError("not a saved chat: expected an object with \"format\": \"fromage_gill.chat\"")
        if data.get("version") != 1:
            raise ValueError(f"unsupported chat version {data.get('version')!r}; this version reads version 1")
        turns = data.get("turns")
        if not isinstance(turns, list):
            raise ValueError("chat 'turns' must be a list")
        same_model = data.get("model") == pipeline.config.name
        vocab = pipeline.model.vocab_size
        chat = cls(pipeline)
        for i, t in enumerate(turns):
            where = f"turns[{i}]"
            if not isinstance(t, Mapping) or t.get("role") not in ("user", "assistant"):
                raise ValueError(f"{where} must be an object with role 'user' or 'assistant'")
            if not isinstance(t.get("segments"), list):
                raise ValueError(f"{where}.segments must be a list")
            segs = [_segment_from_dict(s, f"{where}.segments[{j}]") for j, s in enumerate(t["segments"])]
            tokens = t.get("tokens")
            if tokens is not None:
                if not isinstance(tokens, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                            and 0 <= x < vocab for x in tokens):
                    raise ValueError(f"{where}.tokens must be a list of token ids in [0, {vocab})")
                if t["role"] != "assistant":
                    raise ValueError(f"{where}.tokens: only assistant turns carry tokens")
            # Another model's tokens mean nothing here: re-encode its answers from their text.
            chat.history.append(Turn(t["role"], segs, tuple(tokens) if tokens is not None and same_model else None))
        return chat

    # -- internals ---------------------------------------------------------------------------------------------------

    def _start(self, gen: Iterator[Event]) -> Iterator[Event]:
        self._active = gen
        return gen

    def _close_active(self) -> None:
        gen = self._active
        if gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_RUNNING:
            raise ValueError("a turn of this chat is still running in another thread: call stop() and let it end "
                             "before changing the conversation")
        self._active = None
        if gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_SUSPENDED:
            gen.close()  # the abandoned turn ends as "stopped", keeping what it produced

    def _encode(self, turns: Sequence[Turn]) -> Prompt:
        pieces = dialogue_pieces(turns, self.dialogue, self.pipeline.model.image_token_ids)
        return encode_pieces(self.pipeline.tokenizer, pieces, self.pipeline.config.n_visual_tokens)

    def _plan(self, turns: list[Turn], settings: GenerationSettings) -> tuple[Prompt, int]:
        """The prompt for ``turns`` that fits the context, leaving out the oldest exchanges if needed."""
        budget = context_length(self.pipeline) - settings.max_new_tokens - _image_positions(self.pipeline, settings)
        last = len(turns) - 1
        first = min(self._first, last)
        while first > 0 and turns[first].role != "user":
            first -= 1
        # A window of max_exchanges earlier exchanges is a choice of the model's dialogue, not a loss: only turns
        # left out to fit the context move ``first`` (and get a Notice)
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        k = self.dialogue.max_exchanges
        start = max(first, users[-(k + 1)] if k is not None and len(users) > k else 0)
        prompt = self._encode(turns[start:])
        while len(prompt) > budget and start < last:
            start = first = next((i for i in range(start + 1, last + 1) if turns[i].role == "user"), last)
            prompt = self._encode(turns[start:])
        if len(prompt) > budget:
            raise _too_long(self.pipeline, settings, len(prompt), "the message")
        return prompt, first

    def _turn(self, prompt: Prompt, first: int, settings: GenerationSettings, *, add: Turn | None = None,
              drop_last: bool = False) -> Iterator[Event]:
        removed = self.history.pop() if drop_last else None
        if add is not None:
            self.history.append(add)
        self._stop.clear()
        seed = settings.seed if settings.seed is not None else _fresh_seed()
        old_first, loop = self._first, None

        def rollback() -> None:
            self._first = old_first
            if add is not None:
                self.history.pop()
            if removed is not None:
                self.history.append(removed)

        try:
            notices = []
            if first > self._first:
                notices.append(Notice(f"the {first} oldest turn(s) were left out of the prompt to fit the LM's "
                                      f"context of {self.context_length} tokens"))
            if settings.mode != "text" and not any(image_paths(self.pipeline, settings)) and not self._told_no_images:
                self._told_no_images = True
                notices.append(Notice("images are off: no image index is loaded and this model cannot generate them"))
            self._first = first
            row = self._row(settings, prompt)
            embeds = self._prefill_embeds(prompt)
            loop = _DecodeLoop(self.pipeline, settings, [row], seed=seed, cache=self._cache,
                               n_past=len(self._cache_keys), stop_event=self._stop)
            self._cache_keys = list(prompt.keys)  # from the first forward on, the cache holds the prompt
            yield from notices
            for _, ev in loop.run(embeds, torch.ones(1, embeds.shape[1], dtype=torch.long)):
                if isinstance(ev, TurnEnd):  # the answer is in the history by the time TurnEnd is seen
                    self._record(loop, prompt)
                yield ev
        except GeneratorExit:
            if loop is None:
                rollback()
            elif loop.rows[0].reason is None:  # the consumer went away mid-turn: keep the answer so far
                loop.finish_silently(0, "stopped")
                self._record(loop, prompt)
            raise
        except BaseException:
            self._reset_cache()
            if loop is not None and loop.rows[0].reason is not None:  # failed after recording the answer
                self.history.pop()
            rollback()
            raise

    def _row(self, settings: GenerationSettings, prompt: Prompt) -> _Row:
        stops = settings.stop_strings if settings.stop_strings is not None else self.dialogue.stop_strings
        exclude = {s.index_id for t in self.history for s in t.images if s.index_id is not None}
        images = [s.image for s in prompt.images()]
        return _Row(exclude=exclude, stream=_TextStream(self.pipeline.tokenizer, stops), images=images)

    def _prefill_embeds(self, prompt: Prompt) -> torch.Tensor:
        """Crop the cache to the prefix it shares with ``prompt``; embed the rest ((1, T_new, d))."""
        n_common = prompt.common_prefix(self._cache_keys) if self._cache is not None else 0
        n_common = min(n_common, len(prompt) - 1)  # at least one position runs, for the next-token logits
        if n_common == 0:
            self._reset_cache()
        elif self._cache.get_seq_length() > n_common:
            self._cache.crop(n_common - self._cache.get_seq_length())
        self._cache_keys = self._cache_keys[:n_common]
        return prompt.embed(self.pipeline.model, self.vision_cache, start=n_common)[None]

    def _reset_cache(self) -> None:
        self._cache, self._cache_keys = None, []

    def _record(self, loop: _DecodeLoop, prompt: Prompt) -> None:
        row = loop.rows[0]
        self._cache = loop.cache
        self._cache_keys = list(prompt.keys) + list(row.fed)
        self.history.append(Turn("assistant", list(row.segments), tuple(row.tokens)))


def _segment_from_dict(s, where: str) -> str | ImageSegment:
    if not isinstance(s, Mapping) or s.get("type") not in ("text", "image"):
        raise ValueError(f"{where} must be an object with type 'text' or 'image'")
    if s["type"] == "text":
        if not isinstance(s.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        return s["text"]
    png = s.get("png")
    if not isinstance(png, str):
        raise ValueError(f"{where}.png must be base64 PNG data")
    try:
        data = base64.b64decode(png, validate=True)
    except ValueError:
        raise ValueError(f"{where}.png is not valid base64") from None
    image = load_image(data, name=where)
    decision = s.get("decision")
    if decision is not None and (not isinstance(decision, list) or len(decision) != 2
                                 or not all(isinstance(x, (int, float)) for x in decision)):
        raise ValueError(f"{where}.decision must be null or [p_generate, p_retrieve]")
    for name, types in (("score", (int, float)), ("caption", str), ("url", str), ("index_id", int), ("seed", int)):
        v = s.get(name)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise ValueError(f"{where}.{name} has the wrong type: {type(v).__name__}")
    return ImageSegment(image, s.get("source", "user"), s.get("score"), s.get("caption"), s.get("url"),
                        s.get("index_id"), tuple(decision) if decision else None, s.get("seed"))


__all__ = [
    "Chat", "Event", "GenerationOutput", "GenerationSettings", "ImagePending", "ImageResult", "ImageSegment",
    "Notice", "StepState", "TextDelta", "TokenIds", "Turn", "TurnEnd", "check_settings", "context_length",
    "generate_batch", "image_token_states",
]
