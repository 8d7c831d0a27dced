"""A turn's events folded into its session: the handler shows the session after each update. Everything a turn
reports is an event of its stream, a generated image's progress included (``ImageProgress``), so the handler
consumes the engine's iterator in its own thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from ..generate import TextDelta
from ..generate.events import TurnEvents
from .session import ChatSession

STREAM_EVERY_S = 0.05  # text is re-sent at most this often (each update re-renders the conversation)
SAVE_EVERY_S = 5.0  # while answering, the answer so far is stored this often (what a crash leaves)


def turn_updates(session: ChatSession, events: TurnEvents, *, save: Callable[[], None]) -> Iterator[None]:
    """Apply ``events`` to ``session``; yield whenever it should be shown again (text at most every
    ``STREAM_EVERY_S``, anything else at once, and once at the end); call ``save`` every ``SAVE_EVERY_S``. An
    engine error is raised here. Closing this generator (the tab went away) closes ``events``: the engine ends
    the turn as "stopped" and keeps what it made."""
    last = saved = time.monotonic()
    held = False  # text applied but not shown yet
    try:
        for event in events:
            session.apply(event)
            now = time.monotonic()
            held = isinstance(event, TextDelta) and now - last < STREAM_EVERY_S
            if not held:
                last = now
                yield
            if now - saved >= SAVE_EVERY_S:
                saved = now
                save()
        if held:
            yield
    finally:
        events.close()
