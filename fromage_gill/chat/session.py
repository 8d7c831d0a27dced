"""The chat app's logic without gradio: one browser session's conversation, the model gate (a FIFO queue in front of
the model that can say how many are ahead), labels for images, and export / import of conversations.

``app.py`` turns this into a Gradio UI; everything here is plain Python so it imports (and is tested) without gradio.
A conversation is shown as a list of chat messages in the OpenAI-like ``{"role", "content"}`` format that
``gr.Chatbot`` takes: content is a list of markdown strings and ``{"path": file, "alt_text": ...}`` image entries.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import html
import io
import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import ImageError, image_hash, load_image

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "fromage_gill.chat"
EXPORT_VERSION = 1
MAX_IMAGES_PER_MESSAGE = 8  # each image costs n_visual_tokens of context; more than this is almost surely a mistake
MAX_EXPORT_BYTES = 200 * 1024 * 1024
MIN_SHOWN_PX = 192  # smaller images are shown enlarged (pixelated); exports keep the original
IMAGE_PLACEHOLDER = "<image>"  # in a message's text: where the next attached image goes

# One line per setting, shown under its control in the app.
SETTINGS_HELP: dict[str, str] = {
    "mode": "auto: the model decides when to show an image and whether to retrieve or generate it; "
            "retrieve / generate: always that source; text: never an image.",
    "max_new_tokens": "Upper bound on the length of each answer (in tokens).",
    "temperature": "0 = always the most likely token (deterministic); higher = more varied.",
    "top_p": "Sample only from the most likely tokens whose probabilities add up to this (1 = all).",
    "image_frequency": "Scales the logits of the image tokens: above 1 shows images more often, below 1 less.",
    "image_logit_bias": "Added to the image token's score: positive shows images sooner, negative later or never.",
    "max_images": "At most this many images in one answer.",
    "retrieval_candidates": "How many nearest images the index returns; the best one not yet shown is used.",
    "guidance_scale": "Classifier-free guidance of Stable Diffusion: higher follows the model's prompt more closely.",
    "num_inference_steps": "Diffusion denoising steps: fewer is faster and rougher.",
    "seed": "Fixes sampling and image generation so a turn can be reproduced; 'random' picks a new seed each turn.",
    "index": "The image collection that retrieved images come from.",
    "decoding": "default: plain sampling; magic / contrastive: MAGIC decoding, steering text towards the images.",
}


class ChatExportError(ValueError):
    """A conversation export that cannot be loaded; the message says what is wrong with it."""


# ---------------------------------------------------------------------------------------------------------------
# The model gate: FIFO admission to the model, with the number of requests ahead of each waiting one.
# ---------------------------------------------------------------------------------------------------------------


class ModelGate:
    """At most ``slots`` turns use the model at once; the others wait in arrival order and can ask how many are
    ahead of them (to tell the user "busy, N ahead of you"). Tickets are released in ``finally`` blocks, so a
    closed browser tab (its generator closed) never blocks the queue."""

    def __init__(self, slots: int = 1):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: deque[int] = deque()
        self._active: set[int] = set()
        self._next = 0

    def join(self) -> int:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._waiting.append(ticket)
            self._admit()
            return ticket

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.slots:
            self._active.add(self._waiting.popleft())
        self._cond.notify_all()

    def wait(self, ticket: int, timeout: float) -> bool:
        """True once ``ticket`` may use the model; False if still waiting after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: ticket in self._active, timeout=timeout)

    def ahead(self, ticket: int) -> int:
        """How many requests are running or queued before ``ticket`` (0 once it runs)."""
        with self._cond:
            if ticket in self._active:
                return 0
            try:
                return len(self._active) + self._waiting.index(ticket)
            except ValueError:
                return 0

    def leave(self, ticket: int) -> None:
        with self._cond:
            self._active.discard(ticket)
            with contextlib.suppress(ValueError):  # not waiting: it was running
                self._waiting.remove(ticket)
            self._admit()

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self._active) + len(self._waiting)


# ---------------------------------------------------------------------------------------------------------------
# Messages in, labels out.
# ---------------------------------------------------------------------------------------------------------------


def build_message(text: str | None, files: Sequence[Any] | None, *,
                  max_images: int = MAX_IMAGES_PER_MESSAGE) -> list[str | Image.Image]:
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
        raise ValueError(f"{len(files)} images in one message is more than the limit of {max_images}; "
                         f"send at most {max_images} images per message.")
    images = [_open_attachment(f) for f in files]
    parts = text.split(IMAGE_PLACEHOLDER)
    n_marked = min(len(parts) - 1, len(images))
    leading = images[: len(images) - n_marked]  # unmarked images go first
    marked = images[len(images) - n_marked:]
    segments: list[str | Image.Image] = list(leading)
    for i, part in enumerate(parts):
        if part.strip():
            segments.append(part.strip())
        if i < len(parts) - 1 and i < len(marked):
            segments.append(marked[i])
    return segments


def edited_message(segments: Sequence[Any], text: str, part: int | None = None) -> list[Any]:
    """A past user message with new text: ``part`` = the index of the text segment to replace (None: all its text
    becomes ``text``, where the first text was). Images stay where they were. ValueError if nothing is left."""
    segments = list(segments)
    text = text.strip()
    if part is not None:
        if not (0 <= part < len(segments)) or not isinstance(segments[part], str):
            raise ValueError(f"Part {part} of that message is not text.")
        out = segments[:part] + ([text] if text else []) + segments[part + 1:]
    else:
        first = next((k for k, s in enumerate(segments) if isinstance(s, str)), len(segments))
        out = [s for k, s in enumerate(segments) if not isinstance(s, str) or k == first]
        out = [text if isinstance(s, str) else s for s in out if not isinstance(s, str) or text]
        if first == len(segments) and text:
            out.append(text)
    if not any(not isinstance(s, str) or s.strip() for s in out):
        raise ValueError("The edited message is empty: type some text.")
    return out


def _open_attachment(f: Any) -> Image.Image:
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


def image_label(seg: Any) -> str:
    """The markdown line under an image in the answer: where it came from, and the detail line."""
    source = getattr(seg, "source", None)
    if source == "retrieved":
        score = getattr(seg, "score", None)
        head = "**Retrieved**" + (f" (score {score:.3f})" if score is not None else "")
        caption = getattr(seg, "caption", None)
        url = getattr(seg, "url", None)
        if caption:
            head += f" · {_md_escape(caption)}"
        if url and url.startswith(("http://", "https://")):
            head += f" · [source]({url})"
    elif source == "generated":
        seed = getattr(seg, "seed", None)
        head = "**Generated**" + (f" (seed {seed})" if seed is not None else "")
    else:
        return ""
    decision = getattr(seg, "decision", None)
    if decision is not None:
        p_gen, p_ret = decision
        head += f"  \n<small>decision: p(generate) = {p_gen:.2f}, p(retrieve) = {p_ret:.2f}</small>"
    return head


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


# ---------------------------------------------------------------------------------------------------------------
# One browser session.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Note:
    """A message shown in the chat that is not part of the conversation (errors, the engine's notices)."""

    text: str
    after_turns: int  # shown after this many turns of history
    kind: str = "info"  # "info" | "error"


@dataclass
class ChatSession:
    """One browser tab's conversation: the engine's ``Chat``, the settings last used, and what is shown.

    Images shown in the chat are written (once, named by content hash) to a private directory that ``close()``
    deletes; gradio copies them into its own cache, which the app expires.
    """

    chat: Any  # fromage_gill.generate.Chat
    settings: Any = None  # the GenerationSettings of the last turn
    index_name: str | None = None  # the image index this chat retrieves from
    notes: list[Note] = field(default_factory=list)
    seeds: dict[int, int | None] = field(default_factory=dict)  # assistant turn index -> the seed that produced it
    reasons: dict[int, str] = field(default_factory=dict)  # assistant turn index -> why it ended (TurnEnd.reason)
    live: list[Any] | None = None  # the assistant turn being streamed: segments (str | ImageResult | PENDING)
    pending_user: list[Any] | None = None  # the user message of the turn being streamed
    stop_requested: bool = False
    image_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fromage_gill_chat_")))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    _shown_turns: int | None = None  # while streaming: how many history turns precede the live exchange
    _message_turns: list[tuple[int, int] | None] = field(default_factory=list)  # message -> (turn, segment)
    _turn_end: Any = None  # the TurnEnd event, until the answer is in the history

    _turn_lock: threading.Lock = field(default_factory=threading.Lock)  # one turn at a time per session

    @property
    def running(self) -> bool:
        return self._shown_turns is not None or self._turn_lock.locked()

    def exclusive(self, turn: Callable[[], Iterator[Any]], refused: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """Run the generator ``turn()`` unless another turn of this session runs (e.g. a double submit): then
        ``refused()``. The claim is released when the generator ends or is closed."""
        if not self._turn_lock.acquire(blocking=False):
            yield from refused()
            return
        try:
            yield from turn()
        finally:
            self._turn_lock.release()

    def start_streaming(self, pending_user: list[Any] | None, shown_turns: int | None = None) -> None:
        """Show the first ``shown_turns`` turns of history (default: all), then ``pending_user`` (None: regenerating
        the last answer), then the live answer, until ``end_streaming``; the engine updates its history meanwhile."""
        n = len(self.chat.history) if shown_turns is None else shown_turns
        if shown_turns is None and pending_user is None and n and self.chat.history[-1].role == "assistant":
            n -= 1  # regenerate replaces the last answer
        self._shown_turns = n
        self.pending_user = pending_user
        self.live = []

    def end_streaming(self) -> None:
        history = self.chat.history
        if self._turn_end is not None and history and history[-1].role == "assistant":
            n = len(history) - 1  # the engine adds the answer to its history after yielding TurnEnd
            self.seeds[n] = getattr(self._turn_end, "seed", None)
            self.reasons[n] = getattr(self._turn_end, "reason", "")
        self._turn_end = None
        self._shown_turns = None
        self.pending_user = None
        self.live = None
        self.stop_requested = False

    def stop(self) -> None:
        """End the running turn; what streamed so far stays (the engine keeps it as the answer)."""
        if self.running:
            self.stop_requested = True
            self.chat.stop()

    def close(self) -> None:
        shutil.rmtree(self.image_dir, ignore_errors=True)

    def note(self, text: str, kind: str = "info") -> None:
        after = self._shown_turns if self._shown_turns is not None else len(self.chat.history)
        self.notes.append(Note(text, after, kind))

    def clear_errors(self) -> None:
        n = len(self.chat.history)
        self.notes = [note for note in self.notes if note.kind != "error" and note.after_turns <= n]

    def image_path(self, img: Image.Image) -> str:
        path = self.image_dir / f"{image_hash(img)}.png"
        if not path.exists():
            self.image_dir.mkdir(parents=True, exist_ok=True)
            if max(img.size) < MIN_SHOWN_PX:  # a tiny model's 64-px image would be a speck in the chat
                scale = MIN_SHOWN_PX // max(img.size) + 1
                img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
            img.save(path)
        return str(path)

    def turn_of_message(self, message_index: int) -> tuple[int, int] | None:
        """(turn index, segment index) of the user text shown as chatbot message ``message_index``, else None."""
        if 0 <= message_index < len(self._message_turns):
            return self._message_turns[message_index]
        return None

    def messages(self) -> list[dict[str, Any]]:
        """What ``gr.Chatbot`` shows: the turns, the notes where they happened, the live exchange.

        A user turn is shown as one chatbot message per segment (grouped into one bubble by the Chatbot), so that
        each text can be edited on its own: Gradio's message editor only handles single-part messages. An
        answer is one message of text, images and their labels, in order.
        """
        out: list[dict[str, Any]] = []
        where: list[tuple[int, int] | None] = []
        history = self.chat.history
        shown = len(history) if self._shown_turns is None else min(self._shown_turns, len(history))
        # Notes about turns that are gone (undone, edited away) go with them.
        self.notes = [n for n in self.notes if n.after_turns <= shown]
        notes = sorted((n for n in self.notes if n.kind != "error"), key=lambda n: n.after_turns)
        errors = [n for n in self.notes if n.kind == "error"]  # the answer to the last action: shown last
        k = 0

        def add(role: str, content: list[Any], at: tuple[int, int] | None = None) -> None:
            out.append({"role": role, "content": content})
            where.append(at)

        def add_user(segments: Sequence[Any], i: int | None) -> None:
            for j, seg in enumerate(segments):
                content = self._content([seg])
                if content:
                    add("user", content, (i, j) if i is not None and isinstance(seg, str) else None)

        for i in range(shown):
            while k < len(notes) and notes[k].after_turns <= i:
                add("assistant", self._note_content(notes[k]))
                k += 1
            turn = history[i]
            if turn.role == "user":
                add_user(turn.segments, i)
                continue
            content = self._content(turn.segments)
            if self.reasons.get(i) == "stopped":
                if content and isinstance(content[-1], str):
                    content[-1] += " *(stopped)*"
                else:
                    content.append("*(stopped)*")
            add("assistant", content or [" "])
        while k < len(notes) and notes[k].after_turns <= shown:
            add("assistant", self._note_content(notes[k]))
            k += 1
        if self.pending_user is not None:
            add_user(self.pending_user, None)
        if self.live is not None:
            add("assistant", self._content(self.live) or ["…"])
        for note in notes[k:] + errors:
            add("assistant", self._note_content(note))
        self._message_turns = where
        return out

    def _note_content(self, note: Note) -> list[str]:
        prefix = "**Error:** " if note.kind == "error" else "*Note:* "
        return [prefix + note.text]

    def _content(self, segments: Sequence[Any]) -> list[Any]:
        content: list[Any] = []
        for seg in segments:
            if isinstance(seg, str):
                if seg:
                    content.append(seg)
            elif seg is PENDING:
                content.append("*(making an image…)*")
            else:
                img = seg if isinstance(seg, Image.Image) else getattr(seg, "image", None)
                if img is None:
                    continue
                label = image_label(seg)
                content.append({"path": self.image_path(img), "alt_text": _plain(label) or "image"})
                if label:
                    content.append(label)
        return content

    def summary(self) -> dict[str, Any]:
        """The conversation as plain data (the API's ``/history``): per turn its role, text and image labels."""
        turns = []
        for turn in self.chat.history:
            segs = []
            for seg in turn.segments:
                if isinstance(seg, str):
                    segs.append({"text": seg})
                else:
                    segs.append({"image": _plain(image_label(seg)) or "image",
                                 "source": getattr(seg, "source", None) or "user"})
            turns.append({"role": turn.role, "segments": segs})
        n = len(self.chat.history)
        return {"turns": turns, "seeds": {str(k): v for k, v in self.seeds.items() if k < n},
                "end_reasons": {str(k): v for k, v in self.reasons.items() if k < n},
                "settings": settings_dict(self.settings), "notes": [n.text for n in self.notes]}

    # -- the live (streaming) assistant turn ------------------------------------------------------------------

    def apply(self, event: Any) -> None:
        """Fold one engine event into the live turn shown while streaming."""
        kind = type(event).__name__
        if self.live is None:
            self.live = []
        if kind == "TextDelta":
            if self.live and isinstance(self.live[-1], str):
                self.live[-1] += event.text
            else:
                self.live.append(event.text)
        elif kind == "ImagePending":
            self.live.append(PENDING)
        elif kind == "ImageResult":
            for i in range(len(self.live) - 1, -1, -1):
                if self.live[i] is PENDING:
                    self.live[i] = event
                    break
            else:
                self.live.append(event)
        elif kind == "Notice":
            self.note(event.text)
        elif kind == "TurnEnd":
            self._turn_end = event


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()


def _plain(markdown: str) -> str:
    return re.sub(r"<[^>]+>|\*\*|\\", "", markdown).replace("  \n", " — ")


# ---------------------------------------------------------------------------------------------------------------
# Export and import.
# ---------------------------------------------------------------------------------------------------------------


def settings_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings) if settings is not None else {}


def export_json(session: ChatSession, *, model_name: str) -> dict[str, Any]:
    """Everything needed to continue the chat elsewhere: the engine's saved chat (``Chat.to_dict``: text, images as
    PNG, their labels, each answer's tokens) plus the settings last used and the seed of each answer."""
    data = session.chat.to_dict()
    data.update({
        "model": model_name,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings_dict(session.settings),
        "seeds": {str(k): v for k, v in session.seeds.items() if k < len(session.chat.history)},
    })
    return data


def read_export(source: str | Path | bytes) -> dict[str, Any]:
    """Parse a JSON export and check what the app adds to the engine's saved chat (``Chat.from_dict`` checks the
    turns); ``ChatExportError`` says what is wrong. ``settings`` and ``seeds`` come back as dicts (``seeds`` keyed
    by turn number)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise ChatExportError(f"{path.name} is larger than {MAX_EXPORT_BYTES // 2**20} MB; not a chat export")
        source = path.read_bytes()
    try:
        data = json.loads(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatExportError(f"the file is not valid JSON ({e}); load a file saved with 'Export JSON'") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ChatExportError(f"the file is not a fromage_gill chat export (its \"format\" must be "
                              f"{EXPORT_FORMAT!r}); load a file saved with 'Export JSON'")
    if data.get("version") != EXPORT_VERSION:
        raise ChatExportError(f"unsupported export version {data.get('version')!r}; this app reads version "
                              f"{EXPORT_VERSION}")
    for key in ("settings", "seeds"):
        data.setdefault(key, {})
        if not isinstance(data[key], dict):
            raise ChatExportError(f"the export's {key!r} must be a JSON object; the file was edited or is damaged")
    try:
        data["seeds"] = {int(k): (None if v is None else int(v)) for k, v in data["seeds"].items()}
    except (TypeError, ValueError):
        raise ChatExportError("the export's 'seeds' must map turn numbers to whole numbers; the file was edited or "
                              "is damaged") from None
    return data


def export_html(session: ChatSession, *, model_name: str, title: str = "fromage_gill conversation") -> str:
    """A self-contained HTML page of the conversation: images embedded as data URIs, labels, settings and seeds."""
    rows = []
    for i, turn in enumerate(session.chat.history):
        parts = []
        for seg in turn.segments:
            if isinstance(seg, str):
                parts.append(f"<p>{html.escape(seg).replace(chr(10), '<br>')}</p>")
                continue
            img = seg if isinstance(seg, Image.Image) else getattr(seg, "image", None)
            if img is None:
                continue
            label = _plain(image_label(seg))
            parts.append(f'<figure><img src="{_data_uri(img)}" alt="{html.escape(label or "image")}">'
                         + (f"<figcaption>{_html_label(seg)}</figcaption>" if label else "") + "</figure>")
        seed = f'<div class="seed">seed {session.seeds[i]}</div>' if session.seeds.get(i) is not None else ""
        rows.append(f'<div class="msg {html.escape(turn.role)}"><div class="role">{html.escape(turn.role)}</div>'
                    f'{"".join(parts)}{seed}</div>')
    settings = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in settings_dict(session.settings).items())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; padding: 0 1em; color: #222; }}
.msg {{ border-radius: 12px; padding: .6em 1em; margin: .8em 0; }}
.user {{ background: #eef3ff; margin-left: 15%; }} .assistant {{ background: #f6f6f6; margin-right: 15%; }}
.role {{ font-size: .75em; text-transform: uppercase; color: #777; }}
img {{ max-width: 100%; max-height: 320px; border-radius: 6px; }} figure {{ margin: .5em 0; }}
figcaption, .seed {{ font-size: .8em; color: #555; }} table {{ font-size: .8em; border-collapse: collapse; }}
td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Model <code>{html.escape(model_name)}</code> · exported {when}</p>
{"".join(rows)}
<details><summary>Settings</summary><table>{settings}</table></details>
</body></html>
"""


def _html_label(seg: Any) -> str:
    source = getattr(seg, "source", None)
    if source == "retrieved":
        score = getattr(seg, "score", None)
        text = "<b>Retrieved</b>" + (f" (score {score:.3f})" if score is not None else "")
        if getattr(seg, "caption", None):
            text += f" · {html.escape(seg.caption)}"
        if (getattr(seg, "url", None) or "").startswith(("http://", "https://")):
            text += f' · <a href="{html.escape(seg.url, quote=True)}">source</a>'
    else:
        seed = getattr(seg, "seed", None)
        text = "<b>Generated</b>" + (f" (seed {seed})" if seed is not None else "")
    decision = getattr(seg, "decision", None)
    if decision is not None:
        text += f"<br>decision: p(generate) = {decision[0]:.2f}, p(retrieve) = {decision[1]:.2f}"
    return text


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def iter_images(messages: Sequence[dict[str, Any]]) -> Iterator[str]:
    """The image paths in rendered messages (for tests and the API's users)."""
    for m in messages:
        for c in m["content"]:
            if isinstance(c, dict) and "path" in c:
                yield c["path"]
