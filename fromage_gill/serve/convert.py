"""OpenAI shapes <-> the engine's: a chat-completions request -> ``ChatRequest``, and a turn's events -> the
answer (``content`` a string with each image as a markdown link, ``images`` in OpenRouter's shape).

A request is stateless: the conversation travels in ``messages``. An earlier answer the server made is recognised
by its content (``AnswerMemo``: its exact tokens come back) or else by its image links (``/v1/files/<id>.png``: the
image's source and index id come back, so a retrieved image is not shown twice).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..generate.events import ImageResult, Notice, TextDelta, TurnEnd
from ..generate.prompt import ImageSegment, Turn
from ..images import MAX_IMAGE_BYTES
from ..settings import GenerationSettings
from .backend import ChatMessage, ChatRequest, ImageInput, Usage
from .files import AnswerMemo, FileStore
from .schemas import EXTRA_SETTINGS, SETTING_FIELDS, ChatCompletionRequest, ImagePart, TextPart

# A link to one of the server's own files, as ``image_link`` writes it (any host: the client may reach us by another)
FILE_LINK = re.compile(r"\n?!\[[^\]\n]*\]\([^)\s]*?/v1/files/([0-9a-f]{32})\.png\)\n?")
_PLACEHOLDER = Image.new("RGB", (1, 1), (128, 128, 128))  # an earlier answer's picture: the LM never sees it again
_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?((?:;[\w-]+=[\w.-]+)*);base64,", re.ASCII)
FINISH = {"max_new_tokens": "length"}  # every other end is a "stop"


class BadRequest(ValueError):
    """A request the server refuses (400), naming the field (``param``) when there is one."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def build_settings(req: ChatCompletionRequest, config) -> GenerationSettings:
    """The model's defaults (``ModelConfig.generation``) with the request's fields on top. ``stop`` adds to the
    dialogue's own stop strings (without them the model would answer the next question too)."""
    over: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", *EXTRA_SETTINGS):
        if getattr(req, name, None) is not None:
            over[name] = getattr(req, name)
    if req.steps is not None:
        over["num_inference_steps"] = req.steps
    tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if tokens is not None:
        over["max_new_tokens"] = tokens
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        over["stop_strings"] = (*config.dialogue.stop_strings, *stops)
    try:
        return GenerationSettings.for_model(config, **over)
    except ValueError as e:
        m = re.match(r"GenerationSettings\.(\w+)=", str(e))
        name = m.group(1) if m else None
        message = str(e).replace("GenerationSettings.", "", 1)
        param = SETTING_FIELDS.get(name, name) if name else None
        if param and name and param != name:
            message = f"{param}: {message}"
        raise BadRequest(message, param=param) from None


def to_chat_request(
    req: ChatCompletionRequest, config, *, memo: AnswerMemo, store: FileStore, fetch_urls: bool
) -> ChatRequest:
    """Refuse what is malformed (400 naming the field) and build the engine's request; images stay undecoded."""
    settings = build_settings(req, config)
    system: list[str] = []
    messages: list[ChatMessage] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):  # the model has no system prompt: its text leads the first question
            system.append(_text_only(m.content, where))
            continue
        if m.role == "assistant":
            msg = _answer(_text_only(m.content, where), memo, store)
        else:
            msg = ChatMessage("user", _user_parts(m.content, where, fetch_urls))
        if messages and messages[-1].role == msg.role == "user":  # two user messages in a row read as one
            msg = ChatMessage("user", (*messages.pop().parts, "\n", *msg.parts))
        messages.append(msg)
    if system and messages and messages[0].role == "user":
        messages[0] = ChatMessage("user", ("\n".join(system) + "\n", *messages[0].parts))
    try:
        return ChatRequest(tuple(messages), settings, index=req.index)
    except ValueError as e:
        raise BadRequest(str(e), param="messages") from None


def _text_only(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(isinstance(p, ImagePart) for p in content):
        raise BadRequest(f"{where}: only user messages may hold images", param=f"{where}.content")
    return "".join(p.text for p in content if isinstance(p, TextPart))


def _user_parts(content, where: str, fetch_urls: bool) -> tuple[str | ImageInput, ...]:
    if content is None or isinstance(content, str):
        return (content or "",)
    parts: list[str | ImageInput] = []
    for j, p in enumerate(content):
        if isinstance(p, TextPart):
            parts.append(p.text)
        else:
            parts.append(image_input(p.image_url.url, f"{where}.content[{j}].image_url", fetch_urls))
    return tuple(parts)


def image_input(url: str, name: str, fetch_urls: bool) -> ImageInput:
    """A data URL's bytes (base64, at most ``images.MAX_IMAGE_BYTES``), or an http(s) URL to fetch later."""
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None:
            raise BadRequest(
                f"{name}: a data URL must read data:image/<type>;base64,<data> (e.g. data:image/png;base64,...)",
                param=name,
            )
        payload = url[m.end() :]
        if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
            raise BadRequest(
                f"{name}: about {len(payload) * 3 // 4:,} bytes, more than the {MAX_IMAGE_BYTES:,}-byte limit for an "
                f"image",
                param=name,
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{name}: the data URL's payload is not valid base64", param=name) from None
        if not data:
            raise BadRequest(f"{name}: the image is empty (0 bytes)", param=name)
        return ImageInput(name, data=data)
    if url.startswith(("http://", "https://")):
        if not fetch_urls:
            raise BadRequest(
                f"{name}: this server does not fetch image URLs (started with --no-fetch); send a data URL",
                param=name,
            )
        return ImageInput(name, url=url)
    raise BadRequest(
        f"{name}: an image URL must be a data URL (data:image/png;base64,...) or http(s); got {url[:40]!r}",
        param=name,
    )


def _answer(content: str, memo: AnswerMemo, store: FileStore) -> ChatMessage:
    """An earlier answer: its exact turn when the server made it recently, else its text with its image links."""
    turn = memo.get(content)
    if turn is not None:
        return ChatMessage("assistant", tuple(turn.segments), turn.tokens)
    parts: list[str | ImageSegment] = []
    at = 0
    for m in FILE_LINK.finditer(content):
        parts.append(content[at : m.start()])
        stored = store.get(m.group(1))
        parts.append(
            ImageSegment(_PLACEHOLDER, source="generated", key="answer-image")
            if stored is None or stored.source not in ("retrieved", "generated")
            else ImageSegment(
                _PLACEHOLDER, stored.source, caption=stored.caption, index_id=stored.index_id, key="answer-image"
            )
        )
        at = m.end()
    parts.append(content[at:])
    return ChatMessage("assistant", tuple(p for p in parts if p != ""))


# ---------------------------------------------------------------------------------------------- the answer


@dataclass
class Answer:
    """A turn's answer as it streams: the content string, the images (OpenRouter shape) and the exact turn."""

    content: str = ""
    images: list[dict] = field(default_factory=list)
    segments: list[str | ImageSegment] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    seed: int | None = None

    def add_text(self, ev: TextDelta) -> str:
        self.content += ev.text
        self.segments.append(ev.text)
        return ev.text

    def add_image(self, ev: ImageResult, store: FileStore, file_url: Callable[[str], str]) -> tuple[str, dict]:
        """(markdown link, image entry) for a new image, stored and linked (``file_url``: id -> its address)."""
        file_id, png = store.put(ev)
        url = file_url(file_id)
        alt = f"image {len(self.images) + 1}" + (f": {ev.caption}" if ev.caption else "")
        alt = alt.replace("]", ")").replace("[", "(").replace("\n", " ")
        link = f"\n![{alt}]({url})\n"
        entry = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode("ascii")},
            "fromage_gill": {
                "source": ev.source,
                "caption": ev.caption,
                "score": ev.score,
                "decision": (
                    {"p_generate": ev.decision[0], "p_retrieve": ev.decision[1]} if ev.decision is not None else None
                ),
                "file": url,
                "index_id": ev.index_id,
                "seed": ev.seed,
            },
        }
        self.content += link
        self.images.append(entry)
        self.segments.append(dataclasses.replace(ev, image=_PLACEHOLDER, key="answer-image"))
        return link, entry

    def end(self, ev: TurnEnd) -> str:
        self.finish_reason = FINISH.get(ev.reason, "stop")
        self.seed = ev.seed
        return self.finish_reason

    def note(self, ev: Notice) -> None:
        self.notices.append(ev.text)

    def remember(self, memo: AnswerMemo, tokens: tuple[int, ...] | None) -> None:
        memo.put(self.content, Turn("assistant", [s for s in self.segments if s != ""], tokens))

    def usage_dict(self) -> Mapping[str, int] | None:
        if self.usage is None:
            return None
        p, c = self.usage.prompt_tokens, self.usage.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
