"""Prompts: interleaved text and images -> LM positions, the dialogue template, and the vision-feature cache.

A prompt is flattened into *parts*: runs of token ids and images; an image takes ``n_visual_tokens`` positions
(the input mapping of its vision features). Every position also gets a *key* (its token id, or the image's content
hash and index), so the generation loop can compare a new prompt with what its KV cache already holds and run
the LM only on the positions after the longest common prefix.

Text: each run of consecutive strings is tokenized on its own without special tokens, and BOS is put once, before
the first text (the published code does the same: a prompt that starts with an image gets BOS after it, which is
also how the training captions looked).

Dialogue template (``ModelConfig.dialogue``; the published demos use ``Q: ...\\nA:``). A user turn becomes
``[leading images] user_prefix <rest of the message> assistant_prefix``: images sent before any text go before
``Q:``, as the published demo placed an uploaded picture ahead of the question. Earlier answers are laid out one
of two ways (``GenerationSettings.history_layout``):

- ``"exact"`` (the default): an assistant turn becomes exactly the tokens it put in the context (its text tokens
  and the image tokens it emitted; the picture itself is not fed back), or with ``answer_images="omit"`` its text
  tokens only; turns are joined by ``turn_separator``. The KV cache of the conversation is then reused as it is.
  This is *not* the demos' layout: they fed back text, not tokens.
- ``"published"``: as the published demos (``demo/app*.py``) built their history: every string of the
  conversation is tokenized on its own (``Alone``), BOS once before the first; a user turn is the one string
  ``"Q: " + text + "\\nA:"``; an answer is the string ``" ".join(runs) + turn_separator``, where each run is the
  text before one of its images cut by ``truncate_caption`` and followed by ``" [RET]"`` (FROMAGe) or
  ``" [IMG0][IMG1]...[IMG7]"`` (GILL), so a space token comes before the image tokens and the text after the
  answer's last image is dropped (an answer without images is its cut text alone).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, overload

import torch
from PIL import Image

from ..config import DialogueSpec
from ..images import image_hash, load_image
from ..layout import splice_visual
from .stream import truncate_caption

if TYPE_CHECKING:  # types only: the model module pulls in the backbones
    from transformers import PreTrainedTokenizerBase

    from ..model import GroundedLM

ImageSource = Literal["user", "retrieved", "generated"]
SOURCES = ("user", "retrieved", "generated")
# Images are kept at most this large (aspect kept): the model sees 224 px, the chat shows a few hundred, and with
# the 32:1 aspect limit the short side stays >= 250 px. A 64-megapixel upload would otherwise stay resident at
# 192 MB.
MAX_KEPT_IMAGE_PIXELS = 2_000_000


class Decision(NamedTuple):
    """GILL's decision head on an image token: the probabilities of generating and of retrieving the image. Saved
    as ``{"p_generate": ..., "p_retrieve": ...}`` (``to_json``) by the history and by ``fromage-gill generate
    --json`` alike."""

    p_generate: float
    p_retrieve: float

    def to_json(self) -> dict[str, float]:
        return {"p_generate": self.p_generate, "p_retrieve": self.p_retrieve}


@dataclass(frozen=True, eq=False)
class ImageSegment:
    """An image in a conversation, with where it came from. ``key`` is the content hash (computed if not given)."""

    image: Image.Image
    source: ImageSource = "user"
    score: float | None = None  # retrieval score, or a generated image's similarity to the request
    caption: str | None = None
    url: str | None = None  # index record's url or path
    index_id: int | None = None
    decision: Decision | None = None  # from GILL's decision head
    seed: int | None = None  # diffusion seed of a generated image
    key: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"image source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not self.key:
            object.__setattr__(self, "key", image_hash(self.image))


@dataclass(frozen=True)
class TokenIds:
    """Token ids used verbatim (an assistant turn's own tokens, image tokens)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Alone:
    """Text tokenized on its own, never joined with the strings around it (the published demos tokenized each
    string of the conversation separately, which changes the tokens where two strings meet)."""

    text: str


Piece = str | ImageSegment | TokenIds | Alone


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation. ``tokens`` (assistant turns): exactly the LM tokens the turn put in the
    context, text and image tokens, so that encoding the history again reproduces the cached positions; None
    means "encode from the segments". An answer also keeps the facts of the turn that made it: its ``seed`` and
    why it ended (``end_reason``: a ``TurnEnd.reason``, or "interrupted" for one a crash cut short); each of its
    images keeps its own (source, score, GILL's ``Decision``)."""

    role: Literal["user", "assistant"]
    segments: list[str | ImageSegment]
    tokens: tuple[int, ...] | None = None
    seed: int | None = None
    end_reason: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"turn role must be 'user' or 'assistant', got {self.role!r}")

    @property
    def text(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]


# ---------------------------------------------------------------------------------------------- messages


def message_items(message: object) -> list[object]:
    """A message as the list of its items (a lone str, image or bytes is a message of one item); a list is used
    as it is, so listing a message twice costs nothing."""
    if isinstance(message, list):
        return message
    if isinstance(message, (str, Image.Image, bytes)) or not isinstance(message, Sequence):
        return [message]
    return list(message)


def kept_image(image: Image.Image, max_pixels: int = MAX_KEPT_IMAGE_PIXELS) -> Image.Image:
    """``image`` itself when it has at most ``max_pixels`` pixels, else a copy scaled down to fit (aspect kept)."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)  # a box reduce() first: 3x faster


@overload
def normalize_message(
    message: object, *, name: str = ..., allow_token_ids: Literal[False] = ...
) -> list[str | ImageSegment]: ...
@overload
def normalize_message(
    message: object, *, name: str = ..., allow_token_ids: bool
) -> list[str | ImageSegment | TokenIds]: ...
def normalize_message(
    message: object, *, name: str = "message", allow_token_ids: bool = False
) -> list[str | ImageSegment] | list[str | ImageSegment | TokenIds]:
    """A user message (a list of str and images, in order) as the parts of a turn: the one place a message's
    images are decoded.

    Images may be PIL images, ``ImageSegment``s, ``bytes`` or ``pathlib.Path`` (a ``str`` is always text); each
    goes through ``images.load_image`` (corrupt, empty and oversized images raise ``ImageError``) and is kept at
    ``MAX_KEPT_IMAGE_PIXELS`` before the next is decoded, so a message of eight 64-megapixel images peaks at one
    full-size image, not eight. Raises ``ValueError`` for an empty message. ``allow_token_ids``: also accept
    ``TokenIds`` (ids used verbatim, for evaluation scripts and benchmarks that need exact prompts; BOS still goes
    before the first text or ids, so ``[image, TokenIds(())]`` is the captioning layout ``[image][BOS]``).
    """
    out: list[str | ImageSegment | TokenIds] = []
    for i, item in enumerate(message_items(message)):
        if isinstance(item, str):
            if item:
                out.append(item)
        elif isinstance(item, ImageSegment):  # its picture meets the same limits as any other (a lazy one decodes)
            image = kept_image(load_image(item.image, name=f"{name} item {i}"))
            out.append(item if image is item.image else replace(item, image=image, key=""))
        elif allow_token_ids and isinstance(item, TokenIds):
            out.append(item)
        elif isinstance(item, (Image.Image, bytes, bytearray, Path)):
            what = str(item) if isinstance(item, Path) else f"{name} item {i}"
            # one expression: the full-size decode is freed before the next item's (a variable would hold it)
            out.append(
                ImageSegment(kept_image(load_image(bytes(item) if isinstance(item, bytearray) else item, name=what)))
            )
        else:
            raise ValueError(
                f"{name} item {i} is a {type(item).__name__}; a message is a list of str (text) and "
                f"PIL images (or image bytes / pathlib.Path)"
            )
    if not any(not isinstance(s, str) or s.strip() for s in out):
        raise ValueError(f"the {name} is empty: give some text or an image")
    return out


def dialogue_pieces(
    turns: Sequence[Turn],
    dialogue: DialogueSpec,
    image_token_ids: Sequence[int],
    *,
    layout: Literal["exact", "published"] = "exact",
    image_tokens: Sequence[str] = (),
) -> list[Piece]:
    """The dialogue template applied to ``turns`` (see the module docstring); the last turn is usually the user's,
    so the pieces end with ``assistant_prefix`` and the model continues with the answer. ``layout="published"``
    lays earlier answers out as the published demos did; it needs the image tokens' text (``image_tokens``)."""
    if layout == "published":
        return _published_pieces(turns, dialogue, image_tokens)
    if layout != "exact":
        raise ValueError(f"history layout must be 'exact' or 'published', got {layout!r}")
    pieces: list[Piece] = []
    for i, turn in enumerate(turns):
        if turn.role == "user":
            segs = list(turn.segments)
            n_lead = next((j for j, s in enumerate(segs) if isinstance(s, str)), len(segs))
            if i > 0:
                pieces.append(dialogue.turn_separator)
            pieces += segs[:n_lead]
            pieces.append(dialogue.user_prefix)
            pieces += segs[n_lead:]
            pieces.append(dialogue.assistant_prefix)
        elif turn.tokens is not None:
            omitted = set(image_token_ids) if dialogue.answer_images == "omit" else set()
            pieces.append(TokenIds(tuple(t for t in turn.tokens if t not in omitted)))
        else:
            for s in turn.segments:
                if isinstance(s, str):
                    pieces.append(s)
                elif dialogue.answer_images == "tokens":
                    pieces.append(TokenIds(tuple(image_token_ids)))
    return pieces


def published_answer(turn: Turn, image_tokens: Sequence[str]) -> str:
    """An earlier answer's text as the published demos fed it back (without the turn separator): the cut text
    before each image, then a space and the image tokens; the text after the last image is dropped."""
    if not image_tokens:
        raise ValueError("the published history layout needs the model's image tokens (ModelConfig.image_tokens)")
    runs, text = [], ""
    for seg in turn.segments:
        if isinstance(seg, str):
            text += seg
        else:
            runs.append(f"{truncate_caption(text)} {''.join(image_tokens)}")
            text = ""
    return " ".join(runs) if runs else truncate_caption(text)


def _published_pieces(turns: Sequence[Turn], dialogue: DialogueSpec, image_tokens: Sequence[str]) -> list[Piece]:
    pieces: list[Piece] = []
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            pieces.append(Alone(published_answer(turn, image_tokens) + dialogue.turn_separator))
            continue
        segs = list(turn.segments)
        n_lead = next((j for j, s in enumerate(segs) if isinstance(s, str)), len(segs))
        pieces += segs[:n_lead]
        sep = dialogue.turn_separator if i > 0 and turns[i - 1].role == "user" else ""  # answers end with it
        text = [sep + dialogue.user_prefix]
        for seg in [*segs[n_lead:], dialogue.assistant_prefix]:
            if isinstance(seg, str):
                text.append(seg)
            else:  # an image inside the message (the demos had none): the strings around it stay apart
                pieces += [Alone("".join(text)), seg]
                text = []
        pieces.append(Alone("".join(text)))
    return pieces


# ---------------------------------------------------------------------------------------------- encoding


@dataclass
class Prompt:
    """A flattened LM input: ``parts`` are token-id tuples and images (``n_visual`` positions each);
    ``keys[t]`` identifies position t (a token id, or ``(image key, j)``) for prefix matching."""

    parts: list[tuple[int, ...] | ImageSegment]
    n_visual: int
    keys: list[Hashable] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.keys:
            for part in self.parts:
                if isinstance(part, ImageSegment):
                    self.keys += [(part.key, j) for j in range(self.n_visual)]
                else:
                    self.keys += list(part)

    def __len__(self) -> int:
        return len(self.keys)

    def common_prefix(self, keys: Sequence[Hashable]) -> int:
        n = 0
        for a, b in zip(self.keys, keys, strict=False):
            if a != b:
                break
            n += 1
        return n

    def images(self, start: int = 0) -> list[ImageSegment]:
        """The images with at least one position at or after ``start``."""
        out, pos = [], 0
        for part in self.parts:
            n = self.n_visual if isinstance(part, ImageSegment) else len(part)
            if isinstance(part, ImageSegment) and pos + n > start:
                out.append(part)
            pos += n
        return out

    def embed(self, model: GroundedLM, vision_cache: VisionCache, start: int = 0) -> torch.Tensor:
        """``(len - start, d)`` input embeddings of positions ``start..``; images through ``vision_cache``. The
        positions are laid out as ``layout.py`` lays out training rows (token ids, and the visual slots of each
        image), and the images' embeddings go in with ``splice_visual``, as in ``GroundedLM.forward``."""
        images = self.images(start)
        ids, slot, pos, k = [], [], 0, 0
        for part in self.parts:
            is_img = isinstance(part, ImageSegment)
            n = self.n_visual if is_img else len(part)
            lo = max(start - pos, 0)
            if pos + n > start:
                if is_img:
                    ids += [0] * (n - lo)
                    slot += range(k * n + lo, (k + 1) * n)
                    k += 1
                else:
                    ids += part[lo:]
                    slot += [-1] * (n - lo)
            pos += n
        if not ids:
            return torch.zeros(0, model.hidden_size, device=model.device, dtype=model.dtype)
        input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
        visual_slot = torch.tensor([slot], dtype=torch.long, device=model.device)  # (1, T)
        visual = model.visual_tokens(vision_cache.features(model, images)) if images else None  # (N, n_visual, d)
        return splice_visual(model.embed_tokens(input_ids), visual, visual_slot)[0]


def encode_pieces(
    tokenizer: PreTrainedTokenizerBase, pieces: Sequence[Piece], n_visual: int, *, bos: bool = True
) -> Prompt:
    """Tokenize text pieces (consecutive strings joined first; an ``Alone`` on its own) and put BOS before the
    first text."""
    parts: list[tuple[int, ...] | ImageSegment] = []
    bos_id = tokenizer.bos_token_id  # transformers types it loosely: one id, or None for a tokenizer without BOS
    bos_ids: tuple[int, ...] = (bos_id,) if bos and isinstance(bos_id, int) else ()
    need_bos = bool(bos_ids)
    text: list[str] = []

    def flush() -> None:
        nonlocal need_bos
        if not text:
            return
        s = "".join(text)
        text.clear()
        ids = tuple(tokenizer(s, add_special_tokens=False).input_ids) if s else ()
        if need_bos:
            ids, need_bos = (*bos_ids, *ids), False
        if ids:
            parts.append(ids)

    for piece in pieces:
        if isinstance(piece, str):
            text.append(piece)
            continue
        flush()
        if isinstance(piece, Alone):
            text.append(piece.text)
            flush()
        elif isinstance(piece, TokenIds):
            ids = piece.ids
            if need_bos:
                ids, need_bos = (*bos_ids, *ids), False
            if ids:
                parts.append(tuple(ids))
        else:
            parts.append(piece)
    flush()
    return Prompt(parts, n_visual)


# ---------------------------------------------------------------------------------------------- vision features


class VisionCache:
    """Frozen vision features by image content hash: an image is encoded once per conversation, not once per turn.
    ``n_encoded`` counts the images that went through the vision encoder. Least recently used entries beyond
    ``max_items`` are dropped."""

    def __init__(self, max_items: int = 256):
        self.max_items = max_items
        self.n_encoded = 0
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._features)

    def __contains__(self, key: str) -> bool:
        return key in self._features

    @torch.no_grad()
    def features(self, model: GroundedLM, images: Sequence[ImageSegment]) -> torch.Tensor:
        """``(N, vision_dim)`` features of ``images`` (missing ones encoded in one batch)."""
        with self._lock:
            missing = list({img.key: img for img in images if img.key not in self._features}.values())
            if missing:
                pixels = model.vision.processor([m.image for m in missing])
                feats = model.encode_images(pixels)
                self.n_encoded += len(missing)
                for m, f in zip(missing, feats, strict=True):
                    self._features[m.key] = f
            for img in images:
                self._features.move_to_end(img.key)
            out = torch.stack([self._features[img.key] for img in images])
            while len(self._features) > self.max_items:
                self._features.popitem(last=False)
            return out
