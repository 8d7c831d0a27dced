"""What every evaluation task shares: its options, progress, loading the dataset's images, and the candidate image
embeddings (computed once per ``--out`` and kept in ``image_embeddings.safetensors``, so a resumed run reuses them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from PIL import Image

from ..images import ImageError, load_image
from ..probe import embed_images

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

T = TypeVar("T")
EMBEDDINGS_FILE = "image_embeddings.safetensors"


@dataclass(frozen=True)
class EvalOptions:
    """One run: ``data`` the annotation file, ``images`` the local image folder, ``out`` where results go."""

    data: Path
    out: Path
    images: Path | None = None
    limit: int | None = None  # only the first N examples (in file order)
    batch_size: int = 16
    dense: Path | None = None  # visdial-rank: the dense annotations JSON
    split: str | None = "test"  # captioning: the Karpathy split
    seed: int = 42  # generation tasks: the diffusion seed (the published scripts' 42)
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    caption_metrics: tuple[str, ...] | None = None  # captioning: a subset of caption_metrics.ALL_METRICS
    scoring: str = "published"  # visdial-rank: "published" (the authors' script) or "next-token"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.caption_metrics is not None:
            from .caption_metrics import ALL_METRICS

            bad = [m for m in self.caption_metrics if m not in ALL_METRICS]
            if bad or not self.caption_metrics:
                raise ValueError(f"--metrics: {bad or 'none given'}; choose from {', '.join(ALL_METRICS)}")
        if self.scoring not in ("published", "next-token"):
            raise ValueError(f"--scoring must be 'published' or 'next-token', got {self.scoring!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.num_inference_steps}")

    def need_images(self, example: str) -> Path:
        if self.images is None:
            raise ValueError(f"this task reads images: pass the image folder with --images DIR (files like {example})")
        return self.images


def limited(items: Sequence[T], limit: int | None) -> list[T]:
    return list(items[:limit] if limit is not None else items)


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True) -> Iterator[T]:
    """tqdm on stderr when enabled (and on a terminal); a log line every 10% otherwise."""
    if enabled:
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, mininterval=2.0)
        return
    step = max(1, total // 10)
    for i, item in enumerate(items):
        if i % step == 0:
            logger.info("%s: %d/%d", desc, i, total)
        yield item


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for lo in range(0, len(items), size):
        yield list(items[lo : lo + size])


def open_image(path: Path, *, squash_to: int | None = None) -> Image.Image:
    """An image of the dataset; ``squash_to`` resizes it to a square first, as the published VisDial and GILL
    scripts do (``img.resize((224, 224))``) before CLIP's preprocessing."""
    img = load_image(path, name=str(path))
    return img.resize((squash_to, squash_to)) if squash_to else img


def candidate_embeddings(
    pipeline: Pipeline,
    ids: Sequence[str],
    paths: Sequence[Path],
    out: Path,
    *,
    batch_size: int,
    squash_to: int | None = None,
    show_progress: bool = True,
) -> tuple[list[str], torch.Tensor, list[str]]:
    """(ids that opened, (M, D) retrieval embeddings, ids whose file did not open). Cached in ``out``: the cache
    is reused when it holds the same ids for the same model."""
    from safetensors.torch import load_file, save_file

    cache = out / EMBEDDINGS_FILE
    key = {"model": pipeline.model.retrieval_fingerprint(), "ids": list(ids), "squash_to": squash_to}
    meta_path = out / "image_embeddings.json"
    if cache.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            logger.info("reusing the candidate image embeddings in %s", cache)
            return meta["ok"], load_file(cache)["embeddings"], meta["bad"]
    ok, bad, embs = [], [], []
    pairs = list(zip(ids, paths, strict=True))
    for chunk in progress(batched(pairs, batch_size), -(-len(pairs) // batch_size), "image embeddings", show_progress):
        imgs, names = [], []
        for image_id, path in chunk:
            try:
                imgs.append(open_image(path, squash_to=squash_to))
                names.append(image_id)
            except (ImageError, OSError) as e:
                logger.warning("skipping image %s: %s", image_id, e)
                bad.append(image_id)
        if imgs:
            embs.append(embed_images(pipeline, imgs, batch_size=batch_size).embeddings)
            ok += names
    if not ok:
        raise ValueError(f"none of the {len(ids)} candidate images could be opened (see the warnings above)")
    matrix = torch.cat(embs).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": matrix}, cache)
    meta_path.write_text(json.dumps({"key": key, "ok": ok, "bad": bad}))
    return ok, matrix, bad
