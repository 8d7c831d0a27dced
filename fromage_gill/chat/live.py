"""A turn that runs on the server, not in the page that started it: a thread drives the handler's replies and keeps
the latest, and any page showing the conversation follows it (the one that sent the message, or the same browser
after a reload). A page that goes away stops following; the turn goes on, and is stored when it ends."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)


class Shown(Protocol):
    """What a follower sees: a dataclass whose ``notes`` are shown once and ``clear_box`` empties the message box."""

    notes: list[Any]
    clear_box: bool


R = TypeVar("R", bound=Shown)


class LiveTurn:
    """Runs ``replies`` to its end in a thread of its own and calls ``on_done`` then. A follower sees the latest
    reply each time it wakes: the replies it missed are folded in (their notes kept, a cleared box still cleared),
    so a slow page costs no memory and misses no notice."""

    def __init__(self, replies: Iterator[R], *, name: str, on_done: Callable[[], None] = lambda: None):
        self._cond = threading.Condition()
        self._latest: Any = None
        self._seq = 0
        self._notes: list[tuple[int, Any]] = []  # (seq, note): a follower takes those after the last seq it saw
        self._cleared = -1  # the last seq whose reply cleared the message box
        self.done = False
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, args=(replies,), name=name, daemon=True)
        self._thread.start()

    def _run(self, replies: Iterator[Any]) -> None:
        try:
            for reply in replies:
                with self._cond:
                    self._seq += 1
                    self._latest = reply
                    self._notes = [*self._notes[-49:], *((self._seq, n) for n in reply.notes)]
                    if reply.clear_box:
                        self._cleared = self._seq
                    self._cond.notify_all()
        except Exception:  # the handlers fold every expected error into a note; this one is a bug to log
            logger.exception("a turn failed")
        finally:
            with self._cond:
                self.done = True
                self._cond.notify_all()
            self._on_done()

    def follow(self, seen: int = 0) -> Iterator[Any]:
        """The replies from after ``seen`` on, until the turn ends (0: all of them, folded into the latest)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda seen=seen: self._seq > seen or self.done)
                if self._seq == seen:
                    return
                notes = [n for s, n in self._notes if s > seen]
                reply = dataclasses.replace(self._latest, notes=notes, clear_box=self._cleared > seen)
                seen = self._seq
            yield reply

    @property
    def seq(self) -> int:
        """How many replies the turn has made so far (``follow(turn.seq - 1)``: from the latest one on)."""
        with self._cond:
            return self._seq

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
