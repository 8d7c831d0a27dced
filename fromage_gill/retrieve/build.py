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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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
    extra: dict = field(default_factory=dict)


def build_index(
    pipeline,
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

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ST_DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    model = pipeline.model
    out = Path(out_dir)
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds an index; choose another --out or pass overwrite=True (--overwrite)"
        )
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
    bar = tqdm(
        total=total,
        initial=resumed_from,
        unit="img",
        desc=f"index {out.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
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
                bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten().tolist()
                if bad:  # before the batch is committed: an index of NaN rows finds nothing for any query
                    raise ValueError(
                        f"the model's embedding of {good[bad[0]][0].name} holds NaN or infinite values"
                        f"{f' (and {len(bad) - 1} more of this batch)' if len(bad) > 1 else ''}: its trained layers "
                        f"or vision encoder give non-finite output (in {model.dtype}? try --dtype fp32), so the index "
                        f"would rank nothing; fix the model, then run the same build again to resume"
                    )
                vec_f.write(np.ascontiguousarray(emb.cpu().numpy(), dtype=np.float32).tobytes())
                for item, _, data in good:
                    rec = _record_for(item, data, out, relative_paths, source)
                    rec_f.write(record_line(rec))
            for f in (vec_f, rec_f, skip_f):
                f.flush()
                os.fsync(f.fileno())
            state.items_done += len(batch)
            state.rows += len(good)
            state.records_bytes, state.skipped_bytes = rec_f.tell(), skip_f.tell()
            write_json(build / "state.json", state.__dict__)  # the batch is committed
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
        raise ValueError(
            f"no image of {source} could be read ({len(skipped)} skipped, e.g. "
            f"{'; '.join(f'{n}: {r}' for n, r in skipped[:3]) or 'none found'})"
        )
    _finish_build(build, out, state, model.config.name, dtype)
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
    out = []
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
