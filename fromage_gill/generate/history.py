"""A conversation's history as JSON: text, images as base64 PNG with their metadata, and each answer's tokens
(``Chat.to_dict`` / ``Chat.from_dict``). Reading is as strict as live input: every field is checked."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

from ..images import load_image
from .prompt import ImageSegment, Turn

FORMAT, VERSION = "fromage_gill.chat", 1


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


def history_from_dict(data: Mapping, *, model: str, vocab_size: int) -> list[Turn]:
    """The turns of ``history_to_dict`` output; raises ``ValueError`` saying what is wrong. Token ids are kept only
    when ``data`` was saved by ``model`` (another model's tokens mean nothing here: its answers are re-encoded)."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f'not a saved chat: expected an object with "format": "{FORMAT}"')
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported chat version {data.get('version')!r}; this version reads version {VERSION}")
    turns = data.get("turns")
    if not isinstance(turns, list):
        raise ValueError("chat 'turns' must be a list")
    same_model = data.get("model") == model
    out: list[Turn] = []
    for i, t in enumerate(turns):
        where = f"turns[{i}]"
        if not isinstance(t, Mapping) or t.get("role") not in ("user", "assistant"):
            raise ValueError(f"{where} must be an object with role 'user' or 'assistant'")
        if not isinstance(t.get("segments"), list):
            raise ValueError(f"{where}.segments must be a list")
        segs = [_segment_from_dict(s, f"{where}.segments[{j}]") for j, s in enumerate(t["segments"])]
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


def _segment_from_dict(s, where: str) -> str | ImageSegment:
    if not isinstance(s, Mapping) or s.get("type") not in ("text", "image"):
        raise ValueError(f"{where} must be an object with type 'text' or 'image'")
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
    image = load_image(data, name=where)
    decision = s.get("decision")
    if decision is not None and (
        not isinstance(decision, list) or len(decision) != 2 or not all(isinstance(x, (int, float)) for x in decision)
    ):
        raise ValueError(f"{where}.decision must be null or [p_generate, p_retrieve]")
    for name, types in (("score", (int, float)), ("caption", str), ("url", str), ("index_id", int), ("seed", int)):
        v = s.get(name)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise ValueError(f"{where}.{name} has the wrong type: {type(v).__name__}")
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
