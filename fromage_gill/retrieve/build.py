"""Build an image index from a set of images: each image through the model's frozen vision encoder and
retrieval head, exactly as at training time, written as the folder ``storage.py`` describes.

A build commits its progress after every batch to ``OUT/.build`` (``BUILD_DIR``): the vectors so far, their
records and the skipped images, with ``state.json`` saying how far the committed part goes. Running the same build
again resumes after the last committed batch; ``_finish_build`` turns the build folder into the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from PIL import Image

from ..images import MAX_IMAGE_BYTES, ImageError, load_image
from .fetch import FetchConfig, ImageFetcher
from .sources import ImageItem, iter_image_caption_items, read_item_bytes
from .storage import (
    BUILD_DIR,
    EMBEDDINGS_FILE,
    FAISS_FILE,
    META_FILE,
    OFFSETS_FILE,
    RECORDS_FILE,
    SKIPPED_FILE,
    ST_DTYPES,
    line_offsets,
    new_meta,
    record_line,
    write_embeddings,
    write_json,
)

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)


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
    """``.build/state.json``: whose build this is, and how far its files were committed by the last finished batch
    (anything past these lengths is an interrupted batch's, truncated when the build resumes)."""

    fingerprint: str
    source: str
    dim: int
    items_done: int = 0  # source items embedded or skipped
    rows: int = 0  # vectors in vectors.bin
    records_bytes: int = 0
    skipped_bytes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def build_index(
    pipeline: Pipeline,
    images_source: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    resume: bool = True,
    progress: bool = True,
    image_root: str | Path | None = None,
    dtype: str = "float32",
    fetch_config: FetchConfig | None = None,
    relative_paths: bool = True,
    num_workers: int = 4,
    overwrite: bool = False,
    max_image_bytes: int = MAX_IMAGE_BYTES,
) -> BuildReport:
    """Embed every image of ``images_source`` (see ``sources.iter_image_caption_items``) with ``pipeline``'s frozen
    vision encoder and retrieval head, and write an index folder at ``out_dir``.

    Unreadable images are skipped and reported by name. Progress is committed after every batch to
    ``out_dir/.build``; running again with ``resume=True`` continues after the last finished batch.
    ``relative_paths``: store local paths relative to ``out_dir`` (move the index and images together).
    ``fetch_config``: for URL lists (timeouts, size caps, address policy); default ``FetchConfig()``.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    _check_build_arguments(out, batch_size, dtype, overwrite)
    source = str(images_source)
    started = time.monotonic()
    total = sum(1 for _ in iter_image_caption_items(images_source, image_root))  # also checks the source early
    build = out / BUILD_DIR
    dim = pipeline.config.retrieval_dim
    state = _open_build(build, pipeline.model.retrieval_fingerprint(), source, dim, resume)
    resumed_from = state.items_done
    if resumed_from:
        logger.info("resuming the build in %s after %d of %d images", out, resumed_from, total)
    items = iter_image_caption_items(images_source, image_root)
    for _ in range(resumed_from):  # already embedded or skipped by the earlier run
        next(items, None)

    loader = _ImageLoader(ImageFetcher(fetch_config or FetchConfig()), max_image_bytes)
    bar = tqdm(
        total=total,
        initial=resumed_from,
        unit="img",
        desc=f"index {out.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    pool = ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="index-load")
    try:
        with _BuildFiles(build, state) as files:
            pending = _submit_batch(pool, loader, items, batch_size)
            while pending:
                batch = [f.result() for f in pending]
                pending = _submit_batch(pool, loader, items, batch_size)  # the next batch loads while this one encodes
                good = [b for b in batch if b.image is not None]
                for bad in (b for b in batch if b.image is None):
                    logger.warning("skipping %s: %s", bad.item.name, bad.reason)
                    files.skip(bad.item.name, bad.reason)
                if good:
                    files.add(
                        _embed(pipeline, [b.image for b in good if b.image is not None], [b.item.name for b in good])
                    )
                    for b in good:
                        files.record(_record_for(b.item, b.data, out, relative_paths, source))
                files.commit(items_done=len(batch), rows=len(good))
                bar.update(len(batch))
                bar.set_postfix(skipped=state.items_done - state.rows, refresh=False)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        loader.fetcher.close()
    return _finish_and_report(build, out, state, pipeline.model.config.name, dtype, resumed_from, started)


def _check_build_arguments(out: Path, batch_size: int, dtype: str, overwrite: bool) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ST_DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds an index; choose another --out or pass overwrite=True (--overwrite)"
        )


@dataclass
class _Loaded:
    """One source item after loading: its decoded image and raw bytes, or why it cannot be used."""

    item: ImageItem
    image: Image.Image | None = None
    data: bytes = b""
    reason: str = ""


@dataclass
class _ImageLoader:
    """Reads one item's bytes (fetching URLs) and decodes them, in a worker thread; never raises for a bad image."""

    fetcher: ImageFetcher
    max_image_bytes: int

    def __call__(self, item: ImageItem) -> _Loaded:
        try:
            if item.url is not None:
                data = self.fetcher.fetch_bytes(item.url)
            else:
                data = read_item_bytes(item, self.max_image_bytes)
            img = load_image(data, name=item.name, max_bytes=max(self.max_image_bytes, len(data)))
            return _Loaded(item, img, data)
        except ImageError as e:
            return _Loaded(item, reason=str(e).removeprefix(f"{item.name}: "))
        except OSError as e:  # unreadable file, permissions...
            return _Loaded(item, reason=f"{type(e).__name__}: {e}")


def _embed(pipeline: Pipeline, images: list[Image.Image], names: list[str]) -> np.ndarray:
    """(B,) images -> (B, D) normalised float32 vectors, as the retrieval head saw them in training. Non-finite
    vectors are refused before the batch is committed: an index of NaN rows finds nothing for any query."""
    model = pipeline.model
    with torch.no_grad():
        emb = model.image_embedding(model.encode_images(pipeline.image_processor(images)))
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the model's embedding of {names[bad[0]]} holds NaN or infinite values"
            f"{f' (and {len(bad) - 1} more of this batch)' if len(bad) > 1 else ''}: its trained layers "
            f"or vision encoder give non-finite output (in {model.dtype}? try --dtype fp32), so the index "
            f"would rank nothing; fix the model, then run the same build again to resume"
        )
    return np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32)


class _BuildFiles:
    """The build folder's three growing files and its state: a batch is written, then committed at once
    (flushed, fsynced, and ``state.json`` moved past it), so an interrupted batch is truncated on resume."""

    def __init__(self, build: Path, state: _BuildState):
        self.build, self.state = build, state
        self.vectors = open(build / "vectors.bin", "r+b")  # noqa: SIM115 -- closed in __exit__
        self.records = open(build / RECORDS_FILE, "r+b")  # noqa: SIM115
        self.skipped = open(build / SKIPPED_FILE, "r+b")  # noqa: SIM115
        committed = (state.rows * state.dim * 4, state.records_bytes, state.skipped_bytes)
        for f, size in zip(self._files(), committed, strict=True):
            f.truncate(size)  # drop whatever an interrupted batch wrote after the last commit
            f.seek(size)

    def _files(self) -> tuple[BinaryIO, BinaryIO, BinaryIO]:
        return self.vectors, self.records, self.skipped

    def __enter__(self) -> _BuildFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files():
            f.close()

    def skip(self, name: str, reason: str) -> None:
        self.skipped.write(f"{_tsv(name)}\t{_tsv(reason)}\n".encode())

    def add(self, vectors: np.ndarray) -> None:
        self.vectors.write(vectors.tobytes())

    def record(self, rec: dict[str, object]) -> None:
        self.records.write(record_line(rec))

    def commit(self, items_done: int, rows: int) -> None:
        for f in self._files():
            f.flush()
            os.fsync(f.fileno())
        self.state.items_done += items_done
        self.state.rows += rows
        self.state.records_bytes, self.state.skipped_bytes = self.records.tell(), self.skipped.tell()
        write_json(self.build / "state.json", self.state.__dict__)  # the batch is committed


def _finish_and_report(
    build: Path, out: Path, state: _BuildState, model_name: str, dtype: str, resumed_from: int, started: float
) -> BuildReport:
    skipped = _read_skipped(build / SKIPPED_FILE)
    if state.rows == 0:
        raise ValueError(
            f"no image of {state.source} could be read ({len(skipped)} skipped, e.g. "
            f"{'; '.join(f'{n}: {r}' for n, r in skipped[:3]) or 'none found'})"
        )
    _finish_build(build, out, state, model_name, dtype)
    report = BuildReport(
        out_dir=out,
        count=state.rows,
        skipped=skipped,
        resumed_from=resumed_from,
        seconds=time.monotonic() - started,
        processed=state.items_done - resumed_from,
    )
    logger.info(
        "index %s: %d images, %d skipped%s",
        out,
        report.count,
        len(skipped),
        f" (see {out / SKIPPED_FILE})" if skipped else "",
    )
    return report


def _submit_batch(
    pool: ThreadPoolExecutor, load: _ImageLoader, items: Iterator[ImageItem], n: int
) -> list[Future[_Loaded]]:
    futures: list[Future[_Loaded]] = []
    for item in items:
        futures.append(pool.submit(load, item))
        if len(futures) == n:
            break
    return futures


def _tsv(s: str) -> str:
    return s.replace("\t", " ").replace("\n", " ")


def _record_for(item: ImageItem, data: bytes, out: Path, relative_paths: bool, source: str) -> dict[str, object]:
    rec = item.record()
    rec.setdefault("source", source)  # the image set it came from, unless the list names a better source
    rec.setdefault("license", "unknown")  # never guessed: lists can carry a license column
    if item.path is not None:
        p = Path(item.path).resolve()
        rec["path"] = os.path.relpath(p, out.resolve()) if relative_paths else str(p)
    rec["sha256"] = _sha256(data)
    return rec


def _sha256(data: bytes) -> str:
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
            logger.warning(
                "%s holds an unfinished build from another model or image set (%s, %s): starting over",
                build,
                old.fingerprint,
                old.source,
            )
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    for name in ("vectors.bin", RECORDS_FILE, SKIPPED_FILE):
        (build / name).touch()
    state = _BuildState(fingerprint=fingerprint, source=source, dim=dim)
    write_json(state_path, state.__dict__)
    return state


def _read_skipped(path: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, reason = line.partition("\t")
        out.append((name, reason))
    return out


def _finish_build(build: Path, out: Path, state: _BuildState, model_name: str, dtype: str) -> None:
    """Turn the committed batches into the index folder, then remove the build folder."""
    dim, n = state.dim, state.rows
    raw = np.memmap(build / "vectors.bin", dtype=np.float32, mode="r", shape=(n, dim))
    meta = new_meta(model_name, state.fingerprint, (n, dim), dtype, source=state.source)
    write_embeddings(out / EMBEDDINGS_FILE, raw, dtype, meta)
    del raw
    os.replace(build / RECORDS_FILE, out / RECORDS_FILE)
    np.save(out / OFFSETS_FILE, line_offsets(out / RECORDS_FILE))
    os.replace(build / SKIPPED_FILE, out / SKIPPED_FILE)
    if (out / FAISS_FILE).exists():
        (out / FAISS_FILE).unlink()  # it indexed the previous vectors
    write_json(out / META_FILE, meta)
    shutil.rmtree(build)
