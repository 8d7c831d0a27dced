"""``BatchCache``'s ``SpareLayer``: a step's new columns are written in place, with the numbers concatenation gives,
without touching what earlier steps were handed; past its spare room the buffer is made anew."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from fromage_gill.generate.batch_cache import BatchCache, SpareLayer


def kv(rows: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)) for _ in range(2)]


def test_spare_layer_matches_concatenation_and_keeps_earlier_views():
    (k0, v0), _ = kv(3, 5, 0)
    layer = SpareLayer(k0, v0, spare=4)
    ref_k, ref_v = k0, v0
    handed = []
    for step in range(7):  # 1, 2 or 3 columns a step: past the 4 spare columns twice
        (k, v), _ = kv(3, 1 + step % 3, step + 1)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        handed.append((keys, ref_k.clone()))
    for keys, then in handed:  # later writes went past every view handed out
        assert torch.equal(keys, then)
    assert layer.get_seq_length() == ref_k.shape[2]


def test_a_batch_cache_steps_in_place_and_rows_leave_with_their_own_positions():
    cache = BatchCache()
    cache.add([kv(1, 3, 1), kv(1, 5, 2)])  # rows of 3 and 5 positions: the first left-padded by 2
    assert all(isinstance(layer, SpareLayer) for layer in cache.cache.layers)
    assert cache.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    ref = DynamicCache(ddp_cache_data=cache.layers())
    for step in range(3):
        cache.extend(torch.ones(2, 1, dtype=torch.long))
        for i, (k, v) in enumerate(kv(2, 1, 10 + step)):
            mine = cache.cache.layers[i].update(k, v)
            theirs = ref.layers[i].update(k, v)
            assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    first = cache.row(0)
    assert first[0][0].shape == (1, 2, 3 + 3, 4)  # its own 3 positions and the 3 steps'
    assert torch.equal(first[0][0], ref.layers[0].keys[0:1, :, 2:])
    cache.keep([1])  # the first row leaves: the second keeps all its columns
    assert cache.mask.tolist() == [[1] * 8] and torch.equal(cache.layers()[1][1], ref.layers[1].values[1:2])
