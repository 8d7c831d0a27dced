"""The model gate: FIFO admission to the model, with the number of requests ahead of each waiting one (for the
app's "Busy: N ahead of you")."""

from __future__ import annotations

import contextlib
import threading
from collections import deque


class ModelGate:
    """At most ``slots`` turns use the model at once; the others wait in arrival order and can ask how many are
    ahead of them (to tell the user "busy, N ahead of you"). Tickets are released in ``finally`` blocks, so a
    closed browser tab (its generator closed) never blocks the queue."""

    def __init__(self, slots: int = 1):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: deque[int] = deque()
        self._active: set[int] = set()
        self._next = 0

    def join(self) -> int:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._waiting.append(ticket)
            self._admit()
            return ticket

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.slots:
            self._active.add(self._waiting.popleft())
        self._cond.notify_all()

    def wait(self, ticket: int, timeout: float) -> bool:
        """True once ``ticket`` may use the model; False if still waiting after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: ticket in self._active, timeout=timeout)

    def ahead(self, ticket: int) -> int:
        """How many requests are running or queued before ``ticket`` (0 once it runs)."""
        with self._cond:
            if ticket in self._active:
                return 0
            try:
                return len(self._active) + self._waiting.index(ticket)
            except ValueError:
                return 0

    def leave(self, ticket: int) -> None:
        with self._cond:
            self._active.discard(ticket)
            with contextlib.suppress(ValueError):  # not waiting: it was running
                self._waiting.remove(ticket)
            self._admit()

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self._active) + len(self._waiting)
