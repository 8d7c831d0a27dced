"""The store as the app uses it: a conversation goes only to the browser whose signed token names its owner, the
owner key appears in no HTTP response, and a damaged row, a token that does not verify or a full disk are told to
the user (a full disk refuses the turn and keeps the message in the box)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from fromage_gill.chat.handlers import ChatHandlers, Reply
from fromage_gill.chat.kept import owner_tokens
from fromage_gill.chat.options import AppOptions
from fromage_gill.chat.owner import OwnerTokens
from fromage_gill.chat.records import session_record
from fromage_gill.chat.store import ConversationStore, StoreError, conversations, store_keys

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "images" / "chelsea.jpg"
TEXT = dict(mode="text", max_new_tokens=4)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_helpers import fill, small_disk  # noqa: E402


def last(replies) -> Reply:
    return list(replies)[-1]


def errors(session) -> list[str]:
    return [n.text for n in session.take_notes() if n.kind == "error"]


def user_texts(session) -> list[str]:
    return [t.text for t in session.chat.history if t.role == "user"]


def test_restore_gives_a_conversation_only_to_its_owner(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path / "a"))
    victim, kept = h.restore(None)
    last(h.send(victim, {"text": "my secret plans", "files": []}, **TEXT))
    other_app = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path / "b"))  # another key

    attempts = {
        "the bare owner id": victim.owner,
        "a forged signature": f"o1.{victim.owner}.{'A' * 43}",
        "a token of another app's key": other_app.owners.token(victim.owner),
        "a token signed with the public browser key": OwnerTokens(h.browser_key.encode().hex()[:64]).token(
            victim.owner
        ),
    }
    for what, token in attempts.items():
        session, given = h.restore({"owner": token})
        assert session.owner != victim.owner and session.chat.history == [], what
        assert h.conversations(session) == [] and h.owners.verify(given["owner"]) == session.owner, what
        assert any("not one this app issued" in e for e in errors(session)), what
        refused = h.open_conversation(session, victim.conversation)  # its id alone opens nothing either
        assert refused.session.chat.history == [] and "no longer stored" in refused.errors[0], what

    mine, again = h.restore(kept)  # the token the browser keeps: its own conversation
    assert user_texts(mine) == ["my secret plans"] and again == kept and errors(mine) == []
    new, _ = h.restore(None)
    assert errors(new) == [], "a first visit is not told anything"


def test_a_conversation_of_the_json_files_comes_back_to_its_browser_once(tiny_gill, tmp_path):
    old = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path / "old"))
    session, _ = old.restore(None)
    last(old.send(session, {"text": "from before the database", "files": [str(CAT)]}, seed="5", **TEXT))
    owner = session.owner  # what versions before the database kept in the browser: the bare id
    record = {**session_record(session, model_name=old.model_name), "updated": time.time()}
    folder = tmp_path / "new" / "conversations" / owner
    folder.mkdir(parents=True)
    (folder / f"{session.conversation}.json").write_text(json.dumps(record))

    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path / "new"))  # the first start with the database
    restored, kept = h.restore({"owner": owner})
    assert user_texts(restored) == ["from before the database"] and errors(restored) == []
    assert old.history(restored)["turns"] == old.history(session)["turns"], "text and image labels as they were"
    assert h.owners.verify(kept["owner"]) == owner, "the browser now keeps a signed token"
    replayed, _ = h.restore({"owner": owner})  # the bare id again (a copy of the old value): refused
    assert replayed.owner != owner and replayed.chat.history == [] and errors(replayed)
    assert user_texts(h.restore(kept)[0]) == ["from before the database"]


def test_a_damaged_owner_key_stops_the_app_instead_of_hiding_every_conversation(tmp_path):
    store = ConversationStore(tmp_path, 3600)
    owner_tokens(store)  # made at the first start
    with store.engine.begin() as c:
        c.execute(sa.update(store_keys).where(store_keys.c.name == "owner_key").values(value="garbled"))
    with pytest.raises(StoreError, match="owner key .* is damaged: restore it from a backup"):
        owner_tokens(ConversationStore(tmp_path, 3600))


def test_a_damaged_row_is_told_on_restore_and_the_others_come_back(tiny_gill, tmp_path):
    h = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))
    session, kept = h.restore(None)
    last(h.send(session, {"text": "older and intact", "files": []}, **TEXT))
    fresh = h.new_chat(session).session
    last(h.send(fresh, {"text": "newer and damaged", "files": []}, **TEXT))
    for body in ('{"chat": {}}', "{}"):  # the record's content, then the row itself
        with h.store.engine.begin() as c:
            c.execute(sa.update(conversations).where(conversations.c.id == fresh.conversation).values(body=body))
        restored, _ = h.restore(kept)
        assert user_texts(restored) == ["older and intact"], body
        told = errors(restored)
        assert len(told) == 1 and "1 stored conversation(s) could not be read" in told[0], told
        assert "newer and damaged" in told[0], "named by its title"
    assert [u.title for u in h.unreadable(restored)] == ["newer and damaged"]
    assert [c.title for c in h.conversations(restored)] == ["older and intact"]


def test_a_full_disk_refuses_the_turn_and_keeps_the_message(tiny_gill, tmp_path):
    cache = tmp_path / "cache"
    with small_disk(cache / "conversation_images", "1m") as why:  # where the store writes a message's images
        if why:
            pytest.skip(why)
        h = ChatHandlers(tiny_gill, AppOptions(cache_dir=cache))
        session, kept = h.restore(None)
        last(h.send(session, {"text": "first", "files": []}, **TEXT))
        filler = fill(cache / "conversation_images")

        replies = list(h.send(session, {"text": "look at this", "files": [str(CAT)]}, **TEXT))
        assert not any(r.clear_box for r in replies), "the message stays in the box"
        assert "Not sent" in replies[-1].errors[0] and "disk is full" in replies[-1].errors[0], replies[-1].errors
        assert user_texts(session) == ["first"] and not replies[-1].running, "the turn was withdrawn"
        assert [p.name for p in (cache / "conversation_images").rglob("*") if p.is_file()] == ["filler"]
        assert user_texts(h.restore(kept)[0]) == ["first"], "nothing half-stored"

        filler.unlink()  # space again: the same message goes through
        last(h.send(session, {"text": "look at this", "files": [str(CAT)]}, **TEXT))
        assert user_texts(h.restore(kept)[0]) == ["first", "look at this"]


def test_no_http_response_holds_the_owner_key(tiny_gill, tmp_path):
    pytest.importorskip("gradio")
    import httpx
    from browser_helpers import free_port
    from gradio_client import Client

    sys.path.insert(0, str(ROOT))
    import app

    demo = app.build_demo(tiny_gill, app.AppOptions(cache_dir=tmp_path, defaults=TEXT))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_style())
    url = f"http://127.0.0.1:{port}"
    try:
        handlers = ChatHandlers(tiny_gill, AppOptions(cache_dir=tmp_path))  # the same store: the same keys
        owner_key, browser_key = handlers.store.key("owner_key"), handlers.browser_key
        bodies = {}
        with httpx.Client(timeout=30) as http:
            for path in ("/", "/config", "/gradio_api/info", "/gradio_api/openapi.json", "/theme.css"):
                bodies[path] = http.get(url + path).text
        client = Client(url, verbose=False)
        bodies["send"] = repr(client.predict({"text": "hello", "files": []}, api_name="/send"))
        bodies["history"] = repr(client.predict(api_name="/history"))
        assert browser_key in bodies["/config"], "gradio hands BrowserState's key to every visitor (public)"
        for where, body in bodies.items():
            assert owner_key not in body and owner_key.upper() not in body, where
    finally:
        demo.close()
