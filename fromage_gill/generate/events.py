"""What a turn streams: text as it is decoded, images as they are resolved (and a generated one's progress while it
is made), notices and the turn's end."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Literal

from .prompt import ImageSegment


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ImagePending:
    slot: int  # index of the image within the turn


@dataclass(frozen=True)
class ImageProgress:
    """The image of ``slot`` is being generated: ``step`` of its ``total`` denoising steps are done."""

    slot: int
    step: int
    total: int


@dataclass(frozen=True, eq=False)
class ImageResult(ImageSegment):
    """An image the answer produced (retrieved or generated): an ``ImageSegment`` that also knows its ``slot``, the
    index of the image within the turn. It goes into the history as it is."""

    slot: int = 0


@dataclass(frozen=True)
class Notice:
    text: str


EndReason = Literal["eos", "turn_boundary", "max_new_tokens", "stopped", "image"]


@dataclass(frozen=True)
class TurnEnd:
    reason: EndReason
    seed: int


Event = TextDelta | ImagePending | ImageProgress | ImageResult | Notice | TurnEnd
# One turn's events as ``Chat`` streams them; closing it early ends the turn as "stopped", keeping what it made
TurnEvents = Generator[Event, None, None]


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
