"""A session as the record the store keeps (``store.py``), and back: its JSON export, its title, why each answer
ended, and while a turn runs the answer's text so far, so that a crash leaves it marked as interrupted."""

from __future__ import annotations

import json

from ..typed_json import JSONValue
from .export import ChatExportError, export_json, read_export
from .session import ChatSession

TITLE_CHARS = 48  # of the first message, as the sidebar shows a conversation


def session_record(
    session: ChatSession, *, model_name: str, running: bool = False, partial: str = ""
) -> dict[str, JSONValue]:
    """What is stored of a session: its JSON export (each answer with its seed and why it ended), title, and while a
    turn runs ``running`` with the answer's text so far (``partial``), so that a crash leaves it marked as
    interrupted."""
    first = next((t.text for t in session.chat.history if t.role == "user" and t.text.strip()), "")
    title = " ".join(first.split())[:TITLE_CHARS] or ("Images" if session.chat.history else "New chat")
    return {
        "chat": export_json(session, model_name=model_name),
        "title": title,
        "running": running,
        "partial": partial,
    }


def record_chat(record: object) -> dict[str, JSONValue]:  # from a file
    """The JSON export of a stored record (checked by ``read_export``); a turn that was running when the app stopped
    becomes an answer of the text it had, whose end reason is "interrupted". A record stored before the answers held
    their end reasons keeps them in ``"reasons"`` (turn number -> reason): they are put on the turns."""
    if not isinstance(record, dict) or not isinstance(record.get("chat"), dict):
        raise ChatExportError("the stored conversation has no 'chat' object")
    data = read_export(json.dumps(record["chat"]).encode())
    turns = data.get("turns")
    if not isinstance(turns, list):
        return data  # Chat.from_dict says what is wrong
    old = record.get("reasons")
    for k, reason in old.items() if isinstance(old, dict) else ():
        i = int(k) if str(k).isdigit() else -1
        if 0 <= i < len(turns) and isinstance(turns[i], dict) and turns[i].get("end_reason") is None:
            turns[i]["end_reason"] = str(reason)
    if record.get("running") and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user":
        partial = record.get("partial") if isinstance(record.get("partial"), str) else ""
        turns.append(
            {"role": "assistant", "segments": [{"type": "text", "text": partial}], "end_reason": "interrupted"}
        )
    return data
