"""Exact top-k search by dot product: one pass over the (memory-mapped) vectors with a streaming top-k.

Every kernel returns the same result: the k rows of highest score, best first, **ties (equal scores) broken by
the lower row id**, so neither the kernel nor the block size changes which ids come back. Which kernel runs:

- **one query or a few** (``len(queries) <= FEW_QUERIES``) over float32 rows: the scan is bound by memory
  bandwidth (one multiply-add per 4 bytes read), so it runs on one thread (one core nearly saturates this
  machine's memory bandwidth, and a second thread waits for a scheduler slice on a busy machine) through
  FAISS's flat kernel (``faiss.knn``) on the memory map itself when faiss is installed, else numpy's einsum
  loop (one thread too) over large blocks;
- **many queries**, or float16 rows: torch matrix products per block (compute-bound; all intra-op threads), with
  float16 rows converted to float32 in cache-sized pieces (the conversion is exact, so the scores are those of
  the stored float16 vectors).

Memory: the vectors are never copied (FAISS and numpy read the mapped pages); the scores of one block are at most
``SCORE_BUDGET`` floats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

# The (Q, block) scores of one block are bounded by this many floats (64 MB). Few, large blocks matter: every
# BLAS call wakes its threads, which costs a scheduler slice on a busy machine.
SCORE_BUDGET = 1 << 24
FEW_QUERIES = 4  # up to this many queries the scan is memory-bound: the one-thread kernels below
CONVERT_ROWS = 16384  # float16 rows converted to float32 at a time (16 MB at D=256: stays in the L3 cache)


@dataclass
class SearchResult:
    ids: np.ndarray  # (Q, k) int64, best first; -1 where there is no result (k > rows left after exclusions)
    scores: np.ndarray  # (Q, k) float32 cosine similarities; -inf where ids is -1


def exact_search(
    vectors: np.ndarray,
    queries: torch.Tensor,
    k: int,
    exclude: np.ndarray | None = None,
    *,
    block_rows: int | None = None,
    kernel: str = "auto",
) -> SearchResult:
    """Top-k rows of ``vectors`` (N, D) by dot product with each of ``queries`` (Q, D) float32.

    ``exclude``: sorted unique int64 row ids to leave out. ``kernel``: "auto" (see the module docstring),
    "faiss", "numpy" or "torch" (tests and benchmarks pin one)."""
    if kernel not in ("auto", "faiss", "numpy", "torch"):
        raise ValueError(f"kernel must be 'auto', 'faiss', 'numpy' or 'torch', got {kernel!r}")
    n, nq = vectors.shape[0], queries.shape[0]
    exclude = np.empty(0, np.int64) if exclude is None else exclude
    if kernel == "auto":
        few = nq <= FEW_QUERIES and vectors.dtype == np.float32
        kernel = ("faiss" if faiss_module() is not None else "numpy") if few else "torch"
    if kernel in ("faiss", "numpy") and vectors.dtype != np.float32:
        raise ValueError(f"the {kernel} kernel reads float32 rows; these are {vectors.dtype} (use kernel='torch')")
    if kernel == "faiss":
        ids, scores = _faiss_topk(vectors, queries.numpy(), k, exclude)
    else:
        if block_rows is None:
            block_rows = max(4096, SCORE_BUDGET // max(nq, 1))
        scorer = _numpy_scores if kernel == "numpy" else _torch_scores
        ids, scores = _streaming_topk(vectors, queries, min(k, n), exclude, block_rows, scorer)
    ids[~np.isfinite(scores)] = -1
    return SearchResult(ids=pad_columns(ids, k, -1), scores=pad_columns(scores.astype(np.float32), k, -np.inf))


# ------------------------------------------------------------------------------------------ kernels


def faiss_module():
    """The faiss module, or None when it is not installed (exact search then uses numpy)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_topk(vectors: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray) -> tuple[np.ndarray, ...]:
    """FAISS's flat inner-product kernel on the rows as they are (a memory map is read in place, not copied).

    It fetches k + |exclude| + 1 rows and drops the excluded ids. FAISS keeps any of equal scores at its cut, so
    the result is taken from what it fetched only where the k-th score beats the last one fetched (then every row
    that could be in the top k was fetched); a query whose k-th score ties with rows FAISS may have left out is
    searched again with the numpy kernel, which breaks ties by id (rare: exact duplicates at the cut)."""
    faiss = faiss_module()
    if faiss is None:
        raise ImportError("the faiss kernel needs faiss-cpu: pip install 'fromage_gill[faiss]'")
    n, nq = vectors.shape[0], len(queries)
    kk = min(k + len(exclude) + 1, n)
    if kk == 0:
        return np.empty((nq, 0), np.int64), np.empty((nq, 0), np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # the calling thread's OpenMP setting only; restored below
    try:
        scores, ids = faiss.knn(queries, vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.omp_set_num_threads(threads)
    last = scores[:, -1].copy()  # the lowest score fetched
    ids, scores = drop_excluded(ids, scores, exclude, k)
    if kk < n:
        undecided = np.flatnonzero(scores[:, min(k, n) - 1] <= last)
        if len(undecided):
            q = torch.from_numpy(np.ascontiguousarray(queries[undecided]))
            redo_i, redo_s = _streaming_topk(vectors, q, min(k, n), exclude, SCORE_BUDGET, _numpy_scores)
            ids[undecided], scores[undecided] = redo_i, redo_s
    return ids, scores


def drop_excluded(ids: np.ndarray, scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """(ids, scores) of FAISS's over-fetched (Q, k + |exclude|) results without the excluded ids, cut to k and
    in canonical order."""
    ids, scores = ids.astype(np.int64), scores.astype(np.float32)
    ids[ids < 0] = -1
    if len(exclude):
        drop = np.isin(ids, exclude)
        ids[drop], scores[drop] = -1, -np.inf
    scores[ids < 0] = -np.inf
    s, i = _canonical(torch.from_numpy(scores), torch.from_numpy(ids))
    return i[:, :k].numpy(), s[:, :k].numpy()


def _numpy_scores(vectors: np.ndarray, start: int, stop: int, q: torch.Tensor) -> torch.Tensor:
    # einsum's own loop: one thread, vectorised, each row read once for all queries (numpy's BLAS matrix-vector
    # product starts its threads on every call and lost to it 2-3x on this busy machine)
    return torch.from_numpy(np.einsum("ij,qj->qi", vectors[start:stop], q.numpy()))  # (Q, B)


def _torch_scores(vectors: np.ndarray, start: int, stop: int, q: torch.Tensor) -> torch.Tensor:
    block = torch.from_numpy(vectors[start:stop])
    if block.dtype == torch.float32:
        return q @ block.T  # (Q, B)
    s = torch.empty(q.shape[0], block.shape[0])
    for a in range(0, block.shape[0], CONVERT_ROWS):
        s[:, a : a + CONVERT_ROWS] = q @ block[a : a + CONVERT_ROWS].float().T
    return s


def _streaming_topk(vectors, queries, kk, exclude, block_rows, scorer) -> tuple[np.ndarray, np.ndarray]:
    nq = queries.shape[0]
    best_s, best_i = torch.empty(nq, 0), torch.empty(nq, 0, dtype=torch.int64)
    for start in range(0, vectors.shape[0], block_rows):
        stop = min(start + block_rows, vectors.shape[0])
        s = scorer(vectors, start, stop, queries)  # (Q, B)
        lo, hi = np.searchsorted(exclude, [start, stop])
        if hi > lo:
            s[:, torch.from_numpy(exclude[lo:hi] - start)] = -torch.inf
        v, ix = _block_topk(s, kk)
        # both lists are in canonical order and every id of this block is above the earlier ones, so a stable
        # sort by score keeps ties in id order
        merged_s, merged_i = torch.cat([best_s, v], dim=1), torch.cat([best_i, ix + start], dim=1)
        order = merged_s.sort(dim=1, descending=True, stable=True).indices[:, :kk]
        best_s, best_i = merged_s.gather(1, order), merged_i.gather(1, order)
    return best_i.numpy(), best_s.numpy()


def _block_topk(s: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical top-kk of each row of the block scores ``s`` (Q, B). torch.topk picks any of equal scores at
    the cut, so it is asked for one more: where that one ties with the kk-th, the rows scoring at least the cut
    are gathered and the lowest ids among the tied ones taken (a pass over that row of the block, only then)."""
    kb = min(kk, s.shape[1])
    extra = int(kb < s.shape[1])
    v, ix = s.topk(kb + extra, dim=1)
    if extra:
        tied = ((v[:, -1] == v[:, -2]) & torch.isfinite(v[:, -2])).nonzero().flatten().tolist()
        v, ix = v[:, :kb].contiguous(), ix[:, :kb].contiguous()
        for r in tied:
            candidates = (s[r] >= v[r, -1]).nonzero().flatten()  # ascending ids
            keep = s[r, candidates].sort(descending=True, stable=True).indices[:kb]
            ix[r] = candidates[keep]
            v[r] = s[r, ix[r]]
    return _canonical(v, ix)


def _canonical(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row ordered by score, best first, equal scores by ascending id (-1, no result, last)."""
    key = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    o = key.argsort(dim=1)
    scores, ids = scores.gather(1, o), ids.gather(1, o)
    o = scores.sort(dim=1, descending=True, stable=True).indices
    return scores.gather(1, o), ids.gather(1, o)


def pad_columns(a: np.ndarray, k: int, value) -> np.ndarray:
    """``a`` (Q, m) widened to (Q, k) with ``value``."""
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), value, dtype=a.dtype)], axis=1)
