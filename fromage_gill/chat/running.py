"""A turn's events folded into its session while the engine runs in a worker thread: the handler shows the session
after each update, and a generated image's progress (diffusers' step callback, as ``DiffusionStep``) arrives while
the image is being made, which a generator consumed in the handler's own thread could not show."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..generate import TextDelta
from .session import ChatSession, DiffusionStep

STREAM_EVERY_S = 0.05  # while catching up with a backlog of text, the answer is re-sent at least this often
SAVE_EVERY_S = 5.0  # while answering, the answer so far is stored this often (what a crash leaves)


def turn_updates(session: ChatSession, events: Iterator[Any], *, save: Callable[[], None]) -> Iterator[None]:
    """Apply ``events`` to ``session``; yield whenever it should be shown again (each event once caught up with the
    engine, a backlog of text at least every ``STREAM_EVERY_S``, anything else at once); call ``save`` every
    ``SAVE_EVERY_S``. An engine error is raised here. Closing this generator (the tab went away) stops the turn
    and waits for it: what it made is kept."""
    feed: queue.Queue = queue.Queue()
    done = object()
    generator = getattr(session.chat.pipeline, "image_generator", None)

    def work() -> None:
        try:
            steps = generator.reporting(lambda k, n: feed.put(DiffusionStep(k, n))) if generator else None
            with steps or contextlib.nullcontext():
                for event in events:
                    feed.put(event)
        except BaseException as e:  # handed to the handler's thread, which raises it
            feed.put(e)
        finally:
            feed.put(done)

    worker = threading.Thread(target=work, name=f"turn-{session.id[:8]}", daemon=True)
    worker.start()
    last = saved = time.monotonic()
    try:
        while (event := feed.get()) is not done:
            if isinstance(event, BaseException):
                raise event
            session.apply(event)
            now = time.monotonic()
            # Shown when caught up with the engine, or at least every STREAM_EVERY_S while a backlog is folded in
            if feed.empty() or now - last >= STREAM_EVERY_S or not isinstance(event, TextDelta):
                last = now
                yield
            if now - saved >= SAVE_EVERY_S:
                saved = now
                save()
    finally:
        if worker.is_alive():
            session.chat.stop()
            worker.join()
