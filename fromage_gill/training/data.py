"""Image-caption data: where examples come from, and how they become batches.

The image sets themselves are read by ``fromage_gill.retrieve.sources.iter_image_caption_items`` (shared with the
retrieval index builder): CC3M-style ``caption<TAB>image`` TSV/CSV files with an image root, folders, and img2dataset /
webdataset tar shards (``KEY.jpg`` + ``KEY.txt`` or ``KEY.json`` with a ``caption``). Training adds what it needs:
a caption for every image (in a folder, from a sidecar ``cat.jpg`` + ``cat.txt``), local images only, and a clear
error when the data cannot train anything.

An example whose image is missing or unreadable is skipped and counted in a ``SkipLog`` (with reasons and a few
examples for the log), never replaced by another one: a silent substitution would skew what the model learns.

A data file is not trusted to point anywhere: a table row with more or fewer cells than its header is refused
(``file:line``), and an image path that resolves outside the image root (``../``, an absolute path, a symlink
pointing out) is refused unless ``allow_outside_root`` (``--allow-images-outside-root``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..images import MAX_IMAGE_BYTES, ImageError, load_image
from ..retrieve.sources import ImageItem, iter_image_caption_items, read_item_bytes, text_list_errors, unescape_text

if TYPE_CHECKING:
    from ..model import GroundedLM

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Record:
    """One example: its caption and where its image is (a local file or a tar member)."""

    key: str  # stable identity (path or shard:member), used by precomputed features and skip reports
    caption: str
    item: ImageItem
    # The text the [RET]/[IMG] tokens follow in the retrieval and generation losses when it is not the caption
    # (a table's ``query`` column, e.g. the caption worded as a chat answer); captioning and the diffusion target
    # keep the caption
    query: str | None = None
    # Text put between the image and its caption in the captioning loss, not itself a target (a table's ``prompt``
    # column, e.g. a chat's question: the caption is then the answer)
    prompt: str | None = None
    # Text read first, before the image in the captioning loss and before the query in the retrieval loss, not
    # itself a target (a table's ``history`` column, e.g. a chat's earlier exchange: a later turn's layout)
    history: str | None = None

    @property
    def image_query(self) -> str:
        return self.query or self.caption

    def texts(self) -> dict[str, str]:
        """The texts a batch reads ("" for none): what both datasets hand to ``collate``."""
        return {
            "caption": self.caption,
            "query": self.image_query,
            "prompt": self.prompt or "",
            "history": self.history or "",
        }


@dataclass
class SkipLog:
    """Examples left out, by reason; a few of each are kept for the message."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(key)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no example skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.most_common()]
        return f"{self.total} example(s) skipped: " + "; ".join(parts)


@dataclass
class Records:
    items: list[Record]
    skipped: SkipLog
    description: str

    def __len__(self) -> int:
        return len(self.items)


# ---------------------------------------------------------------------------------------------- reading


def read_records(
    data: str | Path, image_root: str | Path | None = None, *, allow_outside_root: bool = False
) -> Records:
    """Every usable record of ``data``. Raises ``DataError`` / ``FileNotFoundError`` for anything unusable: a
    table without a caption column or with a row of the wrong width, an image root that does not exist, an image
    outside it (unless ``allow_outside_root``), a dataset left empty after skipping."""
    path = Path(data)
    if not path.exists() and "{" not in str(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(
            f"--image-root {image_root} is not a directory; pass the folder the image paths "
            f"in {path.name} are relative to"
        )
    if path.is_file() and path.suffix.lower() in (".tsv", ".csv", ".txt"):
        check_table_rows(path)
    try:
        items = list(iter_image_caption_items(data, image_root))
    except ValueError as e:
        raise DataError(f"--data {data}: {e}") from None
    is_table = path.suffix.lower() in (".tsv", ".csv", ".txt")
    if is_table and items and all(it.caption is None for it in items):
        raise DataError(
            f"--data {data} has no caption column: the first line must name the columns, e.g. "
            f"'caption<TAB>image' (a caption column is one of caption, text, title, alt)"
        )
    skipped = SkipLog()
    records = []
    for it in items:
        caption = it.caption
        if caption is None and it.path is not None and it.member is None:
            sidecar = Path(it.path).with_suffix(".txt")
            if sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8").strip() or None
        if it.url is not None:
            skipped.add("URL (download the images first, e.g. with img2dataset)", it.name)
        elif not caption:
            skipped.add("no caption", it.name)
        elif it.member is None and not Path(it.file).is_file():
            skipped.add("missing image", it.name)
        else:
            if it.member is None:  # the size joins the data fingerprint: a replaced image invalidates features
                it = replace(it, size=Path(it.file).stat().st_size, caption=caption)
            # a table's cells come stripped, an empty one as None
            records.append(
                Record(
                    key=it.name,
                    caption=caption.strip(),
                    item=it,
                    query=it.query,
                    prompt=unescape_text(it.prompt) if it.prompt else None,
                    history=unescape_text(it.history) if it.history else None,
                )
            )
    if not allow_outside_root:
        root = Path(image_root) if image_root is not None else path if path.is_dir() else path.parent
        check_inside_root([r.item for r in records], root, data)
    if not records:
        raise DataError(f"--data {data} holds no usable image-caption example ({skipped.summary()})")
    if skipped.total:
        logger.warning("%s: %s", data, skipped.summary())
    return Records(records, skipped, str(data))


def check_table_rows(path: Path, shown: int = 5) -> None:
    """Refuse a table whose rows do not all have its header's width (a .txt list: at most one TAB per line), as
    the reader would otherwise drop a short row silently and read a long one's extra cells as part of another.
    A file that is not UTF-8, or a cell over the csv module's limit, is refused naming the file and line."""
    bad: list[str] = []
    rows = None
    try:
        with open(path, encoding="utf-8", newline="") as f, text_list_errors(path, lambda: rows and rows.line_num):
            if path.suffix.lower() == ".txt":
                for n, line in enumerate(f, 1):
                    cells = line.count("\t") + 1
                    if cells > 2 and not line.lstrip().startswith("#"):
                        bad.append(f"{path}:{n}: {cells} TAB-separated cells, expected image or caption<TAB>image")
            else:
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
                quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
                rows = csv.reader(f, delimiter=delimiter, quoting=quoting)
                header = next(rows, None)
                width = len(header) if header else 0
                for row in rows:
                    if row and len(row) != width:  # an empty line is no row
                        bad.append(f"{path}:{rows.line_num}: {len(row)} cell(s), but the header has {width} ({header})")
    except ValueError as e:  # text_list_errors': the file and line are named
        raise DataError(f"--data {e}") from None
    if bad:
        more = f" (and {len(bad) - shown} more)" if len(bad) > shown else ""
        raise DataError(
            f"--data {path}: {len(bad)} row(s) have the wrong number of cells: " + "; ".join(bad[:shown]) + more + ". "
            "Every row needs one cell per column (a TAB or comma inside a caption splits it): fix or delete them"
        )


def check_inside_root(items: Sequence[ImageItem], root: Path, data: str | Path, shown: int = 3) -> None:
    """Refuse local images that resolve (``..``, absolute paths and symlinks followed) outside ``root``: a data
    file from someone else must not make training read any file on this machine."""
    base = root.resolve()
    local = [it.path for it in items if it.member is None and it.path is not None]  # a URL is no file to read here
    outside = [p for p in local if not Path(p).resolve().is_relative_to(base)]
    if outside:
        raise DataError(
            f"--data {data}: {len(outside)} image path(s) resolve outside the image root {root} "
            f"(e.g. {', '.join(outside[:shown])}); put the images under it, point --image-root at their folder, "
            f"or pass --allow-images-outside-root if you trust {Path(str(data)).name} to name only images"
        )


def load_record_image(record: Record) -> Image.Image:
    """Decode a record's image (``ImageError`` if it cannot be)."""
    return load_image(read_item_bytes(record.item, MAX_IMAGE_BYTES), name=record.key)


def records_fingerprint(records: Sequence[Record]) -> str:
    """Identifies a record list (keys, captions and image sizes, in order): precomputed features must match it."""
    h = hashlib.sha256()
    for r in records:
        # absent for data without queries, prompts or histories: their fingerprint is unchanged
        query = f"\0{r.query}" if r.query else ""
        prompt = f"\0\1{r.prompt}" if r.prompt else ""
        history = f"\0\2{r.history}" if r.history else ""
        h.update(f"{r.key}\0{r.caption}\0{r.item.size}{query}{prompt}{history}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- datasets


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses each image on demand; an unreadable one comes back as ``pixels=None`` with the
    reason, for the collate function to drop and count."""

    def __init__(self, records: Sequence[Record], processor):
        self.records = list(records)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        try:
            pixels = self.processor([load_record_image(r)])[0]
        except ImageError as e:
            return {"index": i, "caption": r.caption, "pixels": None, "error": str(e), "key": r.key}
        return {"index": i, **r.texts(), "pixels": pixels, "key": r.key}


class PrecomputedDataset(torch.utils.data.Dataset):
    """Reads frozen features (and diffusion text-encoder outputs) written by ``precompute``; a record with no
    row there (its image was unreadable at precompute time) comes back as ``features=None``."""

    def __init__(self, records: Sequence[Record], store):
        self.records = list(records)
        self.store = store

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        row = self.store.get(i)
        if row is None:
            return {
                "index": i,
                "caption": r.caption,
                "features": None,
                "error": "unreadable at precompute",
                "key": r.key,
            }
        return {"index": i, **r.texts(), "key": r.key, **row}


@dataclass
class Batch:
    indices: list[int]
    captions: list[str]
    queries: list[str] = field(default_factory=list)  # what the image tokens follow (the caption unless given)
    prompts: list[str] = field(default_factory=list)  # captioning context before each caption ("" for none)
    histories: list[str] = field(default_factory=list)  # read before each image and each query ("" for none)
    pixels: torch.Tensor | None = None  # (B, 3, S, S)
    features: torch.Tensor | None = None  # (B, vision_dim), precomputed
    text_cond: torch.Tensor | None = None  # (B, Q, D) diffusion text-encoder outputs, precomputed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) dropped from this batch

    def __len__(self) -> int:
        return len(self.indices)

    def image_features(self, model: GroundedLM, device) -> torch.Tensor:
        """(B, vision_dim) frozen image features in fp32: the precomputed ones, or ``model`` encodes the pixels."""
        if self.features is not None:
            return self.features.to(device=device, dtype=torch.float32)
        if self.pixels is None:  # every image of this micro-batch was unreadable
            return torch.zeros(0, model.vision.out_dim, device=device)
        return model.encode_images(self.pixels.to(device))


def collate(items: list[dict]) -> Batch:
    """Stack the usable items; the unreadable ones are dropped and reported in ``Batch.skipped``."""
    usable = [it.get("pixels") is not None or it.get("features") is not None for it in items]
    good = [it for it, ok in zip(items, usable, strict=True) if ok]
    bad = [(it["key"], it.get("error", "unreadable")) for it, ok in zip(items, usable, strict=True) if not ok]
    batch = Batch(
        indices=[it["index"] for it in good],
        captions=[it["caption"] for it in good],
        queries=[it["query"] for it in good],
        prompts=[it["prompt"] for it in good],
        histories=[it["history"] for it in good],
        skipped=bad,
    )
    if good and good[0].get("pixels") is not None:
        batch.pixels = torch.stack([it["pixels"] for it in good])
    if good and good[0].get("features") is not None:
        batch.features = torch.stack([it["features"] for it in good])
        if good[0].get("text_cond") is not None:
            batch.text_cond = torch.stack([it["text_cond"] for it in good])
    return batch


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed held-out slice (same on every process and on resume)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"{n} example(s) are too few to hold out {n_val} for validation; lower --val-fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


class MicroBatches:
    """Index lists (into the training split) of micro-batches ``start..stop-1``. Global micro-batch u covers rows
    [j * B * W, (j + 1) * B * W) of epoch e's permutation (e, j = divmod(u, per_epoch)); process ``rank`` takes its
    B-slice. A function of (seed, u) only: resuming at u gives the batches an uninterrupted run would see."""

    def __init__(self, n_train: int, *, batch_size: int, world: int, rank: int, seed: int, start: int, stop: int):
        self.n, self.b, self.w, self.rank, self.seed = n_train, batch_size, world, rank, seed
        self.start, self.stop = start, stop
        self.per_epoch = n_train // (batch_size * world)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        epoch, perm = -1, torch.empty(0, dtype=torch.long)  # replaced at the first u: no epoch is -1
        for u in range(self.start, self.stop):
            e, j = divmod(u, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            lo = j * self.b * self.w + self.rank * self.b
            yield perm[lo : lo + self.b].tolist()
