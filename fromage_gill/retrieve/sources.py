"""Reading image sets: one iterator over folders, path/URL lists (txt, CSV, TSV incl. CC3M) and webdataset tars.

``iter_image_caption_items(path, image_root=None)`` is the one entry point; both the index builder and training
read image sets through it, so every format works everywhere. Each item says where its image is (a local path, a
URL, or a member of a tar shard) and carries the caption and licence fields the list had. Items are lazy: nothing
is decoded here (``read_item_bytes`` reads local files and tar members; URLs go through ``fetch.py``).

Accepted ``path``:
- a folder: every image file under it (recursively, sorted), then every ``*.tar`` shard under it
  (img2dataset's output folder works as is);
- an image file: that one image;
- ``*.txt``: one path or URL per line; a line with a TAB is ``caption<TAB>image`` (CC3M's layout);
- ``*.tsv`` / ``*.csv``: a header row naming an image column (image, url, path, filepath, file, filename,
  image_url, image_path) and optionally caption (caption, text, title), license and source columns; a TSV
  without such a header is read as CC3M's ``caption<TAB>image``;
- ``*.tar`` or a brace pattern ``shards/{00000..00099}.tar``: webdataset / img2dataset shards, members grouped
  by key (``000123.jpg`` + ``000123.txt`` caption + ``000123.json`` with caption/url/license).
Relative paths in lists are resolved against ``image_root`` (default: the list file's folder).
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
IMAGE_COLUMNS = ("image", "url", "path", "filepath", "file", "filename", "image_url", "image_path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "alt")
QUERY_COLUMNS = ("query",)  # training only: the text the image tokens follow (default: the caption)
PROMPT_COLUMNS = ("prompt",)  # training only: unsupervised text between the image and its caption
HISTORY_COLUMNS = ("history",)  # training only: unsupervised earlier turns of a chat, read before the image
_ESCAPES = (("\\n", "\n"), ("\\t", "\t"))
LICENSE_COLUMNS = ("license", "licence")
SOURCE_COLUMNS = ("source",)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def unescape_text(text: str) -> str:
    """``\\n`` and ``\\t`` typed as backslash escapes (in a shell argument, or a TSV cell, which cannot hold a
    newline) read as the characters they name."""
    for escaped, char in _ESCAPES:
        text = text.replace(escaped, char)
    return text


def escape_text(text: str) -> str:
    """The inverse of ``unescape_text``: a newline or tab written as its escape, for a TSV cell."""
    for escaped, char in _ESCAPES:
        text = text.replace(char, escaped)
    return text


@dataclass(frozen=True)
class ImageItem:
    """One image of a set. Exactly one of ``path`` / ``url`` is set; tar members have ``member`` and ``offset``."""

    name: str  # for logs and skip reports: the path, URL or ``shard.tar:member``
    path: str | None = None
    url: str | None = None
    member: str | None = None  # name inside the tar shard at ``path``
    offset: int | None = None  # byte offset of the member's data in the (uncompressed) tar: direct reads
    size: int | None = None
    caption: str | None = None
    license: str | None = None
    source: str | None = None
    query: str | None = None  # a table's optional query column (training's [RET]/[IMG] text)
    prompt: str | None = None  # a table's optional prompt column (training's captioning context)
    history: str | None = None  # a table's optional history column (training: the chat before the example)

    @property
    def file(self) -> str:
        """``path``, for an item known to be local (a URL item has no file to read)."""
        if self.path is None:
            raise ValueError(f"{self.name} is a URL ({self.url}), not a local file: download the images first")
        return self.path

    def __post_init__(self):
        if (self.path is None) == (self.url is None):
            raise ValueError(f"an image item needs exactly one of path or url, got path={self.path!r} url={self.url!r}")

    @property
    def is_url(self) -> bool:
        return self.url is not None

    def record(self) -> dict:
        """The JSON-able description of where the image is, as an index stores it."""
        out = {
            k: v
            for k, v in (
                ("path", self.path),
                ("url", self.url),
                ("member", self.member),
                ("offset", self.offset),
                ("size", self.size),
                ("caption", self.caption),
                ("license", self.license),
                ("source", self.source),
            )
            if v is not None
        }
        return out


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def iter_image_caption_items(path: str | Path, image_root: str | Path | None = None) -> Iterator[ImageItem]:
    """Every image of the set at ``path`` in a stable order (see the module docstring for the formats)."""
    text = str(path)
    if _BRACES.search(text):
        for shard in expand_braces(text):
            yield from _iter_tar(Path(shard))
        return
    p = Path(path)
    if p.is_dir():
        yield from _iter_folder(p)
        return
    if not p.is_file():
        raise FileNotFoundError(f"images: {p} is neither a folder nor a file (give a folder, a list or tar shards)")
    suffix = p.suffix.lower()
    root = Path(image_root) if image_root is not None else p.parent
    if suffix in IMAGE_EXTENSIONS:
        yield ImageItem(name=str(p), path=str(p))
    elif suffix == ".tar":
        yield from _iter_tar(p)
    elif suffix == ".txt":
        yield from _iter_txt(p, root)
    elif suffix in (".tsv", ".csv"):
        yield from _iter_table(p, root, "\t" if suffix == ".tsv" else ",")
    else:
        raise ValueError(
            f"images: cannot read {p} (type {suffix!r}); give a folder, an image, a .txt/.csv/.tsv list or tar shards"
        )


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar a/001.tar a/002.tar`` (zero padding kept), as webdataset writes them."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :]))
    return out


def read_item_bytes(item: ImageItem, max_bytes: int) -> bytes:
    """The encoded image of a local item (file or tar member), refusing more than ``max_bytes``."""
    from ..images import ImageError

    if item.path is None:
        raise ValueError(f"{item.name} is a URL: fetch it with fromage_gill.retrieve.fetch")
    if item.member is None:
        p = Path(item.path)
        if not p.is_file():
            raise ImageError(f"{item.name}: no such file")
        size = p.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{item.name}: {size} bytes is more than the {max_bytes}-byte limit for an image")
        return p.read_bytes()
    if item.size is not None and item.size > max_bytes:
        raise ImageError(f"{item.name}: {item.size} bytes is more than the {max_bytes}-byte limit for an image")
    if item.offset is not None and item.size is not None:
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            return f.read(item.size)
    with tarfile.open(item.path) as tar:  # compressed shards have no direct offsets
        f = tar.extractfile(item.member)
        if f is None:
            raise ImageError(f"{item.name}: not a file in the shard")
        return f.read(max_bytes + 1)[: max_bytes + 1]


# ------------------------------------------------------------------------------------------ formats


def _iter_folder(root: Path) -> Iterator[ImageItem]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for p in files:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            yield ImageItem(name=str(p), path=str(p))
    for p in files:
        if p.suffix.lower() == ".tar":
            yield from _iter_tar(p)


def _item_for(ref: str, root: Path, **fields) -> ImageItem:
    ref = ref.strip()
    if is_url(ref):
        return ImageItem(name=ref, url=ref, **fields)
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = root / p
    return ImageItem(name=str(p), path=str(p), **fields)


@contextmanager
def text_list_errors(path: Path, line: Callable[[], int | None] = lambda: None) -> Generator[None, None, None]:
    """A codec or csv error while reading the list ``path`` -> a ValueError naming the file, the line and the fix
    (``line``: where a csv reader is, for the csv errors)."""
    try:
        yield
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        raise ValueError(
            f"{path}:{first_undecodable_line(path)}: is not UTF-8 text ({e.reason}, byte 0x{bad}): save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` (or from the encoding "
            f"it was written in)"
        ) from None
    except csv.Error as e:
        at = line()
        raise ValueError(
            f"{path}:{at if at is not None else '?'}: {e}: a cell longer than {csv.field_size_limit():,} characters "
            f"is not a caption or a path (training reads the first --max-caption-tokens tokens of a caption): "
            f"shorten it; in a CSV, a quote left open makes the lines after it one cell"
        ) from None


def first_undecodable_line(path: Path) -> int | None:
    """The number of the first line of ``path`` that is not UTF-8 (read in binary, for an error message)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return None


def _iter_txt(path: Path, root: Path) -> Iterator[ImageItem]:
    with open(path, encoding="utf-8") as f, text_list_errors(path):
        for line in f:
            line = line.rstrip("\n\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" in line:
                caption, ref = line.rsplit("\t", 1)
                yield _item_for(ref, root, caption=caption.strip() or None)
            else:
                yield _item_for(line, root)


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for n in names:
        if n in lowered:
            return lowered.index(n)
    return None


def _iter_table(path: Path, root: Path, delimiter: str) -> Iterator[ImageItem]:
    reader = None  # the csv reader knows its line; ``rows`` may become a chain that does not

    def line() -> int | None:
        return reader.line_num if reader is not None else None

    with open(path, encoding="utf-8", newline="") as f, text_list_errors(path, line):
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        rows: Iterator[list[str]] = reader
        header = next(rows, None)
        if header is None:
            return
        col_img = _pick(header, IMAGE_COLUMNS)
        if col_img is None:
            if delimiter == "\t" and len(header) == 2:  # CC3M: caption<TAB>url, no header row
                col_img, col_cap, col_lic, col_src, col_query, col_prompt, col_history = 1, 0, *(None,) * 5
                rows = _chain([header], rows)
            else:
                raise ValueError(
                    f"images: {path} has no image column: its header is {header}; name one of {list(IMAGE_COLUMNS)}"
                    " (or, for a TSV, use CC3M's two-column caption<TAB>image without a header)"
                )
        else:
            col_cap = _pick(header, CAPTION_COLUMNS)
            col_lic = _pick(header, LICENSE_COLUMNS)
            col_src = _pick(header, SOURCE_COLUMNS)
            col_query = _pick(header, QUERY_COLUMNS)
            col_prompt = _pick(header, PROMPT_COLUMNS)
            col_history = _pick(header, HISTORY_COLUMNS)
        for row in rows:
            if not row or col_img >= len(row) or not row[col_img].strip():
                continue

            def get(col: int | None, row=row) -> str | None:
                return row[col].strip() or None if col is not None and col < len(row) else None

            yield _item_for(
                row[col_img],
                root,
                caption=get(col_cap),
                license=get(col_lic),
                source=get(col_src),
                query=get(col_query),
                prompt=get(col_prompt),
                history=get(col_history),
            )


def _chain(first, rest):
    yield from first
    yield from rest


def _iter_tar(path: Path) -> Iterator[ImageItem]:
    """Webdataset members sharing a key form one sample; the image member is the item, .txt/.json add fields."""
    if not path.is_file():
        raise FileNotFoundError(f"images: shard {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    compressed = magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))  # member offsets only exist uncompressed
    samples: dict[str, dict] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue
            folder = info.name[: len(info.name) - len(base)]
            stem, _, ext = base.partition(".")  # webdataset: the key ends at the basename's first dot
            key, ext = folder + stem, "." + ext.lower()
            s = samples.get(key)
            if s is None:
                s = samples[key] = {}
                order.append(key)
            if ext in IMAGE_EXTENSIONS and "image" not in s:
                s["image"] = info
            elif ext == ".txt":
                s["caption"] = _read_member(tar, info).decode("utf-8", "replace").strip() or None
            elif ext == ".json":
                try:
                    meta = json.loads(_read_member(tar, info))
                except ValueError:
                    meta = {}
                if isinstance(meta, dict):
                    s["json"] = meta
    for key in order:
        s = samples[key]
        info = s.get("image")
        if info is None:
            continue
        meta = s.get("json", {})
        caption = s.get("caption") or _str(meta.get("caption"))
        yield ImageItem(
            name=f"{path}:{info.name}",
            path=str(path),
            member=info.name,
            offset=None if compressed else info.offset_data,
            size=info.size,
            caption=caption,
            license=_str(meta.get("license") or meta.get("licence")),
            source=_str(meta.get("url")) or None,
        )


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int = 1 << 20) -> bytes:
    f = tar.extractfile(info)
    return b"" if f is None else f.read(limit)


def _str(v) -> str | None:
    return v if isinstance(v, str) and v else None
