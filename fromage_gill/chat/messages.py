"""Messages in and out: the user's text and attached files as one message for ``Chat.send`` (and a past one with
new text), and a session shown as chat messages.

Shown messages are in the OpenAI-like ``{"role", "content"}`` format that ``gr.Chatbot`` takes: content is a list
of markdown strings and ``{"path": file, "alt_text": ...}`` image entries.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from PIL import Image

from ..generate.limits import MAX_IMAGES_PER_MESSAGE
from ..generate.prompt import ImageSegment
from ..images import ImageError, load_image
from .labels import image_label, plain_text
from .session import ChatSession, LivePart, UserPart

# A message as gr.Chatbot takes it: {"role": "user" | "assistant", "content": markdown}
ChatMessage: TypeAlias = dict[str, str]

IMAGE_PLACEHOLDER = "<image>"  # in a message's text: where the next attached image goes


def build_message(
    text: str | None, files: Sequence[object] | None, *, max_images: int = MAX_IMAGES_PER_MESSAGE
) -> list[str | Image.Image]:
    """The user's text and attached images as one interleaved message for ``Chat.send``.

    Each ``<image>`` in the text marks where the next attached image goes; images without a marker come first (in
    the order attached), as in "look at this: [photo] what is it?". Raises ``ImageError`` / ``ValueError`` with a
    message for the user (not an image, corrupt, too large, too many, empty message).
    """
    text = text or ""
    files = list(files or [])
    if not text.strip() and not files:
        raise ValueError("The message is empty: type some text or attach an image.")
    if len(files) > max_images:
        raise ValueError(
            f"{len(files)} images in one message is more than the limit of {max_images}; "
            f"send at most {max_images} images per message."
        )
    images = [_open_attachment(f) for f in files]
    parts = text.split(IMAGE_PLACEHOLDER)
    n_marked = min(len(parts) - 1, len(images))
    leading = images[: len(images) - n_marked]  # unmarked images go first
    marked = images[len(images) - n_marked :]
    segments: list[str | Image.Image] = list(leading)
    for i, part in enumerate(parts):
        if part.strip():
            segments.append(part.strip())
        if i < len(parts) - 1 and i < len(marked):
            segments.append(marked[i])
    return segments


def edited_message(segments: Sequence[UserPart], text: str, part: int | None = None) -> list[UserPart]:
    """A past user message with new text: ``part`` = the index of the text segment to replace (None: all its text
    becomes ``text``, where the first text was). Images stay where they were. ValueError if nothing is left."""
    segments = list(segments)
    text = text.strip()
    if part is not None:
        if not (0 <= part < len(segments)) or not isinstance(segments[part], str):
            raise ValueError(f"Part {part} of that message is not text.")
        out = segments[:part] + ([text] if text else []) + segments[part + 1 :]
    else:
        first = next((k for k, s in enumerate(segments) if isinstance(s, str)), len(segments))
        out = [s for k, s in enumerate(segments) if not isinstance(s, str) or k == first]
        out = [text if isinstance(s, str) else s for s in out if not isinstance(s, str) or text]
        if first == len(segments) and text:
            out.append(text)
    if not any(not isinstance(s, str) or s.strip() for s in out):
        raise ValueError("The edited message is empty: type some text.")
    return out


def text_of(value: object) -> str:
    """The text of an edited chat message as the chat sends it back (a string, or content parts)."""
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return value.get("text", "") if value.get("type", "text") == "text" else ""
    return str(value or "")


def _open_attachment(f: object) -> Image.Image:
    """A gradio file (path string, ``{"path": ...}`` dict or object with ``.path``) or a PIL image, decoded safely."""
    if isinstance(f, Image.Image):
        return load_image(f)
    path = f.get("path") if isinstance(f, dict) else getattr(f, "path", f)
    name = (f.get("orig_name") if isinstance(f, dict) else None) or Path(str(path)).name
    try:
        return load_image(str(path), name=name)
    except ImageError as e:
        hint = " Attach a PNG, JPEG, GIF or WebP image." if "not a readable image" in str(e) else ""
        raise ImageError(f"Could not use the attachment {e}.{hint}") from None


# ---------------------------------------------------------------------------------------------------------------
# A session shown as chat messages.
# ---------------------------------------------------------------------------------------------------------------


def chatbot_messages(session: ChatSession) -> list[ChatMessage]:
    """What the chat shows: the turns and the live exchange (notes and errors are toasts, not messages).

    A user turn is shown as one chat message per segment (grouped into one bubble by the chat), so that each text
    can be edited on its own: Gradio's message editor only handles single-part messages. An answer is one message:
    one markdown text with its images inline (``![alt](url)``) and their labels, in the order produced. Images are
    links to files, not file entries, so that an update re-sends (and an API client re-downloads) none of the
    history's images: each update costs the same at turn 30 as at turn 1. Records in ``session.message_turns``
    which user text each message shows.
    """
    out: list[ChatMessage] = []
    where: list[tuple[int, int] | None] = []
    history = session.chat.history

    def add_user(segments: Sequence[UserPart], i: int | None) -> None:
        for j, seg in enumerate(segments):
            text = _markdown(session, [seg])
            if text:
                out.append({"role": "user", "content": text})
                where.append((i, j) if i is not None and isinstance(seg, str) else None)

    for i in range(session.shown_turns):
        turn = history[i]
        if turn.role == "user":
            add_user(turn.segments, i)
            continue
        text = _markdown(session, turn.segments)
        mark = END_MARKS.get(turn.end_reason or "")
        if mark:
            text = f"{text} {mark}" if text else mark
        out.append({"role": "assistant", "content": text or EMPTY_ANSWER})
        where.append(None)
    if session.pending_user is not None:
        add_user(session.pending_user, None)
    if session.live is not None:
        out.append({"role": "assistant", "content": _markdown(session, session.live) or "…"})
        where.append(None)
    session.message_turns = where
    return out


EMPTY_ANSWER = "*(no text: the answer ended before its first word)*"  # never a blank bubble
END_MARKS = {
    "stopped": "*(stopped)*",
    "interrupted": "*(interrupted: the app stopped before this answer was complete)*",
}


def image_markdown(url: str, alt: str) -> str:
    """An inline image in a chat message, a link to itself (a click opens it full size, to save from there); the alt
    text cannot break out of its brackets."""
    alt = html.escape(alt.replace("\\", "").replace("[", "(").replace("]", ")").replace("\n", " "), quote=False)
    url = url.replace(" ", "%20").replace(")", "%29")
    return f"[![{alt}]({url})]({url})"


def safe_markdown(text: str) -> str:
    """Text of the conversation (typed, generated, stored or imported) as markdown that cannot add to the page: its
    HTML is escaped (shown as typed, never a live form or script) and its images are shown as typed text, so that
    the chat shows only the app's own images and the browser fetches nothing from another host."""
    return html.escape(text, quote=False).replace("![", "!\\[")


def _markdown(session: ChatSession, segments: Sequence[UserPart | LivePart]) -> str:
    """Segments as one markdown text: texts, images inline with the label under each, a pending image's progress."""
    parts: list[str] = []
    for seg in segments:
        if isinstance(seg, str):
            if seg:
                parts.append(safe_markdown(seg))
        elif isinstance(seg, (Image.Image, ImageSegment)):
            img = seg if isinstance(seg, Image.Image) else seg.image
            label = image_label(seg)
            parts.append(image_markdown(session.image_url(img), plain_text(label) or "image"))
            if label:  # the app's own markup; its caption is escaped by image_label
                parts.append(f'<span class="image-label">{label}</span>')
        else:  # PENDING: an image the engine is still making
            parts.append(session.progress_text())
    return "\n\n".join(parts)
