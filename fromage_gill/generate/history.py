"""A conversation's history as JSON: text, images as base64 PNG with their metadata, and each answer's tokens
(``Chat.to_dict`` / ``Chat.from_dict``).

Reading is as strict as live input, because an exported conversation may come from anyone: ``read_history_json``
bounds the bytes, the nesting depth and the number of JSON values before ``json.loads`` builds anything, and
refuses NaN and Infinity; ``history_from_dict`` checks every field, the role order (user first, then alternating),
the images per message and per conversation (``limits``) before any image is decoded, finite scores, and decodes
each image through ``images.load_image`` (its byte, pixel, side and aspect limits) one at a time, keeping it at
``limits.MAX_KEPT_IMAGE_PIXELS``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping, Sequence

from ..images import load_image
from .limits import MAX_IMAGES_PER_MESSAGE, check_image_counts, kept_image
from .prompt import SOURCES, ImageSegment, Turn

FORMAT, VERSION = "fromage_gill.chat", 1
MAX_HISTORY_BYTES = 200 * 1024 * 1024  # 64 kept images as PNG base64 and the text fit several times over
MAX_HISTORY_DEPTH = 16  # the format nests 5 deep (turns, a turn, its segments, a segment, a decision pair)
MAX_HISTORY_VALUES = 2_000_000  # strings, numbers, literals and containers: the answers' token ids are most
# A JSON string (escapes included), a bracket, or any other value (number or literal) -- one token of the scan
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[^\s,:\[\]{}"]+')


def history_to_dict(history: Sequence[Turn], *, model: str) -> dict:
    turns = []
    for t in history:
        segs = []
        for s in t.segments:
            if isinstance(s, str):
                segs.append({"type": "text", "text": s})
            else:
                buf = io.BytesIO()
                s.image.save(buf, format="PNG")
                segs.append(
                    {
                        "type": "image",
                        "png": base64.b64encode(buf.getvalue()).decode("ascii"),
                        "source": s.source,
                        "score": s.score,
                        "caption": s.caption,
                        "url": s.url,
                        "index_id": s.index_id,
                        "decision": list(s.decision) if s.decision else None,
                        "seed": s.seed,
                    }
                )
        turn = {"role": t.role, "segments": segs}
        if t.tokens is not None:
            turn["tokens"] = list(t.tokens)
        turns.append(turn)
    return {"format": FORMAT, "version": VERSION, "model": model, "turns": turns}


def read_history_json(
    source: bytes | str,
    *,
    max_bytes: int = MAX_HISTORY_BYTES,
    max_depth: int = MAX_HISTORY_DEPTH,
    max_values: int = MAX_HISTORY_VALUES,
) -> dict:
    """Parse a saved chat's JSON text (a file's bytes), refusing with a ``ValueError`` what would cost more than
    it could hold: more than ``max_bytes``, containers nested deeper than ``max_depth`` (``json.loads`` would
    recurse until ``RecursionError``), more than ``max_values`` values (200 MB of ``[],`` is 66 million empty
    lists), NaN or Infinity. The scan stops at the first limit crossed; ``history_from_dict`` checks the rest."""
    if len(source) > max_bytes:
        raise ValueError(
            f"the saved chat is {len(source):,} bytes, more than the limit of {max_bytes:,} bytes; not a chat export"
        )
    if isinstance(source, (bytes, bytearray)):
        try:
            source = bytes(source).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"the saved chat is not UTF-8 text ({e}); load a file saved with 'Export JSON'") from None
    depth = values = 0
    for m in _JSON_TOKEN.finditer(source):
        c = m.group()
        values += c not in "]}"
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(
                    f"the saved chat nests more than {max_depth} levels deep (at character {m.start()}); a chat "
                    f"export nests 5: the file was edited or is not an export"
                )
        elif c in "]}":
            depth -= 1
        if values > max_values:
            raise ValueError(f"the saved chat holds more than {max_values:,} JSON values; not a chat export")

    def refuse_constant(name: str):
        raise ValueError(f"the saved chat holds {name}, which is not a number a chat export holds")

    try:
        data = json.loads(source, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"the saved chat is not valid JSON ({e}); load a file saved with 'Export JSON'") from None
    except RecursionError:  # the scan bounds the depth; this stays as a guard should the two ever disagree
        raise ValueError("the saved chat nests too deep to read; not a chat export") from None
    if not isinstance(data, dict):
        raise ValueError(f'not a saved chat: expected an object with "format": "{FORMAT}"')
    return data


def history_from_dict(data: Mapping, *, model: str, vocab_size: int) -> list[Turn]:
    """The turns of ``history_to_dict`` output; raises ``ValueError`` saying what is wrong. Token ids are kept only
    when ``data`` was saved by ``model`` (another model's tokens mean nothing here: its answers are re-encoded).
    The structure, role order and image counts are checked before any image is decoded."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f'not a saved chat: expected an object with "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported chat version {data.get('version')!r}; this version reads version {VERSION}")
    turns = data.get("turns")
    if not isinstance(turns, list):
        raise ValueError("chat 'turns' must be a list")
    _check_turns(turns)
    same_model = data.get("model") == model
    out: list[Turn] = []
    for i, t in enumerate(turns):
        where = f"turns[{i}]"
        segs = [_segment_from_dict(s, f"{where}.segments[{j}]") for j, s in enumerate(t["segments"])]
        if t["role"] == "user" and not any(not isinstance(s, str) or s.strip() for s in segs):
            raise ValueError(f"{where} is an empty user message (no text, no image); the file was edited")
        tokens = t.get("tokens")
        if tokens is not None:
            if not isinstance(tokens, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab_size for x in tokens
            ):
                raise ValueError(f"{where}.tokens must be a list of token ids in [0, {vocab_size})")
            if t["role"] != "assistant":
                raise ValueError(f"{where}.tokens: only assistant turns carry tokens")
        out.append(Turn(t["role"], segs, tuple(tokens) if tokens is not None and same_model else None))
    return out


def _check_turns(turns: list) -> None:
    """Roles, segment types and image counts, as live input has them, before anything is decoded."""
    images = 0
    for i, t in enumerate(turns):
        where = f"turns[{i}]"
        if not isinstance(t, Mapping) or t.get("role") not in ("user", "assistant"):
            raise ValueError(f"{where} must be an object with role 'user' or 'assistant'")
        want = "user" if i % 2 == 0 else "assistant"
        if t["role"] != want:
            raise ValueError(
                f"{where} is a {t['role']} turn where a {want} turn must be: a conversation starts with the user "
                f"and alternates user, assistant (the file was edited or is damaged)"
            )
        if not isinstance(t.get("segments"), list):
            raise ValueError(f"{where}.segments must be a list")
        for j, s in enumerate(t["segments"]):
            if not isinstance(s, Mapping) or s.get("type") not in ("text", "image"):
                raise ValueError(f"{where}.segments[{j}] must be an object with type 'text' or 'image'")
        n = sum(s["type"] == "image" for s in t["segments"])
        if t["role"] == "user":
            check_image_counts(images, n, where=where)
        elif n > MAX_IMAGES_PER_MESSAGE:  # an answer holds at most max_images, which check_settings bounds by this
            raise ValueError(f"{where} holds {n} images, more than the limit of {MAX_IMAGES_PER_MESSAGE} per message")
        images += n
    if turns and turns[-1].get("role") != "assistant":
        raise ValueError(
            f"turns[{len(turns) - 1}] is a user turn without its answer: a saved chat ends with the assistant"
        )


def _segment_from_dict(s: Mapping, where: str) -> str | ImageSegment:
    if s["type"] == "text":
        if not isinstance(s.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        return s["text"]
    png = s.get("png")
    if not isinstance(png, str):
        raise ValueError(f"{where}.png must be base64 PNG data")
    try:
        data = base64.b64decode(png, validate=True)
    except ValueError:
        raise ValueError(f"{where}.png is not valid base64") from None
    decision = s.get("decision")
    if decision is not None and (
        not isinstance(decision, list)
        or len(decision) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in decision)
    ):
        raise ValueError(f"{where}.decision must be null or [p_generate, p_retrieve], two probabilities in [0, 1]")
    for name, types in (("score", (int, float)), ("caption", str), ("url", str), ("index_id", int), ("seed", int)):
        v = s.get(name)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise ValueError(f"{where}.{name} has the wrong type: {type(v).__name__}")
    if s.get("score") is not None and not math.isfinite(s["score"]):
        raise ValueError(f"{where}.score is {s['score']}: a score must be a finite number (or null)")
    if s.get("source", "user") not in SOURCES:
        raise ValueError(f"{where}.source must be one of {', '.join(SOURCES)}, got {s.get('source')!r}")
    # decoded under the live limits, then kept small: one full-size image is resident at a time, never all of them
    image = kept_image(load_image(data, name=where))
    return ImageSegment(
        image,
        s.get("source", "user"),
        s.get("score"),
        s.get("caption"),
        s.get("url"),
        s.get("index_id"),
        tuple(decision) if decision else None,
        s.get("seed"),
    )
