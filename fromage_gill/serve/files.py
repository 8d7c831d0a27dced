"""What the ingress keeps between requests, each bounded: the images its answers link to (``FileStore``, bytes)
and the exact turns of its recent answers (``AnswerMemo``, entries), so a client that sends an answer back as it got
it continues the conversation on the very tokens (and cached positions) the model produced."""

from __future__ import annotations

import io
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..generate.prompt import ImageSegment, Turn


@dataclass(frozen=True)
class StoredImage:
    png: bytes
    source: str
    caption: str | None
    index_id: int | None


class FileStore:
    """PNG files by unguessable id (128 random bits: a link is its own capability, as the files are served without
    the API key so that a markdown viewer can show them), at most ``max_bytes`` in memory, least recently used
    dropped first."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        if max_bytes < 1:
            raise ValueError(f"the file store needs max_bytes >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, StoredImage] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def put(self, segment: ImageSegment) -> tuple[str, bytes]:
        """(id, PNG bytes) of ``segment``'s picture, now stored."""
        buf = io.BytesIO()
        segment.image.save(buf, format="PNG")
        png = buf.getvalue()
        file_id = secrets.token_hex(16)
        with self._lock:
            self._files[file_id] = StoredImage(png, segment.source, segment.caption, segment.index_id)
            self._size += len(png)
            while self._size > self.max_bytes and len(self._files) > 1:
                _, old = self._files.popitem(last=False)
                self._size -= len(old.png)
        return file_id, png

    def get(self, file_id: str) -> StoredImage | None:
        with self._lock:
            item = self._files.get(file_id)
            if item is not None:
                self._files.move_to_end(file_id)
            return item

    @property
    def size(self) -> int:
        with self._lock:
            return self._size


class AnswerMemo:
    """The last ``max_entries`` answers: content string -> the assistant ``Turn`` (segments and exact tokens)."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._turns: OrderedDict[str, Turn] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, content: str, turn: Turn) -> None:
        with self._lock:
            self._turns[content] = turn
            self._turns.move_to_end(content)
            while len(self._turns) > self.max_entries:
                self._turns.popitem(last=False)

    def get(self, content: str) -> Turn | None:
        with self._lock:
            turn = self._turns.get(content)
            if turn is not None:
                self._turns.move_to_end(content)
            return turn
