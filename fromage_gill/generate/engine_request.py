"""What ``Engine.submit`` returns (``EngineRequest``: a turn's events as they are decoded, and its ``TurnResult``),
and the engine's ``EngineStats``."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..settings import GenerationSettings
from .events import Event, TurnEnd
from .prompt import ImageSegment, Prompt


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
    ``TurnEnd`` is delivered."""

    def __init__(
        self, prompt: Prompt, settings: GenerationSettings, stop_event: threading.Event, *, wake: Callable[[], None]
    ):
        self._wake = wake  # tells the engine's scheduler to look (it may be waiting for work)
        self.prompt = prompt
        self.settings = settings
        self.stop_event = stop_event
        self.result: TurnResult | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Event]:
        return self.events()

    def events(self) -> Iterator[Event]:
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

    def cancel(self) -> None:
        self.stop_event.set()
        self._wake()
