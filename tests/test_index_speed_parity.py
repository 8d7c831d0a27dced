"""Exact search's kernels (FAISS's flat kernel, numpy, torch) return the same ids and scores as a float64
reference: ties broken by the lower row id, exclusions honoured, float16 storage within its stated tolerance.
(Speed itself is measured by benchmarks/bench_index.py, never here.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fromage_gill.retrieve.exact as exact_mod
from fromage_gill.retrieve import ImageIndex
from fromage_gill.retrieve.exact import exact_search

faiss = exact_mod.faiss_module()
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed (pip install 'fromage_gill[faiss]')")
KERNELS = [pytest.param("faiss", marks=needs_faiss), "numpy", "torch"]


def _canonical_reference(vectors: np.ndarray, queries: np.ndarray, k: int, exclude=()) -> tuple[np.ndarray, ...]:
    """Top-k in float64, best first, equal scores by ascending id (a stable sort of the negated scores)."""
    s = queries.astype(np.float64) @ vectors.astype(np.float64).T
    s[:, list(exclude)] = -np.inf
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def _signs(n: int, d: int, seed: int) -> np.ndarray:
    """Rows of +-1/4 with d = 16: unit norm exactly, and every dot product a multiple of 1/16 computed exactly in
    float32 in any summation order, so scores tie exactly (only 33 distinct values) whatever the kernel."""
    assert d == 16
    return (np.random.default_rng(seed).integers(0, 2, (n, d)) * 2 - 1).astype(np.float32) / 4


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block", [None, 97, 1024])
@pytest.mark.parametrize("nq", [1, 3, 7])
def test_ties_are_broken_by_the_lower_id_in_every_kernel(kernel, block, nq):
    vecs, queries = _signs(3000, 16, 0), _signs(nq, 16, 1)
    exclude = np.array([0, 5, 96, 97, 1500, 2999], np.int64)  # at block edges and inside blocks
    for k in (1, 10, 50):
        res = exact_search(vecs, torch.from_numpy(queries), k, exclude, block_rows=block, kernel=kernel)
        ref_ids, ref_scores = _canonical_reference(vecs, queries, k, exclude)
        assert np.array_equal(res.ids, ref_ids), (kernel, k)
        assert np.array_equal(res.scores, ref_scores.astype(np.float32))  # exact: the scores are multiples of 1/16
        # the test really splits ties at the cut: more rows score the k-th best score than the top-k holds
        full = queries @ np.delete(vecs, exclude, axis=0).T
        kth = ref_scores[:, -1:]
        assert ((full == kth).sum(1) > (ref_scores == kth).sum(1)).any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_float64_exact_search_on_random_vectors(kernel):
    vecs, queries = _unit(5000, 64, 2), _unit(4, 64, 3)
    res = exact_search(vecs, torch.from_numpy(queries), 20, np.array([7, 4999], np.int64), kernel=kernel)
    ref_ids, ref_scores = _canonical_reference(vecs, queries, 20, exclude=[7, 4999])
    assert np.array_equal(res.ids, ref_ids)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fewer_rows_than_k_pads_with_minus_one(kernel):
    vecs, queries = _signs(6, 16, 4), _signs(2, 16, 5)
    res = exact_search(vecs, torch.from_numpy(queries), 8, np.array([1, 4], np.int64), kernel=kernel)
    ref_ids, ref_scores = _canonical_reference(vecs, queries, 4, exclude=[1, 4])
    assert np.array_equal(res.ids[:, :4], ref_ids) and (res.ids[:, 4:] == -1).all()
    assert np.array_equal(res.scores[:, :4], ref_scores.astype(np.float32)) and np.isneginf(res.scores[:, 4:]).all()


def test_search_of_a_saved_index_is_exact_with_ties_on_the_memory_map(tmp_path):
    vecs = _signs(2000, 16, 6)
    vecs[1000:1010] = vecs[3]  # duplicates: exactly equal scores, ids 3 and 1000..1009
    ImageIndex.from_embeddings(vecs, [{"path": f"{i}.png"} for i in range(2000)], "t:0").save(tmp_path)
    index = ImageIndex.load(tmp_path)
    assert isinstance(index.vectors, np.memmap)
    for q in (vecs[3:4], _signs(2, 16, 7), _signs(16, 16, 8)):  # 1 query, few (faiss kernel), many (torch)
        res = index.search(q, 12, exclude={1004})
        ref_ids, _ = _canonical_reference(vecs, q, 12, exclude=[1004])
        assert np.array_equal(res.ids, ref_ids)
    assert index.search(vecs[3], 11).ids[0].tolist() == [3, *range(1000, 1010)]


def test_float16_storage_matches_float32_exact_search_where_gaps_exceed_its_error(tmp_path):
    """float16 rows are the float32 rows rounded (relative error <= 2**-11 per component), so for unit query and
    rows a score moves by at most 2**-11: a row whose float32 score is more than 2 x 2**-11 from its neighbours'
    keeps its rank."""
    vecs, queries = _unit(4000, 32, 9), _unit(6, 32, 10)
    ImageIndex.from_embeddings(vecs.astype(np.float16), [{"path": "x"}] * 4000, "t:0").save(tmp_path)
    index = ImageIndex.load(tmp_path)
    assert index.dtype == "float16"
    k, err = 30, 2.0**-11
    res = index.search(queries, k)
    ref_ids, ref_scores = _canonical_reference(vecs, queries, k + 1)
    # the float16 search is exact over the stored float16 vectors ...
    ids16, _ = _canonical_reference(np.asarray(index.vectors, np.float32), queries, k)
    assert np.array_equal(res.ids, ids16)
    # ... and each returned score is within the stated error of the float32 score of the same row
    assert np.abs(res.scores - np.einsum("qd,qkd->qk", queries, vecs[res.ids])).max() <= err
    gaps = -np.diff(ref_scores, axis=1)  # (Q, k) gap between rank j and j + 1
    checked = 0
    for qi in range(len(queries)):
        for j in range(k):
            above = np.inf if j == 0 else gaps[qi, j - 1]
            if above > 2 * err and gaps[qi, j] > 2 * err:
                assert res.ids[qi, j] == ref_ids[qi, j], (qi, j)
                checked += 1
    assert checked >= 10  # the data leaves enough well-separated ranks for the test to mean something


def test_no_faiss_falls_back_to_numpy_with_the_same_results(monkeypatch):
    vecs, queries = _signs(1500, 16, 11), _signs(1, 16, 12)
    with_faiss = exact_search(vecs, torch.from_numpy(queries), 25)
    monkeypatch.setattr(exact_mod, "faiss_module", lambda: None)
    without = exact_search(vecs, torch.from_numpy(queries), 25)
    assert np.array_equal(with_faiss.ids, without.ids) and np.array_equal(with_faiss.scores, without.scores)
    with pytest.raises(ImportError, match=r"fromage_gill\[faiss\]"):
        exact_search(vecs, torch.from_numpy(queries), 25, kernel="faiss")


@needs_faiss
def test_the_faiss_kernel_leaves_the_callers_thread_setting_alone():
    threads = faiss.omp_get_max_threads()
    exact_search(_signs(100, 16, 13), torch.from_numpy(_signs(1, 16, 14)), 5, kernel="faiss")
    assert faiss.omp_get_max_threads() == threads


def test_kernel_arguments_are_checked():
    vecs = _signs(10, 16, 15)
    q = torch.from_numpy(_signs(1, 16, 16))
    with pytest.raises(ValueError, match="kernel must be"):
        exact_search(vecs, q, 3, kernel="gpu")
    with pytest.raises(ValueError, match="float32 rows"):
        exact_search(vecs.astype(np.float16), q, 3, kernel="numpy")


def test_non_finite_queries_are_refused():
    index = ImageIndex.from_embeddings(_signs(10, 16, 17), [{"path": "x"}] * 10, "t:0")
    q = _signs(1, 16, 18)
    q[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(q, 3)
