"""Conversations kept on the server, so that they outlive a page reload and a restart of the app: one JSON file per
conversation (a JSON export, as ``export.export_json`` writes it, plus its title and whether a turn was running),
in one folder per browser (its ``owner`` id, kept in the browser's local storage), deleted once not touched for
the time-to-live."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import ChatExportError, export_json, read_export
from .session import ChatSession

logger = logging.getLogger(__name__)

TITLE_CHARS = 48  # of the first message, as the sidebar shows a conversation
ID = re.compile(r"[0-9a-f]{32}")  # owner and conversation ids: uuid4 hex, never a path


@dataclass(frozen=True)
class StoredConversation:
    """One line of the sidebar's list: which conversation, its title, when it last changed (epoch seconds)."""

    id: str
    title: str
    updated: float


def new_id() -> str:
    return secrets.token_hex(16)


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise ValueError(f"{what} must be 32 hexadecimal digits, got {value!r}")
    return value


class ConversationStore:
    """``root/<owner>/<conversation>.json``; files older than ``ttl_s`` are deleted by ``sweep`` (run at start and
    whenever an owner's list is read). Writes are atomic (a temporary file renamed), so a crash mid-write leaves
    the previous version."""

    def __init__(self, root: Path, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"the conversations' time-to-live must be > 0 seconds, got {ttl_s}")
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()

    def _path(self, owner: str, conversation: str) -> Path:
        return self.root / check_id(owner, "owner") / f"{check_id(conversation, 'conversation')}.json"

    def save(self, owner: str, conversation: str, record: dict[str, Any]) -> None:
        path = self._path(owner, conversation)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**record, "updated": time.time()}), encoding="utf-8")
        os.replace(tmp, path)

    def load(self, owner: str, conversation: str) -> dict[str, Any] | None:
        """The record, or None when there is none (or it is unreadable: logged, and treated as gone)."""
        path = self._path(owner, conversation)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("stored conversation %s is unreadable (%s); ignoring it", path, e)
            return None

    def delete(self, owner: str, conversation: str) -> None:
        self._path(owner, conversation).unlink(missing_ok=True)

    def list(self, owner: str) -> list[StoredConversation]:
        """The owner's conversations, the most recent first."""
        self.sweep()
        folder = self.root / check_id(owner, "owner")
        out = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            record = self.load(owner, path.stem) if ID.fullmatch(path.stem) else None
            if record is not None:
                out.append(StoredConversation(path.stem, str(record.get("title") or "New chat"), record["updated"]))
        return sorted(out, key=lambda c: c.updated, reverse=True)

    def sweep(self) -> None:
        """Delete the conversations not touched for ``ttl_s`` (and owners' folders left empty)."""
        cutoff = time.time() - self.ttl_s
        for path in self.root.glob("*/*.json"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                continue
        for folder in self.root.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


# -- a session as a stored record, and back --------------------------------------------------------------------


def session_record(
    session: ChatSession, *, model_name: str, running: bool = False, partial: str = ""
) -> dict[str, Any]:
    """What is stored of a session: its JSON export, title, why each answer ended, and while a turn runs
    ``running`` with the answer's text so far (``partial``), so that a crash leaves it marked as interrupted."""
    first = next((t.text for t in session.chat.history if t.role == "user" and t.text.strip()), "")
    title = " ".join(first.split())[:TITLE_CHARS] or ("Images" if session.chat.history else "New chat")
    return {
        "chat": export_json(session, model_name=model_name),
        "title": title,
        "reasons": {str(k): v for k, v in session.reasons.items()},
        "running": running,
        "partial": partial,
    }


def record_chat(record: object) -> tuple[dict[str, Any], dict[int, str]]:  # a stored record, read from disk
    """The JSON export of a stored record (checked by ``read_export``) and the end reason of each answer; a turn
    that was running when the app stopped becomes an answer of the text it had, marked "interrupted"."""
    if not isinstance(record, dict) or not isinstance(record.get("chat"), dict):
        raise ChatExportError("the stored conversation has no 'chat' object")
    data = read_export(json.dumps(record["chat"]).encode())
    reasons = {int(k): str(v) for k, v in (record.get("reasons") or {}).items() if str(k).isdigit()}
    turns = data.get("turns")
    if record.get("running") and isinstance(turns, list) and turns and turns[-1].get("role") == "user":
        partial = record.get("partial") if isinstance(record.get("partial"), str) else ""
        turns.append({"role": "assistant", "segments": [{"type": "text", "text": partial}]})
        reasons[len(turns) - 1] = "interrupted"
    return data, reasons


def browser_secret(cache_dir: Path) -> str:
    """The key the browser's kept value is encrypted with, the same at every start of the app (a new random one
    each start, gradio's default, would leave every browser unable to read its value after a restart)."""
    path = Path(cache_dir) / "browser_secret"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secret)
        return secret
