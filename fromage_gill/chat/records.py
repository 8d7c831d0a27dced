"""A session as the record the store keeps (``store.py``), and back: its JSON export, its title, why each answer
ended, and while a turn runs the answer's text so far, so that a crash leaves it marked as interrupted."""

from __future__ import annotations

import json
from typing import Any

from .export import ChatExportError, export_json, read_export
from .session import ChatSession

TITLE_CHARS = 48  # of the first message, as the sidebar shows a conversation


def session_record(session: ChatSession, *, model_name: str, running: bool = False, partial: str = "") -> dict:
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


def record_chat(record: dict[str, Any]) -> tuple[dict[str, Any], dict[int, str]]:
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
