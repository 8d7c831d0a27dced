"""The on-disk format of an image index: what each file of the folder holds, and how it is written and read.

An index is a folder:
- ``embeddings.safetensors``: one tensor ``embeddings`` (N, D), float32 or float16, rows L2-normalised; the
  header's metadata repeats the fingerprint, so the file alone says which model made it;
- ``index.json``: format version, model name, ``fingerprint`` (``GroundedLM.retrieval_fingerprint()``), dim,
  count, dtype, and the optional FAISS index's settings;
- ``records.jsonl``: one JSON object per row: ``path`` (relative to the folder, or absolute) or ``url``, and
  optional ``caption``, ``license``, ``source``, ``sha256`` (of the encoded file), ``member``/``offset``/``size``
  (a member of a tar shard);
- ``records.offsets.npy``: int64 byte offsets of the lines, so record ``i`` is read without parsing the others;
- ``faiss.index`` (optional): a FAISS index over the same rows, built on request (``ImageIndex.build_faiss``);
- ``skipped.tsv`` (built indexes): the images that could not be read, and why.

Reading memory-maps the vectors (numpy over the safetensors data offset): opening a 2.6M x 256 index reads
nothing until a search touches the pages, and the pages are the OS page cache's, never a second copy.
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

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
ST_DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}  # storage dtype: safetensors, numpy
NORM_TOLERANCE = 1e-2  # float16 storage rounds norms by ~1e-3
BLOCK_ROWS = 32768  # rows per chunk when streaming vectors to disk or FAISS


class FingerprintMismatchError(ValueError):
    """An index built by another model (its image embeddings live in another space)."""


# ------------------------------------------------------------------------------------------ index.json


def new_meta(model: str, fingerprint: str, shape: tuple[int, int], dtype: str, *, source: str | None = None) -> dict:
    """The ``index.json`` of a newly written index (no FAISS index yet)."""
    n, dim = shape
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "fingerprint": fingerprint,
        "dim": dim,
        "count": n,
        "dtype": dtype,
        "score": SCORE,
    }
    if source is not None:
        meta["source"] = source
    meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta["faiss"] = None
    return meta


def read_meta(directory: Path) -> dict:
    """``index.json`` of ``directory``, refused when it is missing or of another format or a newer version."""
    d = directory
    if not (d / META_FILE).is_file():
        hint = (
            " (an unfinished build: run the same `index build` again to resume it)" if (d / BUILD_DIR).is_dir() else ""
        )
        raise FileNotFoundError(f"{d} is not an image index: {META_FILE} is missing{hint}")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / META_FILE} is not a {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise ValueError(
            f"{d} uses index format version {meta['version']}; this fromage_gill reads up to "
            f"{VERSION}: upgrade fromage_gill"
        )
    return meta


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ embeddings


def write_embeddings(path: Path, vectors: np.ndarray, dtype: str, meta: dict) -> None:
    """Stream (N, D) ``vectors`` (in memory or memory-mapped) block by block into ``path`` as ``dtype``."""
    n, dim = vectors.shape
    chunks = (vectors[i : i + BLOCK_ROWS] for i in range(0, n, BLOCK_ROWS))
    header_meta = {k: str(meta[k]) for k in ("format", "version", "model", "fingerprint", "dim", "count", "dtype")}
    write_safetensors(path, chunks, (n, dim), dtype, header_meta)


def read_embeddings(directory: Path, meta: dict, *, mmap_mode: bool) -> np.ndarray:
    """The (N, D) vectors of ``directory``, checked against its ``index.json``."""
    d, fingerprint = directory, meta["fingerprint"]
    vectors, st_meta = map_safetensors(d / EMBEDDINGS_FILE, mmap_mode=mmap_mode)
    if st_meta.get("fingerprint", fingerprint) != fingerprint:
        raise ValueError(
            f"{d}: {EMBEDDINGS_FILE} says fingerprint {st_meta.get('fingerprint')!r} but "
            f"{META_FILE} says {fingerprint!r}: the folder mixes two indexes; rebuild it"
        )
    if vectors.shape != (meta["count"], meta["dim"]):
        raise ValueError(
            f"{d}: {META_FILE} says {meta['count']} x {meta['dim']} but {EMBEDDINGS_FILE} holds "
            f"{vectors.shape[0]} x {vectors.shape[1]}: the folder is inconsistent; rebuild it"
        )
    return vectors


def write_safetensors(
    path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, int], dtype: str, metadata: dict[str, str]
) -> None:
    """Stream (rows, D) chunks into a one-tensor safetensors file without holding the whole matrix."""
    st_dtype, np_dtype = ST_DTYPES[dtype]
    nbytes = shape[0] * shape[1] * np.dtype(np_dtype).itemsize
    header = {TENSOR: {"dtype": st_dtype, "shape": list(shape), "data_offsets": [0, nbytes]}, "__metadata__": metadata}
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


def map_safetensors(path: Path, *, mmap_mode: bool) -> tuple[np.ndarray, dict[str, str]]:
    """(the ``embeddings`` tensor, the header's metadata); memory-mapped copy-on-write with ``mmap_mode``."""
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
    np_dtype = {v[0]: v[1] for v in ST_DTYPES.values()}.get(t["dtype"])
    if np_dtype is None:
        raise ValueError(f"{path}: embeddings must be F32 or F16, got {t['dtype']}")
    rows, dim = t["shape"]
    start = 8 + n + t["data_offsets"][0]
    end, size = start + rows * dim * np.dtype(np_dtype).itemsize, path.stat().st_size
    if size < end:
        raise ValueError(
            f"{path} is truncated: its header describes {rows} x {dim} {t['dtype']} embeddings ending at byte "
            f"{end:,}, but the file has {size:,} bytes (an interrupted copy or build); copy it again or rebuild the "
            f"index"
        )
    if rows == 0:
        return np.zeros((0, dim), dtype=np_dtype), meta
    if mmap_mode:
        # copy-on-write mapping: writable for torch, shares the page cache, never writes back to the file
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=start, shape=(rows, dim))
    else:
        arr = np.fromfile(path, dtype=np_dtype, count=rows * dim, offset=start).reshape(rows, dim)
    return arr, meta


def normalize_rows(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """L2-normalise float32 rows in place, block by block (no second copy of a large matrix)."""
    for i in range(0, x.shape[0], block):
        b = x[i : i + block]
        norms = np.linalg.norm(b, axis=1, keepdims=True)
        b /= np.maximum(norms, 1e-12)
    return x


def check_normalised(x: np.ndarray, what: str) -> None:
    """Refuse rows that are not unit vectors (checked on a sample of at most ~10,000 rows)."""
    if x.shape[0] == 0:
        return
    sample = x[:: max(1, x.shape[0] // 10000)].astype(np.float32)
    norms = np.linalg.norm(sample, axis=1)
    bad = np.abs(norms - 1) > NORM_TOLERANCE
    if bad.any():
        raise ValueError(
            f"{what} must be L2-normalised rows (found norms like {norms[bad][:3].tolist()}); "
            f"normalise them or pass normalize=True"
        )


# ------------------------------------------------------------------------------------------ records


class JsonlRecords:
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
        return json.loads(self._map[int(self.offsets[i]) : int(self.offsets[i + 1])])

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]


def read_records(directory: Path, count: int) -> JsonlRecords:
    """The records of ``directory`` (through its offsets file, or by scanning the lines of an index without one),
    refused unless there are ``count`` of them."""
    d = directory
    offsets_path = d / OFFSETS_FILE
    if offsets_path.is_file():
        try:
            offsets = np.load(offsets_path, mmap_mode="r")
        except (ValueError, OSError) as e:  # numpy's words ("mmap length is greater than file size") name no file
            raise ValueError(f"{offsets_path} is truncated or damaged ({e}); rebuild the index") from None
    else:
        offsets = line_offsets(d / RECORDS_FILE)
    records = JsonlRecords(d / RECORDS_FILE, offsets)
    if len(records) != count:
        raise ValueError(f"{d}: {len(records)} records for {count} embeddings; rebuild the index")
    return records


def record_line(record: dict) -> bytes:
    """One line of records.jsonl."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def write_records(records: Iterable[dict], directory: Path) -> int:
    """records.jsonl + records.offsets.npy; returns the count."""
    offsets = [0]
    with open(directory / RECORDS_FILE, "wb") as f:
        for r in records:
            line = record_line(r)
            f.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(directory / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


def line_offsets(path: Path) -> np.ndarray:
    """(lines + 1,) int64 byte offsets of the lines of ``path``."""
    offsets = [0]
    with open(path, "rb") as f:
        for line in f:
            offsets.append(offsets[-1] + len(line))
    return np.asarray(offsets, dtype=np.int64)
