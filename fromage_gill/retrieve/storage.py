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
from typing import Protocol

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


class BrokenIndexError(ValueError):
    """A file of an index folder that cannot be read as what it should be (truncated, wrong size, wrong dtype,
    unreadable); the message names the file and says how to get a good one."""


def rebuild_hint(directory: Path) -> str:
    """How to get a good index folder back: build it again (or import the published embeddings again)."""
    return (
        f"rebuild the index: `fromage-gill index build --model MODEL --images IMAGES --out {directory} --overwrite` "
        f"(or, for the published CC3M embeddings, `fromage-gill index import FILES --out {directory} --overwrite`)"
    )


def _broken(directory: Path, path: Path, problem: str) -> BrokenIndexError:
    return BrokenIndexError(f"{path}: {problem}; {rebuild_hint(directory)}")


def _missing(directory: Path, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{path} is missing, so {directory} is not a complete image index; {rebuild_hint(directory)}"
    )


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


META_FIELDS = {"fingerprint": str, "dim": int, "count": int, "dtype": str}  # what reading an index needs


def read_meta(directory: Path) -> dict:
    """``index.json`` of ``directory``, refused (naming the file and the fix) when the folder or the file is
    missing or unreadable, of another format or a newer version, or lacks a field reading needs."""
    d = directory
    path = d / META_FILE
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d} is not an image index: no such folder (build one with `fromage-gill index build --model MODEL "
            f"--images IMAGES --out {d}`)"
        )
    if not path.is_file():
        if (d / BUILD_DIR).is_dir():
            hint = "an unfinished build: run the same `index build` again to resume it"
        else:
            hint = rebuild_hint(d)
        raise FileNotFoundError(f"{d} is not an image index: {META_FILE} is missing ({hint})")
    try:
        meta = json.loads(path.read_bytes())
    except OSError as e:
        raise _broken(d, path, f"cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _broken(d, path, f"is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _broken(d, path, f"must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise _broken(d, path, f"is not a {FORMAT} file (format {meta.get('format')!r})")
    version = meta.get("version", 0)
    if not isinstance(version, int):
        raise _broken(d, path, f"version must be an integer, not {version!r}")
    if version > VERSION:
        raise ValueError(
            f"{d} uses index format version {version}; this fromage_gill reads up to {VERSION}: upgrade fromage_gill"
        )
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        negative = isinstance(value, int) and value < 0  # kind int: a count or a size
        if not isinstance(value, kind) or isinstance(value, bool) or negative or value == "":
            raise _broken(
                d, path, f"field {key!r} must be a {'non-negative integer' if kind is int else 'string'}, got {value!r}"
            )
    if meta["dtype"] not in ST_DTYPES:
        raise _broken(d, path, f"dtype must be one of {sorted(ST_DTYPES)}, got {meta['dtype']!r}")
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
    """The (N, D) vectors of ``directory``, checked against its ``index.json`` (shape, dtype, fingerprint)."""
    d, fingerprint = directory, meta["fingerprint"]
    path = d / EMBEDDINGS_FILE
    if not path.is_file():
        raise _missing(d, path)
    vectors, st_meta = map_safetensors(path, mmap_mode=mmap_mode, directory=d)
    if st_meta.get("fingerprint", fingerprint) != fingerprint:
        raise _broken(
            d,
            path,
            f"says fingerprint {st_meta.get('fingerprint')!r} but {META_FILE} says {fingerprint!r}: the folder "
            f"mixes two indexes",
        )
    if vectors.shape != (meta["count"], meta["dim"]):
        raise _broken(
            d,
            path,
            f"holds {vectors.shape[0]} x {vectors.shape[1]} but {META_FILE} says {meta['count']} x {meta['dim']}: "
            f"the folder is inconsistent",
        )
    if ST_DTYPES[meta["dtype"]][1] != vectors.dtype:
        raise _broken(
            d, path, f"holds {vectors.dtype} but {META_FILE} says {meta['dtype']}: the folder is inconsistent"
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


def map_safetensors(path: Path, *, mmap_mode: bool, directory: Path | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """(the ``embeddings`` tensor, the header's metadata); memory-mapped copy-on-write with ``mmap_mode``.

    The header is checked against the file before anything is mapped: a truncated or padded file, a header that
    is not JSON or names another dtype or shape, is refused naming ``path`` (and how to rebuild ``directory``)."""
    d = path.parent if directory is None else directory
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise _broken(d, path, f"is not a safetensors file ({size} bytes: too short for its header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(100_000_000, size - 8):
                raise _broken(
                    d, path, f"is truncated or not a safetensors file (header of {n} bytes in a {size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise _broken(d, path, f"cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", {}) or {}
        t = header[TENSOR]
        st_dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise _broken(d, path, f"has no readable {TENSOR!r} tensor in its header ({type(e).__name__}: {e})") from None
    np_dtype = {v[0]: v[1] for v in ST_DTYPES.values()}.get(st_dtype)
    if np_dtype is None:
        raise _broken(d, path, f"embeddings must be F32 or F16, got {st_dtype!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x >= 0 for x in shape)):
        raise _broken(d, path, f"embeddings must be a 2-D (N, D) tensor, got shape {shape!r}")
    rows, dim = shape
    nbytes = rows * dim * np.dtype(np_dtype).itemsize
    if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == nbytes):
        raise _broken(
            d, path, f"data_offsets {offsets!r} do not hold a {rows} x {dim} {st_dtype} tensor ({nbytes} bytes)"
        )
    start = 8 + n + offsets[0]
    if size != start + nbytes:
        what = "truncated (an interrupted write or copy?)" if size < start + nbytes else "longer than its header says"
        raise _broken(
            d,
            path,
            f"is {what}: its header says {rows} x {dim} {st_dtype}, {start + nbytes} bytes in all, but the file "
            f"has {size}",
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


class Records(Protocol):
    """What an index reads its records through: a list of dicts, or ``JsonlRecords`` (read on demand)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[dict]: ...
    def __getitem__(self, i: int, /) -> dict: ...


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
    refused, naming the file, unless there are ``count`` of them and the offsets fit the records file."""
    d = directory
    path, offsets_path = d / RECORDS_FILE, d / OFFSETS_FILE
    if not path.is_file():
        raise _missing(d, path)
    try:
        size = path.stat().st_size
        if offsets_path.is_file():
            try:
                offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
            except (ValueError, EOFError) as e:
                raise _broken(
                    d, offsets_path, f"is not a readable .npy array ({e}); delete it to have the offsets recounted"
                ) from None
        else:
            offsets = line_offsets(path)
        records = JsonlRecords(path, offsets)
    except OSError as e:
        raise _broken(d, getattr(e, "filename", None) or path, f"cannot be read ({e.strerror or e})") from None
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != size:
        raise _broken(
            d,
            offsets_path,
            f"does not fit {RECORDS_FILE} ({size} bytes): expected int64 line offsets from 0 to {size}, found "
            f"{offsets.dtype} {offsets.shape}; delete it to have the offsets recounted",
        )
    if len(records) != count:
        raise _broken(d, path, f"holds {len(records)} records for {count} embeddings: the folder is inconsistent")
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
