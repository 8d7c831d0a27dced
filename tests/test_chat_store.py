"""The conversation store on SQLite and on a real PostgreSQL server (started by ``postgres_server`` from Debian's
binaries, one per test session, a new database per test): a save is all or nothing through a ``kill -9`` and a
full disk, a damaged row is reported and skipped, images are private files removed with their conversation, rows
expire, and the JSON files of earlier versions move in once."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image

from fromage_gill.chat import store_migrate
from fromage_gill.chat.store import (
    ConversationStore,
    StoreError,
    UnreadableConversation,
    conversations,
    new_id,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_helpers import PostgresServer, fill, small_disk, why_not  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None: SQLite in the store's folder; else a new database on the test session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()


def png_b64(seed: int, size: int = 8) -> str:
    """A PNG (one colour per seed; random noise, which does not compress, for a negative seed), base64 as a chat
    export holds it."""
    data = os.urandom(size * size * 3) if seed < 0 else bytes([seed % 256, 7, 9]) * (size * size)
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), data).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def record(title: str, text: str = "hello", png: str | None = None) -> dict:
    segments = [{"type": "text", "text": text}]
    if png is not None:
        segments.append({"type": "image", "png": png, "source": "user", "caption": None})
    turns = [{"role": "user", "segments": segments}, {"role": "assistant", "segments": [{"type": "text", "text": "a"}]}]
    return {"title": title, "chat": {"format": "fromage_gill.chat", "version": 1, "turns": turns}, "running": False}


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_conversation_and_its_images_are_private_files_removed_with_it(tmp_path, db_url):
    root = tmp_path / "data"
    store = ConversationStore(root, 3600, url=db_url)
    alice, bob, chat, other = new_id(), new_id(), new_id(), new_id()
    png = png_b64(7)
    saved = record("cats", "look", png)
    store.save(alice, chat, saved)
    store.save(bob, other, record("bob's"))

    back = store.load(alice, chat)
    assert back["chat"] == saved["chat"] and back["title"] == "cats", "the image comes back as the same PNG"
    assert [c.title for c in store.list(alice)] == ["cats"] and [c.title for c in store.list(bob)] == ["bob's"]
    assert store.load(bob, chat) is None, "another owner's conversation is not found under one's own id"
    images = list((root / "conversation_images").rglob("*.png"))
    assert len(images) == 1 and png not in _row(store, chat)["body"], "the row names the file, not its bytes"
    assert all(m == 0o700 for p, m in modes(root).items() if (root / p).is_dir()), modes(root)
    assert all(m == 0o600 for p, m in modes(root).items() if (root / p).is_file()), modes(root)

    store.delete(alice, chat)
    assert store.load(alice, chat) is None and store.list(alice) == [] and not images[0].exists()
    assert not (root / "conversation_images" / alice).exists()
    assert [c.title for c in store.list(bob)] == ["bob's"]
    with pytest.raises(ValueError, match="owner must be 32 hexadecimal digits"):
        store.load("../x", chat)


def _row(store: ConversationStore, conversation: str) -> dict:
    with store.engine.connect() as c:
        row = c.execute(sa.select(conversations).where(conversations.c.id == conversation)).one()
    return dict(row._mapping)


def test_conversations_expire_after_their_time_to_live(tmp_path, db_url):
    now = [1000.0]
    store = ConversationStore(tmp_path, 60, url=db_url, clock=lambda: now[0])
    owner, old, fresh = new_id(), new_id(), new_id()
    store.save(owner, old, record("old", png=png_b64(3)))
    now[0] += 50
    store.save(owner, fresh, record("fresh"))
    assert [c.title for c in store.list(owner)] == ["fresh", "old"], "the most recent first"
    now[0] += 20  # "old" was last changed 70 s ago
    assert [c.title for c in store.list(owner)] == ["fresh"] and store.load(owner, old) is None
    assert not list((tmp_path / "conversation_images").rglob("*.png")), "its images went with it"


@pytest.mark.parametrize("damage", ["{}", '{"title": "x", "chat": {"turns": [', "null"])
def test_a_damaged_row_is_reported_and_skipped(tmp_path, db_url, damage, caplog):
    store = ConversationStore(tmp_path, 3600, url=db_url)
    owner, good, bad = new_id(), new_id(), new_id()
    store.save(owner, bad, record("damaged one"))
    store.save(owner, good, record("intact one"))
    with store.engine.begin() as c:
        c.execute(sa.update(conversations).where(conversations.c.id == bad).values(body=damage))

    listing = store.scan(owner)
    assert [c.title for c in listing.conversations] == ["intact one"], "the others are listed"
    assert [(u.id, u.title) for u in listing.unreadable] == [(bad, "damaged one")]
    assert "JSON" in listing.unreadable[0].reason or "'chat'" in listing.unreadable[0].reason
    assert any(bad in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records), "logged"
    with pytest.raises(UnreadableConversation):
        store.load(owner, bad)
    assert store.load(owner, good)["title"] == "intact one"
    store.save(owner, bad, record("repaired"))  # a new save replaces the damaged row
    assert {c.title for c in store.list(owner)} == {"intact one", "repaired"}


def test_a_missing_image_file_makes_only_that_conversation_unreadable(tmp_path):
    store = ConversationStore(tmp_path, 3600)
    owner, a, b = new_id(), new_id(), new_id()
    store.save(owner, a, record("a", png=png_b64(1)))
    store.save(owner, b, record("b", png=png_b64(2)))
    next((tmp_path / "conversation_images" / owner / a).glob("*.png")).unlink()
    with pytest.raises(UnreadableConversation, match="image file"):
        store.load(owner, a)
    assert store.load(owner, b)["title"] == "b"


WRITER = """
import sys, os, base64, io
from pathlib import Path
from PIL import Image
from fromage_gill.chat.store import ConversationStore
root, url, owner, conversation = sys.argv[1:5]
store = ConversationStore(Path(root), 3600, url=url or None)
for i in range(100000):
    buf = io.BytesIO()
    Image.frombytes("RGB", (96, 96), os.urandom(96 * 96 * 3)).save(buf, format="PNG")
    text = f"version {i} " + "x" * 200_000
    segments = [{"type": "text", "text": text}, {"type": "image", "png": base64.b64encode(buf.getvalue()).decode()}]
    answer = {"role": "assistant", "segments": [{"type": "text", "text": str(i)}]}
    turns = [{"role": "user", "segments": segments}, answer]
    store.save(owner, conversation, {"title": "victim", "chat": {"turns": turns}})
    print(i, flush=True)
"""


def test_a_kill_9_mid_write_keeps_every_other_conversation(tmp_path, db_url):
    store = ConversationStore(tmp_path, 3600, url=db_url)
    owner, victim = new_id(), new_id()
    others = {new_id(): record(f"other {k}", f"text {k}", png_b64(k)) for k in range(3)}
    for conversation, saved in others.items():
        store.save(owner, conversation, saved)
    store.engine.dispose()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), db_url or "", owner, victim],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for _ in range(3):  # a few complete writes, then killed while it writes the next ones
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
        time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    reopened = ConversationStore(tmp_path, 3600, url=db_url)  # opens after the kill
    for conversation, saved in others.items():
        assert reopened.load(owner, conversation)["chat"] == saved["chat"]
    kept = reopened.load(owner, victim)  # the last complete version: its text and answer from the same write
    text = kept["chat"]["turns"][0]["segments"][0]["text"]
    assert text.startswith("version ") and text.split()[1] == kept["chat"]["turns"][1]["segments"][0]["text"]
    assert base64.b64decode(kept["chat"]["turns"][0]["segments"][1]["png"]).startswith(b"\x89PNG")
    assert temporaries(tmp_path) == [], "the killed writer's temporary files are removed at the next open"
    assert len(reopened.list(owner)) == 4


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MB tmpfs (root only), unmounted afterwards."""
    with small_disk(tmp_path / "small") as why:
        if why:
            pytest.skip(why)
        yield tmp_path / "small"


def test_a_full_disk_is_a_clear_error_and_stores_nothing_half(full_disk, db_url):
    # SQLite: the database file is on the full disk; PostgreSQL: the images folder is (its database is elsewhere).
    store = ConversationStore(full_disk / "data", 3600, url=db_url)
    owner, kept, victim = new_id(), new_id(), new_id()
    store.save(owner, kept, record("kept", "safe", png_b64(5)))
    store.save(owner, victim, record("victim", "version 1"))
    images_before = sorted((full_disk / "data").rglob("*.png"))
    filler = fill(full_disk)

    big_image = png_b64(-1, size=600)  # ~1 MB of noise: more than is left
    with pytest.raises(StoreError, match="disk is full"):
        store.save(owner, victim, record("victim", "version 2", big_image))
    if db_url is None:  # the database's own write fails too (no image: the row itself does not fit)
        with pytest.raises(StoreError, match="disk is full"):
            store.save(owner, victim, record("victim", "version 2 " + os.urandom(800_000).hex()))

    assert store.load(owner, victim)["chat"]["turns"][0]["segments"][0]["text"] == "version 1", "the previous one"
    assert store.load(owner, kept)["chat"] == record("kept", "safe", png_b64(5))["chat"]
    assert sorted((full_disk / "data").rglob("*.png")) == images_before, "no image of the failed save is left"
    assert temporaries(full_disk) == []
    filler.unlink()  # space again: the next save works
    store.save(owner, victim, record("victim", "version 3", big_image))
    assert store.load(owner, victim)["chat"]["turns"][0]["segments"][1]["png"] == big_image


def test_json_conversations_of_earlier_versions_move_in_once(tmp_path):
    owner, conversation, broken = new_id(), new_id(), new_id()
    old = tmp_path / "conversations" / owner
    old.mkdir(parents=True)
    saved = {**record("from json", "old times", png_b64(9)), "updated": time.time() - 100}
    (old / f"{conversation}.json").write_text(json.dumps(saved))
    (old / f"{broken}.json").write_text('{"title": "cut', encoding="utf-8")
    (tmp_path / "browser_secret").write_text("old-browser-secret")

    store = ConversationStore(tmp_path, 3600)
    assert [c.title for c in store.list(owner)] == ["from json"]
    assert store.list(owner)[0].updated == pytest.approx(saved["updated"]), "its age is kept (for the TTL)"
    assert store.load(owner, conversation)["chat"] == saved["chat"]
    assert not (old / f"{conversation}.json").exists() and (old / f"{broken}.json.unreadable").exists()
    assert store.key(store_migrate.BROWSER_KEY) == "old-browser-secret", "browsers can still read their value"

    (old / f"{conversation}.json").write_text(json.dumps({**saved, "title": "a second copy"}))
    again = ConversationStore(tmp_path, 3600)  # a second start (or a copy of the file put back): no change
    assert [c.title for c in again.list(owner)] == ["from json"]
    assert again.claim_legacy_owner(owner) and not again.claim_legacy_owner(owner), "an old id is claimed once"
    assert not again.claim_legacy_owner(new_id())


def test_an_unreachable_database_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="could not open the store"):
        ConversationStore(tmp_path, 3600, url="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="SQLite and PostgreSQL"):
        ConversationStore(tmp_path, 3600, url="mysql+pymysql://x@127.0.0.1:1/none")


def test_the_data_folder_is_the_users_and_the_database_url_a_flag(tmp_path, monkeypatch):
    import argparse

    from fromage_gill.chat.options import AppOptions, add_serve_args, default_cache_dir

    monkeypatch.delenv("FROMAGE_GILL_APP_CACHE", raising=False)
    monkeypatch.delenv("FROMAGE_GILL_DB_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fromage_gill", "never a predictable /tmp path"
    monkeypatch.setenv("FROMAGE_GILL_APP_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert AppOptions().db_url is None, "SQLite in the data folder by default"

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    assert parser.parse_args(["--db-url", "postgresql://u@h/db"]).db_url == "postgresql://u@h/db"
    monkeypatch.setenv("FROMAGE_GILL_DB_URL", "postgresql://u@env/db")
    assert AppOptions().db_url == "postgresql://u@env/db"
