"""One browser tab's conversation: the engine's ``Chat``, the settings last used, the notes shown among its turns,
and the answer being streamed (folded from the engine's events). A turn's facts (its seed, why it ended) live on
the engine's ``Turn``, not here."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image

from ..generate import Chat, Event, GenerationSettings, ImagePending, ImageResult, Notice, TextDelta, TurnEnd
from ..generate.events import ImageProgress
from ..generate.history import JSON
from ..generate.prompt import ImageSegment
from ..images import image_hash
from .labels import image_label, plain_text

MIN_SHOWN_PX = 192  # smaller images are shown enlarged (pixelated); exports keep the original
QUEUED_WAIT_S = 600.0  # how long a message sent during an answer waits for it to end
FILE_URL = "/gradio_api/file="
T = TypeVar("T")  # how the app serves a file under its allowed paths (ChatHandlers.image_root)


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()  # in the live answer: an image the engine is still making
UserPart = str | Image.Image | ImageSegment  # a message as sent (chat.messages.build_message) or as kept
LivePart = str | ImageSegment | _Pending  # what the answer being streamed holds (ImageResult is an ImageSegment)


@dataclass(frozen=True)
class Note:
    """A notice that is not part of the conversation (an error, the engine's notices): shown once as a toast by the
    app, never as a chat message."""

    text: str
    kind: str = "info"  # "info" | "error"

    def __post_init__(self) -> None:
        if self.kind not in ("info", "error"):
            raise ValueError(f"a note's kind must be 'info' or 'error', got {self.kind!r}")


@dataclass
class ChatSession:
    """One browser tab's conversation: the engine's ``Chat``, the settings last used, and what is shown.

    Images shown in the chat are written (once, named by content hash) to a private directory that ``close()``
    deletes; gradio copies them into its own cache, which the app expires.
    """

    chat: Chat
    settings: GenerationSettings | None = None  # those of the last turn
    index_name: str | None = None  # the image index this chat retrieves from
    notes: list[Note] = field(default_factory=list)  # not yet shown (Reply.notes drains them)
    log: list[str] = field(default_factory=list)  # every note's text, for the API's /history (the last 50)
    live: list[LivePart] | None = None  # the assistant turn being streamed
    pending_user: list[UserPart] | None = None  # the user message of the turn being streamed
    progress: tuple[int, int] | None = None  # (step, total) of the image being generated
    image_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fromage_gill_chat_")))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str | None = None  # the browser it belongs to (its conversations are stored); None: not stored (API)
    conversation: str = field(default_factory=lambda: uuid.uuid4().hex)  # its id in the store
    # The chatbot messages last shown (messages.chatbot_messages): message -> (turn, segment) of a user text
    message_turns: list[tuple[int, int] | None] = field(default_factory=list)
    _shown_turns: int | None = None  # while streaming: how many history turns precede the live exchange
    # One turn at a time per session (a double submit waits or is refused); the model's slots are the gate's, and
    # stopping a turn is its Chat's one stop flag
    _one_turn: threading.Lock = field(default_factory=threading.Lock)

    @property
    def running(self) -> bool:
        return self._shown_turns is not None or self._one_turn.locked()

    @property
    def streaming(self) -> bool:
        """A turn of this session is queued for the model or being answered (between start and end_streaming)."""
        return self._shown_turns is not None

    @property
    def shown_turns(self) -> int:
        """How many turns of the history are shown as such: all of them, or while streaming those before the live
        exchange (the engine updates its history meanwhile)."""
        n = len(self.chat.history)
        return n if self._shown_turns is None else min(self._shown_turns, n)

    def exclusive(
        self, turn: Callable[[], Iterator[T]], refused: Callable[[], Iterator[T]], *, wait: bool = False
    ) -> Iterator[T]:
        """Run the generator ``turn()`` unless another turn of this session runs (e.g. a double submit): then
        ``refused()``, or with ``wait`` once that turn ends (at most ``QUEUED_WAIT_S``). The claim is released when
        the generator ends or is closed."""
        if not self._one_turn.acquire(blocking=wait, timeout=QUEUED_WAIT_S if wait else -1):
            yield from refused()
            return
        try:
            yield from turn()
        finally:
            self._one_turn.release()

    def start_streaming(self, pending_user: Sequence[UserPart] | None, shown_turns: int | None = None) -> None:
        """Show the first ``shown_turns`` turns of history (default: all), then ``pending_user`` (None: regenerating
        the last answer), then the live answer, until ``end_streaming``; the engine updates its history meanwhile."""
        n = len(self.chat.history) if shown_turns is None else shown_turns
        if shown_turns is None and pending_user is None and n and self.chat.history[-1].role == "assistant":
            n -= 1  # regenerate replaces the last answer
        self._shown_turns = n
        self.pending_user = list(pending_user) if pending_user is not None else None
        self.live = []

    def end_streaming(self) -> None:
        self._shown_turns = None
        self.pending_user = None
        self.live = None
        self.progress = None

    def stop(self) -> None:
        """End the running turn (or withdraw it while it waits for the model); what streamed so far stays (the
        engine keeps it as the answer)."""
        if self.running:
            self.chat.stop()

    def close(self) -> None:
        shutil.rmtree(self.image_dir, ignore_errors=True)

    def note(self, text: str, kind: str = "info") -> None:
        self.notes.append(Note(text, kind))
        self.log = [*self.log[-49:], text]

    def take_notes(self) -> list[Note]:
        """The notes not shown yet (each is shown once)."""
        notes, self.notes = self.notes, []
        return notes

    def image_path(self, img: Image.Image) -> str:
        path = self.image_dir / f"{image_hash(img)}.png"
        if not path.exists():
            self.image_dir.mkdir(parents=True, exist_ok=True)
            if max(img.size) < MIN_SHOWN_PX:  # a tiny model's 64-px image would be a speck in the chat
                scale = MIN_SHOWN_PX // max(img.size) + 1
                img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
            img.save(path)
        return str(path)

    def image_url(self, img: Image.Image) -> str:
        return FILE_URL + self.image_path(img)

    def progress_text(self) -> str:
        """The pending image's line in the live answer: a progress bar with the step count once diffusion runs."""
        if self.progress is None:
            return "*(finding an image…)*"
        step, steps = self.progress
        done = round(10 * step / max(steps, 1))
        return f"*(generating an image: step {step}/{steps})* `{'█' * done}{'░' * (10 - done)}`"

    def turn_of_message(self, message_index: int) -> tuple[int, int] | None:
        """(turn index, segment index) of the user text shown as chatbot message ``message_index``, else None."""
        if 0 <= message_index < len(self.message_turns):
            return self.message_turns[message_index]
        return None

    def summary(self) -> JSON:
        """The conversation as plain data (the API's ``/history``): per turn its role, text and image labels; the
        seed and end reason of each answer, by turn number."""
        turns: list[JSON] = []
        for turn in self.chat.history:
            segs = [
                {"text": seg}
                if isinstance(seg, str)
                else {"image": plain_text(image_label(seg)) or "image", "source": seg.source}
                for seg in turn.segments
            ]
            turns.append({"role": turn.role, "segments": segs})
        answers = [(str(i), t) for i, t in enumerate(self.chat.history) if t.role == "assistant"]
        return {
            "turns": turns,
            "seeds": {i: t.seed for i, t in answers if t.seed is not None},
            "end_reasons": {i: t.end_reason for i, t in answers if t.end_reason is not None},
            "settings": settings_dict(self.settings),
            "notes": list(self.log),
        }

    def apply(self, event: Event) -> None:
        """Fold one engine event into the live turn shown while streaming (a turn's end needs nothing: the engine
        keeps its facts on the answer's ``Turn``)."""
        if self.live is None:
            self.live = []
        match event:
            case TextDelta(text=text):
                if self.live and isinstance(self.live[-1], str):
                    self.live[-1] += text
                else:
                    self.live.append(text)
            case ImagePending():
                self.progress = None
                self.live.append(PENDING)
            case ImageProgress(step=step, total=total):
                self.progress = (step, total)
            case ImageResult():
                self.progress = None
                for i in range(len(self.live) - 1, -1, -1):
                    if self.live[i] is PENDING:
                        self.live[i] = event
                        break
                else:
                    self.live.append(event)
            case Notice(text=text):
                self.note(text)
            case TurnEnd():
                pass


def settings_dict(settings: GenerationSettings | None) -> JSON:
    """GenerationSettings as a plain dict ({} before the first turn)."""
    return dataclasses.asdict(settings) if settings is not None else {}
