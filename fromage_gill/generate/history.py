"""A conversation's history as JSON: text, images as base64 PNG with their metadata, and each answer's tokens
(``Chat.to_dict`` / ``Chat.from_dict``).

Reading is as strict as live input, because an exported conversation may come from anyone: ``read_history_json``
bounds the bytes, the nesting depth and the number of JSON values before ``json.loads`` builds anything, and
refuses NaN and Infinity; ``history_from_dict`` checks every field, the role order (user first, then alternating),
the images per message and per conversation (``limits``) before any image is decoded, finite scores, and decodes
each image through ``images.load_image`` (its byte, pixel, side and aspect limits) one at a time, keeping it at
``prompt.MAX_KEPT_IMAGE_PIXELS``.

An answer keeps the facts of its turn: ``seed`` and ``end_reason``; an image its ``decision`` as
``{"p_generate", "p_retrieve"}``. Older files are still read: a decision as a ``[p_generate, p_retrieve]`` pair, and
the seeds in a top-level ``"seeds"`` object keyed by turn number (the app's exports before the facts moved onto
the turns).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping, Sequence

from ..images import load_image
from ..typed_json import JSONValue
from .limits import MAX_IMAGES_PER_MESSAGE, check_image_counts
from .prompt import SOURCES, Decision, ImageSegment, Turn, kept_image

FORMAT, VERSION = "fromage_gill.chat", 1
MAX_HISTORY_BYTES = 200 * 1024 * 1024  # 64 kept images as PNG base64 and the text fit several times over
MAX_HISTORY_DEPTH = 16  # the format nests 5 deep (turns, a turn, its segments, a segment, a decision)
MAX_HISTORY_VALUES = 2_000_000  # strings, numbers, literals and containers: the answers' token ids are most
# A JSON string (escapes included), a bracket, or any other value (number or literal) -- one token of the scan
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|[^\s,:\[\]{}"]+')


# A JSON object (a saved chat, an export, the API's plain data): its values are whatever a file or a client holds
# until a reader (``history_from_dict`` here) has checked them.
JSON = dict[str, JSONValue]


def history_to_dict(history: Sequence[Turn], *, model: str) -> JSON:
    turns: list[JSON] = []
    for t in history:
        turn: JSON = {"role": t.role, "segments": [_segment_to_dict(s) for s in t.segments]}
        if t.tokens is not None:
            turn["tokens"] = list(t.tokens)
        if t.role == "assistant":
            turn.update(seed=t.seed, end_reason=t.end_reason)
        turns.append(turn)
    return {"format": FORMAT, "version": VERSION, "model": model, "turns": turns}


def _segment_to_dict(s: str | ImageSegment) -> JSON:
    if isinstance(s, str):
        return {"type": "text", "text": s}
    buf = io.BytesIO()
    s.image.save(buf, format="PNG")
    return {
        "type": "image",
        "png": base64.b64encode(buf.getvalue()).decode("ascii"),
        "source": s.source,
        "score": s.score,
        "caption": s.caption,
        "url": s.url,
        "index_id": s.index_id,
        "decision": s.decision.to_json() if s.decision else None,
        "seed": s.seed,
    }


def read_history_json(
    source: bytes | str,
    *,
    max_bytes: int = MAX_HISTORY_BYTES,
    max_depth: int = MAX_HISTORY_DEPTH,
    max_values: int = MAX_HISTORY_VALUES,
) -> JSON:
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

    def refuse_constant(name: str) -> None:
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


def history_from_dict(data: object, *, model: str, vocab_size: int) -> list[Turn]:
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
    old_seeds = _old_seeds(data.get("seeds"))
    out: list[Turn] = []
    for i, t in enumerate(turns):
        where = f"turns[{i}]"
        segs = [_segment_from_dict(s, f"{where}.segments[{j}]") for j, s in enumerate(t["segments"])]
        if t["role"] == "user" and not any(not isinstance(s, str) or s.strip() for s in segs):
            raise ValueError(f"{where} is an empty user message (no text, no image); the file was edited")
        tokens = _tokens(t.get("tokens"), t["role"], where, vocab_size)
        if t["role"] == "user":
            out.append(Turn("user", segs))
            continue
        seed, end_reason = t.get("seed", old_seeds.get(i)), t.get("end_reason")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"{where}.seed must be a whole number or null, got {seed!r}")
        if end_reason is not None and not isinstance(end_reason, str):
            raise ValueError(f"{where}.end_reason must be a string or null, got {end_reason!r}")
        out.append(Turn("assistant", segs, tokens if same_model else None, seed, end_reason))
    return out


def _tokens(tokens: object, role: str, where: str, vocab_size: int) -> tuple[int, ...] | None:
    if tokens is None:
        return None
    if not isinstance(tokens, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab_size
        for x in tokens  # pyright: ignore[reportUnknownVariableType]  # JSON: checked here
    ):
        raise ValueError(f"{where}.tokens must be a list of token ids in [0, {vocab_size})")
    if role != "assistant":
        raise ValueError(f"{where}.tokens: only assistant turns carry tokens")
    return tuple(tokens)  # pyright: ignore[reportUnknownArgumentType]


def _old_seeds(seeds: object) -> dict[int, int | None]:
    """The top-level ``"seeds"`` of an export written before each answer held its own (turn number -> seed)."""
    if seeds is None:
        return {}
    try:
        if not isinstance(seeds, Mapping):
            raise TypeError
        return {int(k): (None if v is None else int(v)) for k, v in seeds.items()}  # pyright: ignore
    except (TypeError, ValueError):
        raise ValueError(
            "the saved chat's 'seeds' must map turn numbers to whole numbers; the file was edited or is damaged"
        ) from None


def _check_turns(turns: list[JSONValue]) -> None:
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


def _decision(value: object, where: str) -> Decision | None:
    """``{"p_generate", "p_retrieve"}``, or the ``[p_generate, p_retrieve]`` pair older files hold."""
    if value is None:
        return None
    pair: list[object] = []
    if isinstance(value, Mapping) and set(value) == {"p_generate", "p_retrieve"}:
        pair = [value["p_generate"], value["p_retrieve"]]
    elif isinstance(value, list):
        pair = list(value)  # pyright: ignore[reportUnknownArgumentType]  # JSON: checked below
    if len(pair) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in pair):
        raise ValueError(
            f'{where}.decision must be null or {{"p_generate": p, "p_retrieve": q}}, two probabilities in [0, 1]'
        )
    return Decision(float(pair[0]), float(pair[1]))  # pyright: ignore[reportArgumentType]  # numbers: checked


def _segment_from_dict(s: Mapping[str, JSONValue], where: str) -> str | ImageSegment:  # _check_turns'd
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
    decision = _decision(s.get("decision"), where)
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
        decision,
        s.get("seed"),
    )
