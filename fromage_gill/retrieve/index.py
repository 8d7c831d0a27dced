"""Search an image index: ``ImageIndex`` holds the normalised image embeddings of one model and their records,
and returns the top-k images of a query by exact (blocked matmul) or FAISS search. The folder format is
``storage.py``'s; building one from images is ``build.py``'s, importing the published embeddings ``published.py``'s.

Scores: ``search`` returns cosine similarities, the dot products of the normalised query and image vectors,
in [-1, 1]. The model's retrieval logits (``GroundedLM.retrieval_logits``) are these times
``exp(logit_scale)``, a positive constant, so the ranking is the same.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..paths import CHECKOUT_ROOT
from .exact import SearchResult, drop_excluded, exact_search, pad_columns
from .fetch import FetchConfig, ImageFetcher
from .storage import (
    BLOCK_ROWS,
    EMBEDDINGS_FILE,
    FAISS_FILE,
    META_FILE,
    BrokenIndexError,
    FingerprintMismatchError,
    Records,
    check_normalised,
    first_non_finite,
    new_meta,
    non_finite_error,
    normalize_rows,
    read_embeddings,
    read_meta,
    read_records,
    write_embeddings,
    write_json,
    write_records,
)

logger = logging.getLogger(__name__)

LARGE_INDEX = 10_000_000  # above this, loading suggests a FAISS index (exact search stays available)


# ------------------------------------------------------------------------------------------ search


def _as_queries(queries: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    q = (
        queries.detach().float().cpu()
        if isinstance(queries, torch.Tensor)
        else torch.from_numpy(np.asarray(queries, dtype=np.float32))
    )
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) to search this index, got {tuple(q.shape)}")
    if not torch.isfinite(q).all():
        raise ValueError("queries hold NaN or infinite values: embed the query again (is the model's output finite?)")
    return q.contiguous()


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS search needs faiss-cpu: pip install 'fromage_gill[faiss]'") from None
    return faiss


# ------------------------------------------------------------------------------------------ the index


class ImageIndex:
    """Normalised image embeddings (N, D) of one model, their records, and optionally a FAISS index."""

    def __init__(
        self,
        vectors: np.ndarray,
        records: Records,
        fingerprint: str,
        *,
        model: str | None = None,
        directory: Path | None = None,
        faiss_index: Any = None,  # a faiss.Index: faiss ships no type information
        faiss_settings: dict | None = None,
        fetch_config: FetchConfig | None = None,
    ):
        if vectors.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {vectors.shape}")
        if len(records) != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} embeddings but {len(records)} records: one record per row")
        if not fingerprint:
            raise ValueError(
                "fingerprint must name the model the embeddings came from (pipeline.model.retrieval_fingerprint())"
            )
        self.vectors = vectors
        self.records = records
        self.fingerprint = fingerprint
        self.model = model or fingerprint.split(":")[0]
        self.directory = directory
        self.faiss_index = faiss_index
        self.faiss_settings = faiss_settings
        self._fetch_config = fetch_config
        self._fetcher: ImageFetcher | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------- construction

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor | np.ndarray,
        records: Sequence[dict],
        fingerprint: str,
        *,
        model: str | None = None,
        normalize: bool = False,
        fetch_config: FetchConfig | None = None,
    ) -> ImageIndex:
        """An in-memory index. ``embeddings`` must be L2-normalised (or pass ``normalize=True``)."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().float().cpu().numpy()
        vectors = np.array(embeddings, dtype=np.float32 if embeddings.dtype != np.float16 else np.float16, copy=True)
        if vectors.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {vectors.shape}")
        bad = first_non_finite(vectors)
        if bad is not None:
            raise ValueError(
                f"embeddings row {bad} holds NaN or infinite values, so no search could rank it: embed that image "
                f"again (is the model's output finite in this dtype?)"
            )
        if normalize:
            vectors = normalize_rows(vectors.astype(np.float32))
        else:
            check_normalised(vectors, "embeddings")
        return cls(vectors, list(records), fingerprint, model=model, fetch_config=fetch_config)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        expected_fingerprint: str | None = None,
        mmap: bool = True,
        use_faiss: bool = True,
        fetch_config: FetchConfig | None = None,
    ) -> ImageIndex:
        """Open a saved index; with ``expected_fingerprint`` (the model's), refuse one made by another model."""
        d = Path(directory)
        meta = read_meta(d)
        fingerprint = meta["fingerprint"]
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise FingerprintMismatchError(
                f"the index at {d} was built by model fingerprint {fingerprint!r}, but this model's fingerprint is "
                f"{expected_fingerprint!r}: their image embeddings are different spaces, so its results would be "
                f"meaningless. Build an index with this model (fromage-gill index build --model ... --images ... "
                f"--out DIR) or use the one made for it."
            )
        vectors = read_embeddings(d, meta, mmap_mode=mmap)
        records = read_records(d, vectors.shape[0])
        faiss_index, settings = None, meta.get("faiss")
        if use_faiss and settings and (d / FAISS_FILE).is_file():
            try:
                faiss_index = _faiss().read_index(str(d / FAISS_FILE))
            except ImportError as e:
                logger.warning("%s has a FAISS index but %s; using exact search", d, e)
            except RuntimeError as e:  # FAISS's error for a truncated or foreign file
                raise BrokenIndexError(
                    f"{d / FAISS_FILE} is not a readable FAISS index ({str(e).strip().splitlines()[0]}); rebuild it "
                    f"with `fromage-gill index faiss {d} --kind KIND`, or delete it to search exactly"
                ) from None
            if faiss_index is not None and faiss_index.ntotal != vectors.shape[0]:
                logger.warning(
                    "%s: the FAISS index holds %d vectors, not %d: ignoring it (rebuild it with "
                    "`fromage-gill index faiss`)",
                    d,
                    faiss_index.ntotal,
                    vectors.shape[0],
                )
                faiss_index = None
            if faiss_index is not None:
                _apply_faiss_settings(faiss_index, settings)
        if faiss_index is None and vectors.shape[0] > LARGE_INDEX:
            logger.info(
                "%s holds %d vectors: exact search reads all %.1f GB per query batch; for faster, approximate "
                "search build a FAISS index: fromage-gill index faiss %s --kind hnsw",
                d,
                vectors.shape[0],
                vectors.nbytes / 1e9,
                d,
            )
        return cls(
            vectors,
            records,
            fingerprint,
            model=meta.get("model"),
            directory=d,
            faiss_index=faiss_index,
            faiss_settings=settings if faiss_index is not None else None,
            fetch_config=fetch_config,
        )

    def save(self, directory: str | Path) -> Path:
        """Write the index folder (vectors streamed in blocks, so a memory-mapped index is saved without a copy)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dtype = "float16" if self.vectors.dtype == np.float16 else "float32"
        meta = new_meta(self.model, self.fingerprint, self.vectors.shape, dtype)
        same_dir = self.directory is not None and d.resolve() == self.directory.resolve()
        if same_dir:  # only the FAISS part can change in place; keep what the build recorded
            meta = {**json.loads((d / META_FILE).read_text()), "faiss": None}
        else:
            write_embeddings(d / EMBEDDINGS_FILE, self.vectors, dtype, meta)
            write_records(iter(self.records), d)
        if self.faiss_index is not None:
            _faiss().write_index(self.faiss_index, str(d / FAISS_FILE))
            meta["faiss"] = self.faiss_settings
        elif (d / FAISS_FILE).exists():
            (d / FAISS_FILE).unlink()
        write_json(d / META_FILE, meta)
        return d

    # -------------------------------------------------------------------------------- properties

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def dtype(self) -> str:
        return str(self.vectors.dtype)

    @property
    def nbytes(self) -> int:
        return self.vectors.shape[0] * self.vectors.shape[1] * self.vectors.dtype.itemsize

    def record(self, i: int) -> dict:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"record {i} is out of range for an index of {len(self)} images")
        return dict(self.records[int(i)])

    def __repr__(self) -> str:
        where = f", {self.directory}" if self.directory else ""
        fa = f", faiss {self.faiss_settings['kind']}" if self.faiss_settings else ""
        return f"ImageIndex({len(self):,} images x {self.dim} {self.dtype}, {self.fingerprint}{fa}{where})"

    # -------------------------------------------------------------------------------- search

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, exclude: set[int] | None = None, *, method: str = "auto"
    ) -> SearchResult:
        """Top-``k`` images per query (queries (Q, D) or (D,), L2-normalised, from ``text_embedding``).

        ``exclude``: row ids never returned (e.g. images already in the conversation).
        ``method``: "exact" (blocked matmul over every row), "faiss" (the folder's FAISS index), or "auto" (FAISS
        when the index has one, else exact).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if method not in ("auto", "exact", "faiss"):
            raise ValueError(f"method must be 'auto', 'exact' or 'faiss', got {method!r}")
        q = _as_queries(queries, self.dim)
        ex = np.unique(np.fromiter((int(i) for i in exclude), dtype=np.int64)) if exclude else None
        if method == "faiss" and self.faiss_index is None:
            raise ValueError(
                "this index has no FAISS index: build one with index.build_faiss(kind) or "
                "`fromage-gill index faiss DIR --kind ...`, or search with method='exact'"
            )
        if method == "exact" or self.faiss_index is None or len(self) == 0:
            result = exact_search(self.vectors, q, k, ex)
        else:
            result = self._faiss_search(q, k, ex)
        if np.isnan(result.scores).any():  # a NaN row the sampled check at load did not meet (queries are finite)
            row = first_non_finite(self.vectors)  # an error path: the full scan is worth naming the row
            if row is None:  # every row finite: the NaN came from elsewhere (the query, the search backend)
                raise BrokenIndexError("a search gave NaN scores though every embeddings row is finite")
            if self.directory is not None:
                raise non_finite_error(self.directory, row)
            raise BrokenIndexError(f"embeddings row {row} holds NaN values: rebuild the index")
        return result

    def _faiss_search(self, q: torch.Tensor, k: int, exclude: np.ndarray | None) -> SearchResult:
        exclude = np.empty(0, np.int64) if exclude is None else exclude
        kk = min(k + len(exclude), len(self))  # over-fetch, then drop the excluded ids
        scores, ids = self.faiss_index.search(q.numpy(), kk)
        ids, scores = drop_excluded(ids, scores, exclude, k)
        return SearchResult(ids=pad_columns(ids, k, -1), scores=pad_columns(scores, k, -np.inf))

    def build_faiss(
        self,
        kind: str = "hnsw",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        train_size: int = 262_144,
        seed: int = 0,
    ) -> None:
        """Build a FAISS index over the rows: "flat" (exact; a copy of the vectors), "ivf" (IVF-Flat, approximate,
        ``nlist`` lists, ``nprobe`` searched) or "hnsw" (graph, approximate). ``save`` writes it beside the vectors."""
        faiss = _faiss()
        n, d = self.vectors.shape
        if n == 0:
            raise ValueError("cannot build a FAISS index over an empty index")
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            settings = {"kind": "flat"}
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, metric)
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(n, max(train_size, 39 * nlist)), replace=False))
            index.train(np.ascontiguousarray(self.vectors[sample], dtype=np.float32))
            settings = {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, metric)
            index.hnsw.efConstruction = ef_construction
            settings = {"kind": "hnsw", "m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        else:
            raise ValueError(f"kind must be 'flat', 'ivf' or 'hnsw', got {kind!r}")
        for i in range(0, n, BLOCK_ROWS * 4):
            index.add(np.ascontiguousarray(self.vectors[i : i + BLOCK_ROWS * 4], dtype=np.float32))
        _apply_faiss_settings(index, settings)
        self.faiss_index, self.faiss_settings = index, settings

    # -------------------------------------------------------------------------------- images

    @property
    def fetcher(self) -> ImageFetcher:
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ImageFetcher(self._fetch_config, base_dir=self.directory)
            return self._fetcher

    def set_fetch_config(self, config: FetchConfig) -> None:
        with self._lock:
            if self._fetcher is not None:
                self._fetcher.close()
            self._fetch_config, self._fetcher = config, None

    def load_image(self, i: int):
        """The image of row ``i`` (raises ImageError / FetchError saying why it cannot be had)."""
        return self.fetcher.load(self.record(i))

    def fetch_first(self, ids: Sequence[int]):
        """(id, PIL image) of the first of ``ids`` (in order) whose image loads, or None. Candidates are fetched
        concurrently; failures are logged and skipped, never raised."""
        ids = [int(i) for i in ids if int(i) >= 0]
        found = self.fetcher.fetch_first([self.record(i) for i in ids])
        if found is None:
            return None
        pos, img = found
        return ids[pos], img


def _apply_faiss_settings(index, settings: dict) -> None:
    if settings.get("kind") == "ivf":
        index.nprobe = int(settings.get("nprobe", 16))
    elif settings.get("kind") == "hnsw":
        index.hnsw.efSearch = int(settings.get("ef_search", 128))


def shipped_index_dir(model_name: str) -> Path | None:
    """The prebuilt index of a source checkout for a shipped preset, if there is one: ``assets/indexes/<name>``
    (the tiny presets' photos) or ``checkpoints/indexes/<name>`` (the toy world's gallery, built with the model)."""
    for d in (CHECKOUT_ROOT / "assets" / "indexes", CHECKOUT_ROOT / "checkpoints" / "indexes"):
        d = d / model_name
        if (d / META_FILE).is_file():
            return d
    return None
