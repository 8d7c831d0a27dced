"""Frozen outputs computed once: vision features per image, diffusion text-encoder outputs per caption.

The vision encoder and Stable Diffusion's text encoder never change during training, so re-running them at every
step (as the published code does for CLIP) is wasted work. ``precompute`` writes them into safetensors shards of
``shard_size`` consecutive records:

    OUT/meta.json                      what the features were computed from (model parts, data fingerprint)
    OUT/shard-00000.safetensors        index (M,) record numbers; features (M, vision_dim);
                                       text_cond (M, Q, D) for GILL. Unreadable images have no row and are
                                       listed in the file's metadata ("skipped").

A shard is written to a temporary name and renamed, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write
from ..images import ImageError
from .data import DataError, Records, load_record_image, records_fingerprint

if TYPE_CHECKING:
    from ..pipeline import Pipeline

logger = logging.getLogger(__name__)

META_NAME = "meta.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrecomputeResult:
    out: Path
    n_records: int
    n_written: int  # rows with features (this run and earlier runs)
    n_skipped: int  # unreadable images (this run and earlier runs)
    shards_computed: int  # shards computed by this call (the rest were already there)


def frozen_fingerprint(config, *, with_text: bool) -> dict:
    """What the stored tensors depend on: the vision encoder (and the diffusion text encoder), not the trained
    layers."""
    d = config.to_dict()
    out = {"vision": d["vision"], "seed": config.seed}
    if with_text:
        out["diffusion"] = d["diffusion"]
    return out


def encode_captions_for_diffusion(diffusion, captions: list[str]) -> torch.Tensor:
    """(N, Q, D) Stable Diffusion text-encoder outputs, exactly as its pipeline computes ``prompt_embeds``
    (padded to the tokenizer's max length): GILL's regression target."""
    tok = diffusion.tokenizer(
        captions,
        padding="max_length",
        max_length=diffusion.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    enc = diffusion.text_encoder
    with torch.no_grad():
        return enc(tok.input_ids.to(enc.device))[0]


def precompute(
    pipeline: Pipeline,
    records: Records,
    out: str | Path,
    *,
    batch_size: int = 32,
    shard_size: int = 1024,
    text: bool | None = None,
    progress: bool = True,
) -> PrecomputeResult:
    """Compute and store the frozen outputs for ``records``; resumes into an existing ``out`` written for the same
    model parts and data. ``text``: also the diffusion text-encoder outputs (default: when the model is GILL)."""
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    model = pipeline.model
    text = pipeline.config.kind == "gill" if text is None else text
    if text and pipeline.diffusion is None:
        raise ValueError(
            f"{pipeline.config.name} has no diffusion pipeline: its text encoder is needed for the "
            f"caption targets (load it, or pass text=False / --no-text)"
        )
    out = Path(out)
    meta = {
        "format": FORMAT_VERSION,
        "frozen": frozen_fingerprint(pipeline.config, with_text=text),
        "records": records_fingerprint(records.items),
        "data": records.description,
        "n_records": len(records),
        "shard_size": shard_size,
        "text": text,
    }
    _check_or_write_meta(out, meta)
    n_shards = (len(records) + shard_size - 1) // shard_size
    todo = [k for k in range(n_shards) if not shard_path(out, k).is_file()]
    bar = tqdm(total=len(records), desc="precompute", unit="img", disable=not progress)
    bar.update(len(records) - sum(min(shard_size, len(records) - k * shard_size) for k in todo))
    for k in todo:
        lo, hi = k * shard_size, min(len(records), (k + 1) * shard_size)
        rows, feats, conds, skipped = [], [], [], {}
        for start in range(lo, hi, batch_size):
            chunk = range(start, min(hi, start + batch_size))
            images, kept = [], []
            for i in chunk:
                try:
                    images.append(load_record_image(records.items[i]))
                    kept.append(i)
                except ImageError as e:
                    skipped[records.items[i].key] = str(e)
            if kept:
                with torch.no_grad():
                    pixels = pipeline.image_processor(images)
                    feats.append(model.encode_images(pixels).float().cpu())
                    if text:
                        caps = [records.items[i].caption for i in kept]
                        conds.append(encode_captions_for_diffusion(pipeline.diffusion, caps).float().cpu())
                rows.extend(kept)
            bar.update(len(chunk))
        tensors = {"index": torch.tensor(rows, dtype=torch.long)}
        if rows:
            tensors["features"] = torch.cat(feats)
            if text:
                tensors["text_cond"] = torch.cat(conds)
        atomic_write(shard_path(out, k), partial(save_file, tensors, metadata={"skipped": json.dumps(skipped)}))
        if skipped:
            logger.warning("shard %d: %d unreadable image(s) skipped, e.g. %s", k, len(skipped), next(iter(skipped)))
    bar.close()
    store = PrecomputedStore(out)
    return PrecomputeResult(
        out=out, n_records=len(records), n_written=len(store), n_skipped=store.n_skipped, shards_computed=len(todo)
    )


def shard_path(out: Path, k: int) -> Path:
    return Path(out) / f"shard-{k:05d}.safetensors"


def _check_or_write_meta(out: Path, meta: dict) -> None:
    path = out / META_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in ("format", "frozen", "records", "shard_size", "text") if old.get(k) != meta[k]]
        if diff:
            raise DataError(
                f"{out} holds outputs computed for other {', '.join(diff)} (data {old.get('data')}); "
                f"choose a new --out or delete it"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a precompute directory (no {META_NAME}); choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")


class PrecomputedStore:
    """Row access to the shards of a finished ``precompute`` directory (memory-mapped, nothing loaded up front)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"--precomputed {self.dir} holds no {META_NAME}: run `fromage-gill precompute` first"
            )
        self.meta = json.loads(meta_path.read_text())
        n, size = self.meta["n_records"], self.meta["shard_size"]
        self._where: dict[int, tuple[int, int]] = {}
        self.n_skipped = 0
        missing = []
        self._files = {}
        for k in range((n + size - 1) // size):
            path = shard_path(self.dir, k)
            if not path.is_file():
                missing.append(path.name)
                continue
            f = safe_open(str(path), "pt")
            self._files[k] = f
            self.n_skipped += len(json.loads(f.metadata().get("skipped", "{}")))
            for row, i in enumerate(f.get_tensor("index").tolist()):
                self._where[i] = (k, row)
        if missing:
            raise DataError(
                f"--precomputed {self.dir} is incomplete ({len(missing)} shard(s) missing, e.g. "
                f"{missing[0]}): run `fromage-gill precompute` again with the same arguments to finish it"
            )

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self) -> dict:  # for DataLoader workers started with "spawn": file handles are reopened
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _file(self, k: int):
        if k not in self._files:
            self._files[k] = safe_open(str(shard_path(self.dir, k)), "pt")
        return self._files[k]

    def check(self, config, records: Records, *, need_text: bool) -> None:
        """Refuse features computed for other data or another vision encoder / text encoder."""
        if self.meta.get("records") != records_fingerprint(records.items):
            raise DataError(
                f"--precomputed {self.dir} was computed for other data ({self.meta.get('data')}), not "
                f"{records.description}: run `fromage-gill precompute` on this --data"
            )
        if need_text and not self.meta.get("text"):
            raise DataError(
                f"--precomputed {self.dir} has no diffusion text-encoder outputs, which GILL training "
                f"needs: precompute again without --no-text"
            )
        want = frozen_fingerprint(config, with_text=bool(self.meta.get("text")))
        if self.meta.get("frozen") != want:
            raise DataError(
                f"--precomputed {self.dir} was computed with another vision encoder or diffusion text "
                f"encoder than {config.name}'s: precompute again for this model"
            )

    def get(self, i: int) -> dict[str, torch.Tensor] | None:
        where = self._where.get(i)
        if where is None:
            return None
        k, row = where
        f = self._file(k)
        out = {"features": f.get_slice("features")[row : row + 1][0]}
        if self.meta.get("text"):
            out["text_cond"] = f.get_slice("text_cond")[row : row + 1][0]
        return out
