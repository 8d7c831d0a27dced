"""``BatchCache``: the KV cache of a batch whose rows join and leave between decode steps.

One ``DynamicCache`` of B rows over L columns and a ``(B, L)`` attention mask saying which columns each row attends
to. A row that joins brings its own positions only; the shorter of it and the batch is left-padded (masked). A step
that feeds several tokens to one row (the r image tokens) pads the others in the middle of their sequences, which
the mask also hides. A row leaves with exactly its own positions (``row``), and columns no remaining row attends to
are dropped, so the batch is never wider than its longest row plus the padding still in use.

Its layers are ``SpareLayer``s: a decode step writes its new columns into spare room instead of copying the whole
cache (transformers' ``DynamicLayer`` concatenates, copying every row's every position at every step).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .prefix_cache import KV

SPARE_COLUMNS = 64  # room made for the steps to come whenever a layer's buffer is (re)made


class SpareLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with ``spare`` more columns. ``update`` writes
    the new columns in place while they fit (a copy of the cache every ``spare`` steps, not every step: at batch 8 x
    500 positions of OPT-6.7B in fp16 that copy is 2 GB a step). ``assign`` sets new keys and values (a batch that
    changed rows); the next ``update`` makes buffers for them. The views handed out never see a later write: writes
    go to columns past them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE_COLUMNS):
        super().__init__()
        self.spare = spare
        self.assign(keys, values)

    def assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None, "a SpareLayer is made with its keys and values"
        n, t = self.keys.shape[-2], key_states.shape[-2]
        if self._buffers is None or n + t > self._buffers[0].shape[-2]:
            shape = (*self.keys.shape[:-2], n + t + self.spare, self.keys.shape[-1])
            k, v = self.keys.new_empty(shape), self.values.new_empty(shape)
            k[..., :n, :], v[..., :n, :] = self.keys, self.values
            self._buffers = (k, v)
        k, v = self._buffers
        k[..., n : n + t, :], v[..., n : n + t, :] = key_states, value_states
        self.keys, self.values = k[..., : n + t, :], v[..., : n + t, :]
        return self.keys, self.values


class BatchCache:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)  # where the LM's cache lives
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) long, on the CPU

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def layers(self) -> KV:
        """Per layer: the batch's keys and values, (B, heads, L, head_dim)."""
        return [layer_kv(layer) for layer in self.cache.layers] if self.cache is not None else []

    def _set(self, kv: KV) -> None:
        assert self.cache is not None
        for layer, (k, v) in zip(self.cache.layers, kv, strict=True):
            assert isinstance(layer, SpareLayer), "the batch's layers are SpareLayers"
            layer.assign(k, v)

    def add(self, kvs: list[KV]) -> None:
        """Append rows: each ``kv`` per layer (1, heads, n, head_dim), all n positions its own. One copy of the
        batch for all of them (every join pads the whole batch once)."""
        if not kvs:
            return
        old = self.layers()
        widths = [kv[0][0].shape[2] for kv in kvs]
        width = max([*widths, 0 if self.mask is None else self.mask.shape[1]])
        parts = ([old] if old else []) + kvs
        layers = [
            (
                torch.cat([_pad_left(kv[i][0], width) for kv in parts]),
                torch.cat([_pad_left(kv[i][1], width) for kv in parts]),
            )
            for i in range(len(kvs[0]))
        ]
        masks = ([self.mask] if self.mask is not None else []) + [torch.ones(1, n, dtype=torch.long) for n in widths]
        self.mask = torch.cat([_pad_left(m, width) for m in masks])
        if self.cache is None:
            self.cache = DynamicCache()
            self.cache.layers.extend(SpareLayer(k, v) for k, v in layers)
        else:
            self._set(layers)

    def row(self, j: int) -> KV:
        """Row j's KV over the columns it attends to: (1, heads, its positions, head_dim) per layer (a copy)."""
        assert self.mask is not None, "the batch has rows"
        cols = self.mask[j].bool().to(self.device)
        return [(k[j : j + 1, :, cols], v[j : j + 1, :, cols]) for k, v in self.layers()]

    def keep(self, rows: list[int]) -> None:
        """Keep ``rows`` (in that order); drop the columns none of them attends to."""
        if not rows:
            self.cache = self.mask = None
            return
        if rows == list(range(len(self))):  # the common step: nobody left, nothing to copy
            return
        assert self.mask is not None
        mask = self.mask[rows]
        cols = mask.any(0)
        idx = torch.tensor(rows, device=self.device)
        kept = [(k[idx], v[idx]) for k, v in self.layers()]
        if not bool(cols.all()):
            lm_cols = cols.to(self.device)
            kept = [(k[:, :, lm_cols], v[:, :, lm_cols]) for k, v in kept]
            mask = mask[:, cols]
        self._set(kept)
        self.mask = mask

    def extend(self, new_mask: torch.Tensor, attention: str = "sdpa") -> torch.Tensor:
        """The attention mask for a forward that feeds ``new_mask`` (B, T) more columns (the forward appends their
        KV). For the LM's ``attention`` implementation "sdpa" (or "eager") it is the whole (B, 1, T, L) mask, causal
        within the new columns, bool (or additive), which transformers uses as it is instead of building it from the
        (B, L) one each step (a third of a small model's decode step; the same numbers); else the (B, L) mask."""
        assert self.mask is not None, "the batch has rows"
        self.mask = torch.cat([self.mask, new_mask.to(torch.long)], dim=1)
        if attention not in ("sdpa", "eager"):
            return self.mask
        n, t = self.mask.shape[1], new_mask.shape[1]
        causal = torch.arange(n)[None, :] <= torch.arange(n - t, n)[:, None]  # (T, L): column l is not after query t
        allowed = (self.mask.bool()[:, None, None, :] & causal[None, None]).to(self.device)  # (B, 1, T, L)
        if attention == "sdpa":
            return allowed
        dtype = self.layers()[0][0].dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, torch.finfo(dtype).min)


def layer_kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``DynamicCache`` layer's keys and values."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x``, a (B, L) mask or (B, H, L, D) KV, zero-padded on the left of its position axis to ``width``."""
    dim = 1 if x.dim() == 2 else 2
    n = width - x.shape[dim]
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)
