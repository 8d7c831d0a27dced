"""The public annotation formats as distributed, and the local image folders beside them.

- VIST story-in-sequence (``sis/val.story-in-sequence.json``): ``annotations`` is a list of one-element lists
  ``[{story_id, album_id, photo_flickr_id, worker_arranged_photo_order, text, original_text, ...}]``; a story is
  its annotations sorted by ``worker_arranged_photo_order``. Images: ``<photo_flickr_id>.<ext>``.
- VisDial v1.0 (``visdial_1.0_val.json``): ``data.questions`` and ``data.answers`` (strings), ``data.dialogs``
  ``[{image_id, caption, dialog: [{question, answer, answer_options, gt_index}]}]`` (indices into those lists);
  dense annotations (``visdial_1.0_val_dense_annotations.json``): ``[{image_id, round_id (1-based),
  gt_relevance}]``. Images: ``VisualDialog_val2018_<12-digit image_id>.jpg`` (or ``<image_id>.<ext>``).
- Captions: Karpathy's splits (``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[]`` with ``split``,
  ``filename``, optional ``filepath``, ``sentences[].raw``) or a COCO captions file (``captions_val2014.json``:
  ``images[]`` with ``id``/``file_name``, ``annotations[]`` with ``image_id``/``caption``).

Every reader raises ``DataError`` naming the file, what is wrong and what was expected.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..typed_json import JSONValue

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


class DataError(ValueError):
    """An evaluation file is missing or not in the format the task reads."""


def read_json(path: str | Path, what: str) -> JSONValue:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path} (pass the file with --data)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); expected the {what}") from None


def _need(obj: JSONValue, key: str, path: Path, where: str, expected: str, kind: type | None = None) -> JSONValue:
    """``obj[key]``, refused naming the file and the place when ``obj`` has no such key or (``kind``) its value
    is of another type: a file in another format fails here, not as a TypeError deep in a task."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{path}: {where} has no {key!r}; expected {expected}")
    if kind is not None and not isinstance(obj[key], kind):
        raise DataError(
            f"{path}: {where}'s {key!r} is a {type(obj[key]).__name__}, not a {kind.__name__}; expected {expected}"
        )
    return obj[key]


class ImageFolder:
    """Image files of a folder (recursively) by file stem; ``find`` also matches a trailing number (VisDial's
    ``VisualDialog_val2018_000000185565.jpg`` is image 185565)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root} (pass it with --images)")
        self.by_stem: dict[str, Path] = {}
        self.by_number: dict[int, Path] = {}
        self.by_relative: dict[str, Path] = {}
        for p in sorted(self.root.rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            self.by_stem.setdefault(p.stem, p)
            self.by_relative[p.relative_to(self.root).as_posix()] = p
            m = re.search(r"(\d+)$", p.stem)
            if m:
                self.by_number.setdefault(int(m.group(1)), p)

    def __len__(self) -> int:
        return len(self.by_stem)

    def find(self, key: str | int) -> Path | None:
        if isinstance(key, int) or str(key).isdigit():
            hit = self.by_stem.get(str(key))
            return hit if hit is not None else self.by_number.get(int(key))
        key = str(key)
        return self.by_relative.get(key) or self.by_stem.get(Path(key).stem)

    def path(self, key: str | int) -> Path:
        """``find``, for an image a task has already found there."""
        hit = self.find(key)
        if hit is None:
            raise DataError(f"no image file for {key!r} in {self.root}")
        return hit

    def require_some(self, what: str, example: str) -> None:
        if not self.by_stem:
            raise DataError(
                f"{self.root} holds no image files ({', '.join(IMAGE_SUFFIXES)}); expected {what}, e.g. {example}"
            )


# ---------------------------------------------------------------------------------------------- VIST


@dataclass(frozen=True)
class StoryItem:
    image_id: str
    text: str


@dataclass(frozen=True)
class Story:
    story_id: str
    items: tuple[StoryItem, ...]  # in worker_arranged_photo_order


def read_vist(path: str | Path) -> list[Story]:
    path = Path(path)
    data = read_json(path, "VIST story-in-sequence JSON (e.g. sis/val.story-in-sequence.json)")
    anns = _need(data, "annotations", path, "the file", "VIST's story-in-sequence format (a list of annotations)", list)
    stories: dict[str, list[tuple[int, StoryItem]]] = defaultdict(list)
    for i, ann in enumerate(anns):
        a = ann[0] if isinstance(ann, list) and len(ann) == 1 else ann
        where = f"annotations[{i}]"
        row = {
            key: _need(a, key, path, where, "story_id, photo_flickr_id, worker_arranged_photo_order and text")
            for key in ("story_id", "photo_flickr_id", "worker_arranged_photo_order", "text")
        }
        stories[str(row["story_id"])].append(
            (int(row["worker_arranged_photo_order"]), StoryItem(str(row["photo_flickr_id"]), str(row["text"])))
        )
    if not stories:
        raise DataError(f"{path} holds no stories (its annotations list is empty)")
    return [Story(sid, tuple(item for _, item in sorted(items, key=lambda x: x[0]))) for sid, items in stories.items()]


# ---------------------------------------------------------------------------------------------- VisDial


@dataclass(frozen=True)
class DialogRound:
    question: str
    answer: str | None  # None where the split withholds it (test)
    options: tuple[str, ...]  # the 100 answer options (may be empty)
    gt_index: int | None


@dataclass(frozen=True)
class Dialog:
    image_id: int
    caption: str
    rounds: tuple[DialogRound, ...]


def read_visdial(path: str | Path) -> list[Dialog]:
    path = Path(path)
    data = read_json(path, "VisDial v1.0 JSON (e.g. visdial_1.0_val.json)")
    expected = "VisDial v1.0's {'data': {'questions', 'answers', 'dialogs'}}"
    body = _need(data, "data", path, "the file", expected)
    questions = _need(body, "questions", path, "data", expected, list)
    answers = _need(body, "answers", path, "data", expected, list)
    dialogs = _need(body, "dialogs", path, "data", expected, list)
    out = []
    for i, d in enumerate(dialogs):
        where = f"data.dialogs[{i}]"
        rounds = []
        for j, r in enumerate(_need(d, "dialog", path, where, "image_id and dialog", list)):
            q = _need(r, "question", path, f"{where}.dialog[{j}]", "question (an index into data.questions)")
            try:
                answer = answers[r["answer"]] if "answer" in r else None
                options = tuple(answers[k] for k in r.get("answer_options", ()))
                question = questions[q]
            except (IndexError, TypeError):
                raise DataError(f"{path}: {where}.dialog[{j}] points past data.questions / data.answers") from None
            rounds.append(DialogRound(question, answer, options, r.get("gt_index")))
        out.append(Dialog(int(_need(d, "image_id", path, where, "image_id")), str(d.get("caption", "")), tuple(rounds)))
    if not out:
        raise DataError(f"{path} holds no dialogs")
    return out


def read_dense(path: str | Path) -> dict[int, tuple[int, list[float]]]:
    """image_id -> (round index 0-based, relevance of each of the 100 options)."""
    path = Path(path)
    data = read_json(path, "VisDial dense annotations (e.g. visdial_1.0_val_dense_annotations.json)")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{image_id, round_id, gt_relevance}}")
    out = {}
    for i, d in enumerate(data):
        expected = "image_id, round_id (1-based) and gt_relevance"
        rel = d.get("gt_relevance", d.get("relevance")) if isinstance(d, dict) else None
        if rel is None:
            raise DataError(f"{path}: [{i}] has no 'gt_relevance'; expected {expected}")
        out[int(_need(d, "image_id", path, f"[{i}]", expected))] = (
            int(_need(d, "round_id", path, f"[{i}]", expected)) - 1,
            [float(x) for x in rel],
        )
    return out


# ---------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionedImage:
    image_id: str
    file: str  # relative path under the image folder (Karpathy: filepath/filename; COCO: file_name)
    references: tuple[str, ...]


def read_captions(path: str | Path, split: str | None = "test") -> list[CaptionedImage]:
    """Karpathy split JSON (``split`` picks "test", "val", ...; None takes all) or a COCO captions JSON."""
    path = Path(path)
    data = read_json(path, "caption annotations (Karpathy's dataset_coco.json, or COCO captions_*.json)")
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _coco_captions(path, data)
    images = _need(data, "images", path, "the file", "Karpathy's {'images': [{split, filename, sentences}]}", list)
    out = []
    for i, im in enumerate(images):
        where = f"images[{i}]"
        for key in ("filename", "sentences"):
            _need(im, key, path, where, "split, filename and sentences (Karpathy's format)")
        if split is not None and im.get("split") != split and not (split == "train" and im.get("split") == "restval"):
            continue
        file = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        refs = tuple(s["raw"] if isinstance(s, dict) else str(s) for s in im["sentences"])
        out.append(CaptionedImage(str(im.get("cocoid", im.get("imgid", im["filename"]))), file, refs))
    if not out:
        splits = sorted({str(im.get("split")) for im in images})
        raise DataError(f"{path} has no images in split {split!r} (it has {', '.join(splits) or 'none'}); use --split")
    return out


def _coco_captions(path: Path, data: dict) -> list[CaptionedImage]:
    refs: dict[int, list[str]] = defaultdict(list)
    for i, a in enumerate(data["annotations"]):
        refs[int(_need(a, "image_id", path, f"annotations[{i}]", "image_id and caption"))].append(
            str(_need(a, "caption", path, f"annotations[{i}]", "image_id and caption"))
        )
    out = []
    for i, im in enumerate(data["images"]):
        image_id = int(_need(im, "id", path, f"images[{i}]", "id and file_name"))
        if refs.get(image_id):
            out.append(
                CaptionedImage(
                    str(image_id),
                    str(_need(im, "file_name", path, f"images[{i}]", "id and file_name")),
                    tuple(refs[image_id]),
                )
            )
    if not out:
        raise DataError(f"{path} has no image with a caption")
    return out
