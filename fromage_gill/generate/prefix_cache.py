"""``PrefixCache``: the KV caches of finished turns, kept so that a request continuing a conversation runs the LM only
on its new positions. An LRU bounded in bytes, keyed by each cached position's key (``Prompt.keys``: a token id, or
an image's content hash and slot), shared by every conversation of an ``Engine``.

A stateless API sends the whole conversation each turn; the longest cached prefix of it is reused, so turn 30 costs
what turn 1 does. An entry whose keys begin another entry's is subsumed by the longer one and dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per LM layer: keys and values, (1, heads, positions, head_dim)


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class PrefixCacheStats:
    entries: int
    nbytes: int
    max_bytes: int
    hits: int  # lookups that reused at least one position
    misses: int
    evictions: int


class PrefixCache:
    """An LRU of per-conversation KV caches, at most ``max_bytes`` in all (0 keeps nothing). Thread-safe.

    ``lookup(keys)`` returns how many leading positions of ``keys`` are cached and their KV (views of the entry, never
    written to: the decode loop's cache appends by concatenation); ``store(keys, kv)`` keeps a finished turn's."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[tuple[Hashable, ...], KV, int]] = OrderedDict()
        self._next = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(
                len(self._entries), self._bytes, self.max_bytes, self._hits, self._misses, self._evictions
            )

    def lookup(self, keys: Sequence[Hashable]) -> tuple[int, KV]:
        """``(n, kv)``: the longest cached prefix of ``keys`` (n positions, KV cut to n); ``(0, [])`` if none."""
        with self._lock:
            best, best_n = None, 0
            for eid, (ekeys, _, _) in self._entries.items():
                n = common_prefix(keys, ekeys)
                if n > best_n:
                    best, best_n = eid, n
            if best is None:
                self._misses += 1
                return 0, []
            self._hits += 1
            self._entries.move_to_end(best)
            kv = self._entries[best][1]
            return best_n, [(k[:, :, :best_n], v[:, :, :best_n]) for k, v in kv]

    def store(self, keys: Sequence[Hashable], kv: KV) -> bool:
        """Keep ``kv`` (one row, ``len(keys)`` positions) as the most recently used entry; older entries go until the
        total fits. False when it was not kept (larger than the whole cache, or already held by a longer entry)."""
        keys = tuple(keys)
        assert all(k.shape[2] == len(keys) for k, _ in kv), "one cached position per key"
        size = kv_bytes(kv)
        if not keys or size > self.max_bytes:
            return False
        with self._lock:
            for eid, (ekeys, _, esize) in list(self._entries.items()):
                n = common_prefix(keys, ekeys)
                if n == len(keys):  # a longer conversation already holds these positions
                    self._entries.move_to_end(eid)
                    return False
                if n == len(ekeys):  # this turn extends that entry: it is no longer needed
                    del self._entries[eid]
                    self._bytes -= esize
            self._entries[self._next] = (keys, kv, size)
            self._next += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, _, esize) = self._entries.popitem(last=False)
                self._bytes -= esize
                self._evictions += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
