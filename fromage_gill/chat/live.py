"""A turn that runs on the server, not in the page that started it: a thread drives the handler's replies and keeps
the latest, and any page showing the conversation follows it (the one that sent the message, or the same browser
after a reload). A page that goes away stops following; the turn goes on, and is stored when it ends."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from .session import ChatSession, Note

logger = logging.getLogger(__name__)


class Shown(Protocol):
    """What a follower sees (handlers.Reply): notes to show once, whether the message box empties."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: a follower gets a copy with the notes it missed
    notes: list[Note]
    clear_box: bool


R = TypeVar("R", bound=Shown)


class LiveTurn(Generic[R]):
    """Runs ``replies`` to its end in a thread of its own and calls ``on_done`` then. A follower sees the latest
    reply each time it wakes: the replies it missed are folded in (their notes kept, a cleared box still cleared),
    so a slow page costs no memory and misses no notice."""

    def __init__(self, replies: Iterator[R], *, name: str, on_done: Callable[[], None] = lambda: None):
        self._cond = threading.Condition()
        self._latest: R | None = None
        self._seq = 0
        self._notes: list[tuple[int, Note]] = []  # (seq, note): a follower takes those after the last seq it saw
        self._cleared = -1  # the last seq whose reply cleared the message box
        self.done = False
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, args=(replies,), name=name, daemon=True)
        self._thread.start()

    def _run(self, replies: Iterator[R]) -> None:
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

    def follow(self, seen: int = 0) -> Iterator[R]:
        """The replies from after ``seen`` on, until the turn ends (0: all of them, folded into the latest)."""
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._moved, seen))
                if self._seq == seen or self._latest is None:
                    return
                notes = [n for s, n in self._notes if s > seen]
                reply = dataclasses.replace(self._latest, notes=notes, clear_box=self._cleared > seen)
                seen = self._seq
            yield reply

    def _moved(self, seen: int) -> bool:
        return self._seq > seen or self.done

    @property
    def seq(self) -> int:
        """How many replies the turn has made so far (``follow(turn.seq - 1)``: from the latest one on)."""
        with self._cond:
            return self._seq

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class LiveTurns(Generic[R]):
    """The turns running on the server, by session, and the pages that show each session: a page that goes away
    mid-answer leaves its session to be closed when the turn ends, unless another page (the same browser, reloaded)
    took it up meanwhile."""

    def __init__(self, close: Callable[[ChatSession], None]):
        self._close = close  # deletes a session's files
        self._lock = threading.Lock()
        self._live: dict[str, tuple[ChatSession, list[LiveTurn[R]]]] = {}  # session id -> (session, its turns)
        self._held: dict[str, int] = {}  # session id -> pages showing it besides the first
        self._closing: set[str] = set()  # sessions whose page went away mid-answer
        _EVERY.add(self)

    def shutdown(self, timeout_s: float) -> None:
        """Stop every running turn at its next token and wait for it (at most ``timeout_s`` in all), so that the
        process does not exit while a turn's thread is inside the model (the interpreter would abort)."""
        with self._lock:
            running = [(session, list(turns)) for session, turns in self._live.values()]
        for session, _ in running:
            session.chat.stop()
        deadline = time.monotonic() + timeout_s
        for _, turns in running:
            for turn in turns:
                turn.join(max(0.0, deadline - time.monotonic()))

    def start(self, session: ChatSession, replies: Iterator[R]) -> Iterator[R]:
        """Run ``replies`` on the server and show them while the calling page follows."""

        def finished() -> None:
            with self._lock:
                runs = self._live.get(session.id, (session, []))[1]
                runs[:] = [t for t in runs if not t.done]
                if runs:
                    return
                self._live.pop(session.id, None)
                closing = session.id in self._closing
                self._closing.discard(session.id)
            if closing:
                self._close(session)

        with self._lock:
            turn = LiveTurn(replies, name=f"turn-{session.id[:8]}", on_done=finished)
            self._live.setdefault(session.id, (session, []))[1].append(turn)
        yield from turn.follow()

    def follow(self, session: ChatSession) -> Iterator[R]:
        """The replies of the session's running turns, from the latest one on."""
        with self._lock:
            turns = list(self._live.get(session.id, (session, []))[1])
        for turn in turns:
            yield from turn.follow(max(turn.seq - 1, 0))

    def take_up(self, owner: str) -> ChatSession | None:
        """The session of ``owner`` whose turn runs, for a page that (re)loads meanwhile (None: there is none)."""
        with self._lock:
            for session, turns in reversed(list(self._live.values())):
                if session.owner == owner and turns:
                    if session.id in self._closing:
                        self._closing.discard(session.id)  # the page that left is replaced by this one
                    else:
                        self._held[session.id] = self._held.get(session.id, 0) + 1
                    return session
        return None

    def release(self, session: ChatSession) -> None:
        """A page showing ``session`` went away: close it, unless another page shows it or its turn runs (then it
        is closed when the turn ends)."""
        with self._lock:
            if self._held.get(session.id):
                self._held[session.id] -= 1
                return
            if session.id in self._live:
                self._closing.add(session.id)
                return
        self._close(session)


_EVERY: weakref.WeakSet[LiveTurns[Any]] = weakref.WeakSet()
EXIT_WAIT_S = 10.0


@atexit.register
def _stop_running_turns() -> None:
    for live in list(_EVERY):
        live.shutdown(EXIT_WAIT_S)
