"""What ``Engine.submit`` returns (``EngineRequest``: a turn's events as they are decoded, and its ``TurnResult``),
the engine's ``EngineStats``, and a request's decoding state inside the engine (``RowState``)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..settings import GenerationSettings
from .events import Event, ImageResult, TextDelta, TurnEnd
from .prefix_cache import KV
from .prompt import ImageSegment, Prompt
from .resolve import ImageResolver
from .stream import TextStream, published_cut

Reason = Literal["eos", "turn_boundary", "max_new_tokens", "stopped", "image"]  # as TurnEnd.reason


@dataclass(frozen=True)
class TurnResult:
    """What a finished request produced, and what its prefill cost."""

    segments: list[str | ImageSegment]
    tokens: list[int]  # the tokens the answer put in the context (text and image tokens), as ``Turn.tokens``
    reason: str
    seed: int
    n_prompt: int  # prompt positions
    n_reused: int  # of them, served from the prefix cache (the LM ran on n_prompt - n_reused)

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def n_prefilled(self) -> int:
        return self.n_prompt - self.n_reused


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # requests not admitted yet
    active: int  # rows in the batch
    parked: int  # rows whose image is being resolved
    steps: int  # decode steps run
    tokens: int  # tokens sampled, all requests together
    largest_batch: int


class EngineRequest:
    """One submitted turn. Iterate it (``events()``) for its events, up to and including ``TurnEnd``; an error the
    engine met for this request is raised from the iteration. ``cancel()`` ends it at the next step (what streamed so
    far is kept, ``TurnEnd("stopped")``); leaving the iteration early cancels it too. ``result`` is set before
    ``TurnEnd`` is delivered. With a ``listener`` the events (and the error) are handed to it instead, in order, from
    the engine's threads (e.g. onto an event loop: no thread of the caller's waits on the request)."""

    def __init__(
        self,
        prompt: Prompt,
        settings: GenerationSettings,
        stop_event: threading.Event,
        *,
        wake: Callable[[], None],
        listener: Callable[[Event | BaseException], None] | None = None,
    ):
        self._wake = wake  # tells the engine's scheduler to look (it may be waiting for work)
        self.prompt = prompt
        self.settings = settings
        self.stop_event = stop_event
        self.result: TurnResult | None = None
        self._listener = listener
        self._queue: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
        assert self._listener is None, "a request with a listener hands its events to it"
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, TurnEnd):
                    return
        finally:
            if self.result is None:
                self.cancel()

    def put(self, item: Event | BaseException) -> None:
        """Deliver an event, or the error that ends the request (the engine's side)."""
        if self._listener is not None:
            self._listener(item)
        else:
            self._queue.put(item)

    def cancel(self) -> None:
        self.stop_event.set()
        self._wake()


@dataclass(eq=False)
class RowState:
    """A request's decoding state in the ``Engine``; ``kv`` holds its cache while it is outside the batch (being
    admitted or parked)."""

    req: EngineRequest
    seed: int
    generator: torch.Generator
    resolver: ImageResolver
    stream: TextStream
    exclude: set[int]
    images_on: bool
    segments: list[str | ImageSegment] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    run_start: int = 0
    fed: list[int] = field(default_factory=list)
    n_sampled: int = 0
    n_images: int = 0
    reason: Reason | None = None
    logits: torch.Tensor | None = None  # (V,) the next token's logits
    pending: torch.Tensor | None = None  # (T, d) prompt embeddings to feed in the next step (a mixed prefill)
    n_pos: int = 0  # positions so far: the next one's id
    n_reused: int = 0
    kv: KV | None = None
    image: concurrent.futures.Future[list[ImageResult]] | None = None

    @property
    def s(self) -> GenerationSettings:
        return self.req.settings

    def emit(self, event: Event | BaseException) -> None:
        self.req.put(event)

    def next_logits(self) -> torch.Tensor:
        assert self.logits is not None, "a row in the batch has its next token's logits"
        return self.logits

    def end_text_run(self, tokenizer: Any, *, last: bool = False) -> None:
        """The text run before an image (or the answer's last) ends: its held-back text goes out, as DecodeLoop's."""
        delta = self.stream.delta(final=True)
        text = self.stream.text
        if self.s.answer_style == "published":  # the reference's cut
            start, end = (0, 0) if last and self.n_images else published_cut(text)
            self.tokens[self.run_start :] = self.stream.cut(end) if end else []
            delta = text = tokenizer.clean_up_tokenization(text[start:end])
        if delta:
            self.emit(TextDelta(delta))
        if text:
            self.segments.append(text)
        self.stream = TextStream(self.stream.tok, self.stream.stops)  # as DecodeLoop: stops kept, skip_leading not


@torch.no_grad()  # grad mode is per thread: the worker's must be off too
def resolve_image(row: RowState, hidden: torch.Tensor) -> list[ImageResult]:
    """Resolve a parked row's image in a worker thread. Its events go to its request as they come (the row is out of
    the batch: nothing else emits for it meanwhile); the images are returned, for the row's answer."""
    images: list[ImageResult] = []
    for event in row.resolver.resolve(row.n_images, hidden, list(row.segments), row.exclude):
        if isinstance(event, ImageResult):
            images.append(event)
        row.emit(event)
    return images
