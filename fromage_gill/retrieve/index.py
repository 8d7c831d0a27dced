"""The retrieval index: image embeddings of one model, searched by dot product, with where each image lives.

An index is a folder:
- ``embeddings.safetensors``: one tensor ``embeddings`` (N, D), float32 or float16, rows L2-normalised; the
  header's metadata repeats the fingerprint, so the file alone says which model made it;
- ``index.json``: format version, model name, ``fingerprint`` (``GroundedLM.retrieval_fingerprint()``), dim,
  count, dtype, and the optional FAISS index's settings;
- ``records.jsonl``: one JSON object per row: ``path`` (relative to the folder, or absolute) or ``url``, and
  optional ``caption``, ``license``, ``source``, ``sha256`` (of the encoded file), ``member``/``offset``/``size``
  (a member of a tar shard);
- ``records.offsets.npy``: int64 byte offsets of the lines, so record ``i`` is read without parsing the others;
- ``faiss.index`` (optional): a FAISS index over the same rows, built on request (``build_faiss``);
- ``skipped.tsv`` (built indexes): the images that could not be read, and why.

Loading memory-maps the vectors (numpy over the safetensors data offset): opening a 2.6M x 256 index reads
nothing until a search touches the pages, and the pages are the OS page cache's, never a second copy.

Scores: ``search`` returns cosine similarities, the dot products of the normalised query and image vectors,
in [-1, 1]. The model's retrieval logits (``GroundedLM.retrieval_logits``) are these times
``exp(logit_scale)``, a positive constant, so the ranking is the same.
"""

from __future__ import annotations

import datetime
import json
import logging
import mmap
import os
import pickle
import shutil
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..images import MAX_IMAGE_BYTES, ImageError, load_image
from ..paths import CHECKOUT_ROOT
from .fetch import FetchConfig, ImageFetcher
from .sources import ImageItem, is_url, iter_image_caption_items, read_item_bytes

logger = logging.getLogger(__name__)

FORMAT = "fromage_gill.image_index"
VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
META_FILE = "index.json"
RECORDS_FILE = "records.jsonl"
OFFSETS_FILE = "records.offsets.npy"
FAISS_FILE = "faiss.index"
SKIPPED_FILE = "skipped.tsv"
BUILD_DIR = ".build"
TENSOR = "embeddings"
SCORE = "cosine similarity (dot product of L2-normalised vectors); retrieval logit = exp(logit_scale) x score"
_ST_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}
_NORM_TOLERANCE = 1e-2  # float16 storage rounds norms by ~1e-3
BLOCK_ROWS = 32768  # rows per chunk when streaming vectors to disk or FAISS
# Exact search scores a block of rows per matmul; the (Q, block) scores are bounded by this many floats (64 MB).
# Few, large blocks matter: every BLAS call wakes its threads, which costs a scheduler slice on a busy machine.
SCORE_BUDGET = 1 << 24
LARGE_INDEX = 10_000_000  # above this, loading suggests a FAISS index (exact search stays available)
MAX_CONVERTED_ROWS = 1 << 17  # float16 blocks are converted to float32 copies: at most 128 MB at D=256


class FingerprintMismatchError(ValueError):
    """An index built by another model (its image embeddings live in another space)."""


class UntrustedPickleError(ValueError):
    """A pickle the user has not declared trusted."""


@dataclass
class SearchResult:
    ids: np.ndarray  # (Q, k) int64, best first; -1 where there is no result (k > rows left after exclusions)
    scores: np.ndarray  # (Q, k) float32 cosine similarities; -inf where ids is -1


# ------------------------------------------------------------------------------------------ records


class _JsonlRecords:
    """Records of a saved index, read on demand through the line offsets (millions of dicts would cost GBs)."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path = path
        self.offsets = offsets  # (N + 1,) int64
        self._file = open(path, "rb")  # noqa: SIM115 -- lives as long as the index
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        return json.loads(self._map[int(self.offsets[i]): int(self.offsets[i + 1])])

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


def _write_records(records: Iterable[dict], directory: Path) -> int:
    """records.jsonl + records.offsets.npy; returns the count."""
    offsets = [0]
    with open(directory / RECORDS_FILE, "wb") as f:
        for r in records:
            line = json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            f.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(directory / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


def _line_offsets(path: Path) -> np.ndarray:
    offsets = [0]
    with open(path, "rb") as f:
        for line in f:
            offsets.append(offsets[-1] + len(line))
    return np.asarray(offsets, dtype=np.int64)


# ------------------------------------------------------------------------------------------ safetensors


def _write_safetensors(path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, int], dtype: str,
                       metadata: dict[str, str]) -> None:
    """Stream (rows, D) chunks into a one-tensor safetensors file without holding the whole matrix."""
    st_dtype, np_dtype = _ST_DTYPES[dtype]
    nbytes = shape[0] * shape[1] * np.dtype(np_dtype).itemsize
    header = {TENSOR: {"dtype": st_dtype, "shape": list(shape), "data_offsets": [0, nbytes]},
              "__metadata__": metadata}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in chunks:
            b = np.ascontiguousarray(chunk, dtype=np_dtype).tobytes()
            f.write(b)
            written += len(b)
    if written != nbytes:
        tmp.unlink()
        raise ValueError(f"wrote {written} bytes of embeddings, expected {nbytes} for shape {shape}")
    os.replace(tmp, path)


def _map_safetensors(path: Path, *, mmap_mode: bool) -> tuple[np.ndarray, dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    if TENSOR not in header:
        raise ValueError(f"{path} has no {TENSOR!r} tensor (it has {sorted(header)})")
    t = header[TENSOR]
    np_dtype = {v[0]: v[1] for v in _ST_DTYPES.values()}.get(t["dtype"])
    if np_dtype is None:
        raise ValueError(f"{path}: embeddings must be F32 or F16, got {t['dtype']}")
    rows, dim = t["shape"]
    start = 8 + n + t["data_offsets"][0]
    if rows == 0:
        return np.zeros((0, dim), dtype=np_dtype), meta
    if mmap_mode:
        # copy-on-write mapping: writable for torch, shares the page cache, never writes back to the file
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=start, shape=(rows, dim))
    else:
        arr = np.fromfile(path, dtype=np_dtype, count=rows * dim, offset=start).reshape(rows, dim)
    return arr, meta


# ------------------------------------------------------------------------------------------ search


def _as_queries(queries: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    q = queries.detach().float().cpu() if isinstance(queries, torch.Tensor) else torch.from_numpy(
        np.asarray(queries, dtype=np.float32))
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) to search this index, got {tuple(q.shape)}")
    return q.contiguous()


def exact_search(vectors: np.ndarray, queries: torch.Tensor, k: int, exclude: np.ndarray | None = None,
                 *, block_rows: int | None = None) -> SearchResult:
    """Top-k by dot product over all rows, block by block: one pass over the vectors, memory O(Q x block).

    ``exclude``: sorted unique int64 row ids to leave out."""
    n = vectors.shape[0]
    nq = queries.shape[0]
    if block_rows is None:
        block_rows = max(4096, SCORE_BUDGET // max(nq, 1))
        if vectors.dtype != np.float32:
            block_rows = min(block_rows, MAX_CONVERTED_ROWS)
    kk = min(k, n)
    best_s = torch.full((nq, kk), -torch.inf)
    best_i = torch.full((nq, kk), -1, dtype=torch.int64)
    exclude = np.empty(0, np.int64) if exclude is None else exclude
    for start in range(0, n, block_rows):
        block = torch.from_numpy(vectors[start: start + block_rows])
        if block.dtype != torch.float32:
            block = block.float()
        s = queries @ block.T  # (Q, B)
        lo, hi = np.searchsorted(exclude, [start, start + block.shape[0]])
        if hi > lo:
            s[:, torch.from_numpy(exclude[lo:hi] - start)] = -torch.inf
        v, ix = s.topk(min(kk, block.shape[0]), dim=1)
        merged_s = torch.cat([best_s, v], dim=1)
        merged_i = torch.cat([best_i, ix + start], dim=1)
        best_s, pos = merged_s.topk(kk, dim=1)
        best_i = merged_i.gather(1, pos)
    ids = best_i.numpy()
    scores = best_s.numpy().astype(np.float32)
    ids[~np.isfinite(scores)] = -1
    return SearchResult(ids=_pad(ids, k, -1), scores=_pad(scores, k, -np.inf))


def _pad(a: np.ndarray, k: int, value) -> np.ndarray:
    if a.shape[1] >= k:
        return a
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), value, dtype=a.dtype)], axis=1)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS search needs faiss-cpu: pip install 'fromage_gill[faiss]'") from None
    return faiss


# ------------------------------------------------------------------------------------------ the index


class ImageIndex:
    """Normalised image embeddings (N, D) of one model, their records, and optionally a FAISS index."""

    def __init__(self, vectors: np.ndarray, records: Sequence[dict], fingerprint: str, *, model: str | None = None,
                 directory: Path | None = None, faiss_index: Any = None, faiss_settings: dict | None = None,
                 fetch_config: FetchConfig | None = None):
        if vectors.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {vectors.shape}")
        if len(records) != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} embeddings but {len(records)} records: one record per row")
        if not fingerprint:
            raise ValueError("fingerprint must name the model the embeddings came from "
                             "(pipeline.model.retrieval_fingerprint())")
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
    def from_embeddings(cls, embeddings: torch.Tensor | np.ndarray, records: Sequence[dict], fingerprint: str, *,
                        model: str | None = None, normalize: bool = False,
                        fetch_config: FetchConfig | None = None) -> ImageIndex:
        """An in-memory index. ``embeddings`` must be L2-normalised (or pass ``normalize=True``)."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().float().cpu().numpy()
        vectors = np.array(embeddings, dtype=np.float32 if embeddings.dtype != np.float16 else np.float16,
                           copy=True)
        if vectors.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {vectors.shape}")
        if normalize:
            vectors = normalize_rows(vectors.astype(np.float32))
        else:
            _check_normalised(vectors, "embeddings")
        return cls(vectors, list(records), fingerprint, model=model, fetch_config=fetch_config)

    @classmethod
    def load(cls, directory: str | Path, *, expected_fingerprint: str | None = None, mmap: bool = True,
             use_faiss: bool = True, fetch_config: FetchConfig | None = None) -> ImageIndex:
        """Open a saved index; with ``expected_fingerprint`` (the model's), refuse one made by another model."""
        d = Path(directory)
        if not (d / META_FILE).is_file():
            hint = " (an unfinished build: run the same `index build` again to resume it)" if (d / BUILD_DIR).is_dir() \
                else ""
            raise FileNotFoundError(f"{d} is not an image index: {META_FILE} is missing{hint}")
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / META_FILE} is not a {FORMAT} file (format {meta.get('format')!r})")
        if meta.get("version", 0) > VERSION:
            raise ValueError(f"{d} uses index format version {meta['version']}; this fromage_gill reads up to "
                             f"{VERSION}: upgrade fromage_gill")
        fingerprint = meta["fingerprint"]
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise FingerprintMismatchError(
                f"the index at {d} was built by model fingerprint {fingerprint!r}, but this model's fingerprint is "
                f"{expected_fingerprint!r}: their image embeddings are different spaces, so its results would be "
                f"meaningless. Build an index with this model (fromage-gill index build --model ... --images ... "
                f"--out DIR) or use the one made for it."
            )
        vectors, st_meta = _map_safetensors(d / EMBEDDINGS_FILE, mmap_mode=mmap)
        if st_meta.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(f"{d}: {EMBEDDINGS_FILE} says fingerprint {st_meta.get('fingerprint')!r} but "
                             f"{META_FILE} says {fingerprint!r}: the folder mixes two indexes; rebuild it")
        if vectors.shape != (meta["count"], meta["dim"]):
            raise ValueError(f"{d}: {META_FILE} says {meta['count']} x {meta['dim']} but {EMBEDDINGS_FILE} holds "
                             f"{vectors.shape[0]} x {vectors.shape[1]}: the folder is inconsistent; rebuild it")
        offsets_path = d / OFFSETS_FILE
        offsets = np.load(offsets_path, mmap_mode="r") if offsets_path.is_file() else _line_offsets(d / RECORDS_FILE)
        records = _JsonlRecords(d / RECORDS_FILE, offsets)
        if len(records) != vectors.shape[0]:
            raise ValueError(f"{d}: {len(records)} records for {vectors.shape[0]} embeddings; rebuild the index")
        faiss_index, settings = None, meta.get("faiss")
        if use_faiss and settings and (d / FAISS_FILE).is_file():
            try:
                faiss_index = _faiss().read_index(str(d / FAISS_FILE))
            except ImportError as e:
                logger.warning("%s has a FAISS index but %s; using exact search", d, e)
            if faiss_index is not None and faiss_index.ntotal != vectors.shape[0]:
                logger.warning("%s: the FAISS index holds %d vectors, not %d: ignoring it (rebuild it with "
                               "`fromage-gill index faiss`)", d, faiss_index.ntotal, vectors.shape[0])
                faiss_index = None
            if faiss_index is not None:
                _apply_faiss_settings(faiss_index, settings)
        if faiss_index is None and vectors.shape[0] > LARGE_INDEX:
            logger.info("%s holds %d vectors: exact search reads all %.1f GB per query batch; for faster, approximate "
                        "search build a FAISS index: fromage-gill index faiss %s --kind hnsw", d, vectors.shape[0],
                        vectors.nbytes / 1e9, d)
        return cls(vectors, records, fingerprint, model=meta.get("model"), directory=d, faiss_index=faiss_index,
                   faiss_settings=settings if faiss_index is not None else None, fetch_config=fetch_config)

    def save(self, directory: str | Path) -> Path:
        """Write the index folder (vectors streamed in blocks, so a memory-mapped index is saved without a copy)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dtype = "float16" if self.vectors.dtype == np.float16 else "float32"
        n, dim = self.vectors.shape
        meta = {"format": FORMAT, "version": VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "dim": dim, "count": n, "dtype": dtype, "score": SCORE,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "faiss": None}
        same_dir = self.directory is not None and d.resolve() == self.directory.resolve()
        if same_dir:  # only the FAISS part can change in place; keep what the build recorded
            meta = {**json.loads((d / META_FILE).read_text()), "faiss": None}
        else:
            chunks = (self.vectors[i: i + BLOCK_ROWS] for i in range(0, n, BLOCK_ROWS))
            _write_safetensors(d / EMBEDDINGS_FILE, chunks, (n, dim), dtype, _st_meta(meta))
            _write_records(iter(self.records), d)
        if self.faiss_index is not None:
            _faiss().write_index(self.faiss_index, str(d / FAISS_FILE))
            meta["faiss"] = self.faiss_settings
        elif (d / FAISS_FILE).exists():
            (d / FAISS_FILE).unlink()
        _write_json(d / META_FILE, meta)
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

    def search(self, queries: torch.Tensor | np.ndarray, k: int, exclude: set[int] | None = None, *,
               method: str = "auto") -> SearchResult:
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
            raise ValueError("this index has no FAISS index: build one with index.build_faiss(kind) or "
                             "`fromage-gill index faiss DIR --kind ...`, or search with method='exact'")
        if method == "exact" or self.faiss_index is None or len(self) == 0:
            return exact_search(self.vectors, q, k, ex)
        return self._faiss_search(q, k, ex)

    def _faiss_search(self, q: torch.Tensor, k: int, exclude: np.ndarray | None) -> SearchResult:
        n_ex = 0 if exclude is None else len(exclude)
        kk = min(k + n_ex, len(self))  # over-fetch, then drop the excluded ids
        scores, ids = self.faiss_index.search(q.numpy(), kk)
        ids = ids.astype(np.int64)
        scores = scores.astype(np.float32)
        if n_ex:
            drop = np.isin(ids, exclude)
            ids[drop], scores[drop] = -1, -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")
            ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        scores[ids < 0] = -np.inf
        return SearchResult(ids=_pad(ids[:, :k], k, -1), scores=_pad(scores[:, :k], k, -np.inf))

    def build_faiss(self, kind: str = "hnsw", *, nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
                    ef_construction: int = 200, ef_search: int = 128, train_size: int = 262_144,
                    seed: int = 0) -> None:
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
            index.add(np.ascontiguousarray(self.vectors[i: i + BLOCK_ROWS * 4], dtype=np.float32))
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


def _st_meta(meta: dict) -> dict[str, str]:
    return {k: str(meta[k]) for k in ("format", "version", "model", "fingerprint", "dim", "count", "dtype")}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def normalize_rows(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """L2-normalise float32 rows in place, block by block (no second copy of a large matrix)."""
    for i in range(0, x.shape[0], block):
        b = x[i: i + block]
        norms = np.linalg.norm(b, axis=1, keepdims=True)
        b /= np.maximum(norms, 1e-12)
    return x


def _check_normalised(x: np.ndarray, what: str) -> None:
    if x.shape[0] == 0:
        return
    sample = x[:: max(1, x.shape[0] // 10000)].astype(np.float32)
    norms = np.linalg.norm(sample, axis=1)
    bad = np.abs(norms - 1) > _NORM_TOLERANCE
    if bad.any():
        raise ValueError(f"{what} must be L2-normalised rows (found norms like {norms[bad][:3].tolist()}); "
                         f"normalise them or pass normalize=True")


# ------------------------------------------------------------------------------------------ build


@dataclass
class BuildReport:
    out_dir: Path
    count: int  # images in the index
    skipped: list[tuple[str, str]]  # (name, reason) of every image that could not be used
    resumed_from: int = 0  # source items already done by an earlier, interrupted run
    seconds: float = 0.0  # this run's wall time
    processed: int = 0  # source items this run handled (kept + skipped)

    @property
    def rate(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _BuildState:
    fingerprint: str
    source: str
    dim: int
    items_done: int = 0
    rows: int = 0
    records_bytes: int = 0
    skipped_bytes: int = 0
    extra: dict = field(default_factory=dict)


def build_index(pipeline, images_source: str | Path, out_dir: str | Path, *, batch_size: int = 32,
                resume: bool = True, progress: bool = True, image_root: str | Path | None = None,
                dtype: str = "float32", fetch_config: FetchConfig | None = None, relative_paths: bool = True,
                num_workers: int = 4, overwrite: bool = False, max_image_bytes: int = MAX_IMAGE_BYTES) -> BuildReport:
    """Embed every image of ``images_source`` (see ``sources.iter_image_caption_items``) with ``pipeline``'s frozen
    vision encoder and retrieval head, and write an index folder at ``out_dir``.

    Unreadable images are skipped and reported by name. Progress is committed after every batch to
    ``out_dir/.build``; running again with ``resume=True`` continues after the last finished batch.
    ``relative_paths``: store local paths relative to ``out_dir`` (move the index and images together).
    ``fetch_config``: for URL lists (timeouts, size caps, address policy); default ``FetchConfig()``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    model = pipeline.model
    out = Path(out_dir)
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; choose another --out or pass overwrite=True "
                              f"(--overwrite)")
    fingerprint = model.retrieval_fingerprint()
    dim = pipeline.config.retrieval_dim
    source = str(images_source)
    started = time.monotonic()
    total = sum(1 for _ in iter_image_caption_items(images_source, image_root))  # also checks the source early
    build = out / BUILD_DIR
    state = _open_build(build, fingerprint, source, dim, resume)
    fetcher = ImageFetcher(fetch_config or FetchConfig())
    items = iter_image_caption_items(images_source, image_root)
    skipped_now: list[tuple[str, str]] = []
    resumed_from = state.items_done
    if resumed_from:
        logger.info("resuming the build in %s after %d of %d images", out, resumed_from, total)
    for _ in range(resumed_from):  # already embedded or skipped by the earlier run
        next(items, None)

    def load(item: ImageItem):
        try:
            data = fetcher.fetch_bytes(item.url) if item.is_url else read_item_bytes(item, max_image_bytes)
            img = load_image(data, name=item.name, max_bytes=max(max_image_bytes, len(data)))
            return item, img, data
        except ImageError as e:
            return item, None, str(e).removeprefix(f"{item.name}: ")
        except OSError as e:  # unreadable file, permissions...
            return item, None, f"{type(e).__name__}: {e}"

    vec_f = open(build / "vectors.bin", "r+b")  # noqa: SIM115 -- closed in finally
    rec_f = open(build / RECORDS_FILE, "r+b")  # noqa: SIM115
    skip_f = open(build / SKIPPED_FILE, "r+b")  # noqa: SIM115
    pool = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="index-load")
    bar = tqdm(total=total, initial=resumed_from, unit="img", desc=f"index {out.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        for f, size in ((vec_f, state.rows * dim * 4), (rec_f, state.records_bytes), (skip_f, state.skipped_bytes)):
            f.truncate(size)  # drop whatever an interrupted batch wrote after the last commit
            f.seek(size)
        pending = _submit_batch(pool, load, items, batch_size)
        while pending:
            batch = [f.result() for f in pending]
            pending = _submit_batch(pool, load, items, batch_size)  # the next batch loads while this one encodes
            good = [(item, img, data) for item, img, data in batch if img is not None]
            for item, _, reason in (b for b in batch if b[1] is None):
                logger.warning("skipping %s: %s", item.name, reason)
                skipped_now.append((item.name, reason))
                skip_f.write(f"{_tsv(item.name)}\t{_tsv(reason)}\n".encode())
            if good:
                with torch.no_grad():
                    pixels = pipeline.image_processor([img for _, img, _ in good])
                    emb = model.image_embedding(model.encode_images(pixels))  # (B, D) normalised float32
                vec_f.write(np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32).tobytes())
                for item, _, data in good:
                    rec = _record_for(item, data, out, relative_paths, source)
                    rec_f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            for f in (vec_f, rec_f, skip_f):
                f.flush()
                os.fsync(f.fileno())
            state.items_done += len(batch)
            state.rows += len(good)
            state.records_bytes, state.skipped_bytes = rec_f.tell(), skip_f.tell()
            _write_json(build / "state.json", state.__dict__)  # the batch is committed
            bar.update(len(batch))
            bar.set_postfix(skipped=state.items_done - state.rows, refresh=False)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        for f in (vec_f, rec_f, skip_f):
            f.close()
        fetcher.close()

    skipped = _read_skipped(build / SKIPPED_FILE)
    if state.rows == 0:
        raise ValueError(f"no image of {source} could be read ({len(skipped)} skipped, e.g. "
                         f"{'; '.join(f'{n}: {r}' for n, r in skipped[:3]) or 'none found'})")
    _finish_build(build, out, state, model.config.name, dtype)
    report = BuildReport(out_dir=out, count=state.rows, skipped=skipped, resumed_from=resumed_from,
                         seconds=time.monotonic() - started, processed=state.items_done - resumed_from)
    logger.info("index %s: %d images, %d skipped%s", out, report.count, len(skipped),
                f" (see {out / SKIPPED_FILE})" if skipped else "")
    return report


def _submit_batch(pool: ThreadPoolExecutor, load, items: Iterator[ImageItem], n: int) -> list:
    futures = []
    for item in items:
        futures.append(pool.submit(load, item))
        if len(futures) == n:
            break
    return futures


def _tsv(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ")


def _record_for(item: ImageItem, data: bytes, out: Path, relative_paths: bool, source: str) -> dict:
    rec = item.record()
    rec.setdefault("source", source)  # the image set it came from, unless the list names a better source
    rec.setdefault("license", "unknown")  # never guessed: lists can carry a license column
    if item.path is not None:
        p = Path(item.path).resolve()
        rec["path"] = os.path.relpath(p, out.resolve()) if relative_paths else str(p)
    rec["sha256"] = _sha256(data)
    return rec


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _open_build(build: Path, fingerprint: str, source: str, dim: int, resume: bool) -> _BuildState:
    state_path = build / "state.json"
    if resume and state_path.is_file():
        try:
            old = _BuildState(**json.loads(state_path.read_text()))
        except (ValueError, TypeError):
            old = None
        if old is not None and (old.fingerprint, old.source, old.dim) == (fingerprint, source, dim):
            return old
        if old is not None:
            logger.warning("%s holds an unfinished build from another model or image set (%s, %s): starting over",
                           build, old.fingerprint, old.source)
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    for name in ("vectors.bin", RECORDS_FILE, SKIPPED_FILE):
        (build / name).touch()
    state = _BuildState(fingerprint=fingerprint, source=source, dim=dim)
    _write_json(state_path, state.__dict__)
    return state


def _read_skipped(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, reason = line.partition("\t")
        out.append((name, reason))
    return out


def _finish_build(build: Path, out: Path, state: _BuildState, model_name: str, dtype: str) -> None:
    """Turn the committed batches into the index folder, then remove the build folder."""
    dim, n = state.dim, state.rows
    raw = np.memmap(build / "vectors.bin", dtype=np.float32, mode="r", shape=(n, dim))
    meta = {"format": FORMAT, "version": VERSION, "model": model_name, "fingerprint": state.fingerprint,
            "dim": dim, "count": n, "dtype": dtype, "score": SCORE, "source": state.source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "faiss": None}
    chunks = (raw[i: i + BLOCK_ROWS] for i in range(0, n, BLOCK_ROWS))
    _write_safetensors(out / EMBEDDINGS_FILE, chunks, (n, dim), dtype, _st_meta(meta))
    del raw
    os.replace(build / RECORDS_FILE, out / RECORDS_FILE)
    np.save(out / OFFSETS_FILE, _line_offsets(out / RECORDS_FILE))
    os.replace(build / SKIPPED_FILE, out / SKIPPED_FILE)
    if (out / FAISS_FILE).exists():
        (out / FAISS_FILE).unlink()  # it indexed the previous vectors
    _write_json(out / META_FILE, meta)
    shutil.rmtree(build)


# ------------------------------------------------------------------------------------------ import


@dataclass
class ImportReport:
    out_dir: Path
    count: int
    dim: int
    dropped: int  # rows with a zero or non-finite vector (cannot be normalised)


CC3M_LICENSE = ("unknown: CC3M lists web images by URL; each image belongs to its owner (Google's Conceptual "
                "Captions terms)")

# What a published embeddings pickle needs: numpy arrays, torch tensors (the extraction scripts' lists), containers.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"), ("torch", "Size"),
    ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
    ("collections", "OrderedDict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"),
}


class _PublishedUnpickler(pickle.Unpickler):
    """Even a trusted pickle may only build arrays, tensors and containers: anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the pickle asks for {module}.{name}, which an embeddings file never needs; refusing to load it")


def _storage_from_bytes(b: bytes):
    import io

    return torch.load(io.BytesIO(b), weights_only=True)  # tensors pickled outside torch.save nest a torch.save


def read_published_embeddings(path: str | Path, *, trust_pickle: bool) -> tuple[list[str], np.ndarray]:
    """(paths, (N, D) float32) from a published ``cc3m_embeddings*.pkl`` / ``cc3m_embeddings_urls.npy`` (a pickle
    of ``{'paths': [...], 'embeddings': array or list of tensors}``)."""
    p = Path(path)
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{p} is a Python pickle, and loading a pickle can run arbitrary code on this machine. Import it only "
            f"if you trust where it came from (the FROMAGe/GILL authors' cc3m_embeddings files), by passing "
            f"trust_pickle=True (--trust-pickle)."
        )
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    logger.warning("loading %s as a pickle (pickles can run code: only trusted files; globals are restricted to "
                   "arrays and tensors)", p)
    with open(p, "rb") as f:
        try:
            obj = _PublishedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise ValueError(f"{p}: not a published embeddings pickle ({e})") from None
    if not isinstance(obj, dict) or "paths" not in obj or "embeddings" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{p}: expected a dict with 'paths' and 'embeddings' (the published layout), got {keys}")
    paths = [str(x) for x in obj["paths"]]
    emb = obj["embeddings"]
    if isinstance(emb, (list, tuple)):  # the extraction scripts: one tensor (D,) or (1, D) per image
        rows = [e.detach().float().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, np.float32)
                for e in emb]
        emb = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows]) if rows else np.zeros((0, 0), np.float32)
    elif isinstance(emb, torch.Tensor):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise ValueError(f"{p}: embeddings must be (N, D), got shape {emb.shape}")
    if emb.shape[0] != len(paths):
        raise ValueError(f"{p}: {len(paths)} paths but {emb.shape[0]} embeddings")
    if emb.dtype != np.float32 or not emb.flags.writeable:
        emb = emb.astype(np.float32)
    return paths, emb


def import_published(pickles: Sequence[str | Path], out_dir: str | Path, *, fingerprint: str, trust_pickle: bool,
                     expected_dim: int | None = None, source: str = "cc3m", license: str = CC3M_LICENSE,
                     dtype: str = "float32", model: str | None = None, overwrite: bool = False) -> ImportReport:
    """Convert published embedding pickles (concatenated in the order given) into an index folder.

    The published vectors are already the model's retrieval embeddings (``visual_fc`` of the CLIP pooler output);
    they are L2-normalised here. ``fingerprint`` is recorded as the model they belong to: give the fingerprint of
    the model that made them (``pipeline.model.retrieval_fingerprint()`` of the published checkpoint)."""
    if not pickles:
        raise ValueError("give at least one embeddings pickle")
    out = Path(out_dir)
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; choose another --out or pass --overwrite")
    all_paths, parts = [], []
    for p in pickles:
        paths, emb = read_published_embeddings(p, trust_pickle=trust_pickle)
        if parts and emb.shape[1] != parts[0].shape[1]:
            raise ValueError(f"{p}: {emb.shape[1]}-d embeddings, but {pickles[0]} has {parts[0].shape[1]}-d")
        all_paths.extend(paths)
        parts.append(emb)
    emb = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise ValueError(f"the pickle holds {emb.shape[1]}-d embeddings but the model's retrieval space is "
                         f"{expected_dim}-d: it belongs to another model")
    norms = np.linalg.norm(emb, axis=1)
    keep = np.isfinite(norms) & (norms > 1e-12)
    dropped = int((~keep).sum())
    if dropped:
        logger.warning("dropping %d rows whose embedding is zero or not finite", dropped)
        emb = emb[keep]
        all_paths = [q for q, k in zip(all_paths, keep, strict=True) if k]
    normalize_rows(emb)
    if dtype == "float16":
        emb = emb.astype(np.float16)

    def records() -> Iterator[dict]:
        for q in all_paths:
            yield {"url" if is_url(q) else "path": q, "source": source, "license": license}

    index = ImageIndex(emb, _LazyRecords(records, len(all_paths)), fingerprint, model=model)
    index.save(out)
    return ImportReport(out_dir=out, count=len(index), dim=index.dim, dropped=dropped)


class _LazyRecords:
    """Records produced while saving (no list of millions of dicts)."""

    def __init__(self, factory, n: int):
        self.factory, self.n = factory, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        return self.factory()


def shipped_index_dir(model_name: str) -> Path | None:
    """The prebuilt index of a source checkout for a shipped preset, if there is one: ``assets/indexes/<name>``
    (the tiny presets' photos) or ``checkpoints/indexes/<name>`` (the toy world's gallery, built with the model)."""
    for d in (CHECKOUT_ROOT / "assets" / "indexes", CHECKOUT_ROOT / "checkpoints" / "indexes"):
        d = d / model_name
        if (d / META_FILE).is_file():
            return d
    return None
