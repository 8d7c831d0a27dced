"""Conversations kept on the server, so that they outlive a page reload and a restart of the app: one database row
per conversation (its owner, title, times, and its record as JSON), its images as files that the row names, deleted
once not touched for the time-to-live.

The database is SQLite in the data folder by default (WAL journal, one transaction per write) or any database
URL, PostgreSQL for several replicas of the app sharing one store (the images folder must then be shared too). The
store speaks to both through SQLAlchemy Core: one set of queries and one transaction API for the two dialects,
URL parsing, a connection pool for gradio's worker threads, and the dialects' insert-or-update, instead of two
hand-written drivers (sqlite3 and psycopg) kept in step by hand. No ORM: the schema is three small tables.

Every write is all or nothing: a record's new images are written as files first (atomically: ``store_files``),
then its row in one transaction; if either fails, the files it added are removed and ``StoreError`` says why (a
full disk, a database that cannot be reached), and the previous version stays. A row that cannot be read (damaged
by hand or by a disk) is logged, listed by ``scan`` among the conversations that could not be read, and skipped:
it never hides the others.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from ..typed_json import JSONValue
from .owner import new_key
from .store_files import private_dir, private_file, remove_stale_temporaries, write_atomic

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

    DialectInsert = postgresql.Insert | sqlite.Insert  # the INSERTs with an ON CONFLICT clause

Record = dict[str, JSONValue]  # a conversation as stored (a JSON object)

logger = logging.getLogger(__name__)

ID = re.compile(r"[0-9a-f]{32}")  # owner and conversation ids: uuid4 hex, never a path
DB_FILE = "conversations.db"  # the embedded database, in the data folder
IMAGES_DIR = "conversation_images"  # <owner>/<conversation>/<sha256>.png: never served by the app as such
IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.png")
BUSY_TIMEOUT_MS = 10_000  # SQLite: how long a write waits for another process's transaction before failing

metadata = sa.MetaData()
conversations = sa.Table(
    "conversations",
    metadata,
    sa.Column("owner", sa.String(32), primary_key=True),
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False, index=True),
    sa.Column("body", sa.Text, nullable=False),  # the record as JSON; each image's PNG replaced by its file name
)
store_keys = sa.Table(  # the owner key (secret) and the key of the browser's kept value (public by gradio's design)
    "store_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
legacy_owners = sa.Table(  # owner ids of conversations migrated from JSON files, each accepted unsigned once
    "legacy_owners",
    metadata,
    sa.Column("owner", sa.String(32), primary_key=True),
)


class StoreError(OSError):
    """The store could not do what was asked (a full disk, an unreachable database, a damaged key); the message
    says what happened and what to do."""


class UnreadableConversation(ValueError):
    """A stored conversation that cannot be read back (its row or one of its image files is damaged)."""


@dataclass(frozen=True)
class StoredConversation:
    """One line of the sidebar's list: which conversation, its title, when it last changed (epoch seconds)."""

    id: str
    title: str
    updated: float


@dataclass(frozen=True)
class Unreadable:
    """A stored conversation that could not be read: shown to its owner as such, never silently dropped."""

    id: str
    title: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """An owner's conversations, the most recent first, and those that could not be read."""

    conversations: list[StoredConversation] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def new_id() -> str:
    return secrets.token_hex(16)


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise ValueError(f"{what} must be 32 hexadecimal digits, got {value!r}")
    return value


def database_url(url: str | None, root: Path) -> str:
    """``url``, with ``postgresql://`` meaning the psycopg (3) driver; None: SQLite in ``root``."""
    if not url:
        return f"sqlite:///{private_file(Path(root) / DB_FILE)}"
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class ConversationStore:
    """The conversations of every owner, in the database at ``url`` (None: SQLite in ``root``) with their images
    under ``root``; rows not changed for ``ttl_s`` are deleted by ``sweep`` (at start and whenever an owner's list
    is read). Conversations saved by an earlier version as JSON files (``root/conversations/<owner>/<id>.json``)
    are moved in once, at the first start (``store_migrate``)."""

    def __init__(self, root: Path, ttl_s: float, *, url: str | None = None, clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"the conversations' time-to-live must be > 0 seconds, got {ttl_s}")
        self.root = private_dir(Path(root))
        self.ttl_s = ttl_s
        self.clock = clock
        self.images = private_dir(self.root / IMAGES_DIR)
        self._reported: set[tuple[str, str]] = set()  # damaged rows already logged (logged once, listed always)
        full_url = database_url(url, self.root)
        try:
            backend = sa.engine.make_url(full_url).get_backend_name()
        except SQLAlchemyError as e:
            raise StoreError(f"the database URL is not valid ({_reason(e)}); e.g. postgresql://user@host/db") from None
        if backend not in ("sqlite", "postgresql"):
            raise StoreError(f"the conversation store supports SQLite and PostgreSQL databases, not {backend}")
        try:
            self.engine = sa.create_engine(full_url, pool_pre_ping=not full_url.startswith("sqlite"))
        except ModuleNotFoundError as e:
            raise StoreError(
                f"the database URL needs the Python package {e.name!r}: pip install 'fromage_gill[postgres]'"
            ) from None
        except SQLAlchemyError as e:
            raise StoreError(f"the database URL is not valid ({_reason(e)}); e.g. postgresql://user@host/db") from None
        self.where = self.engine.url.render_as_string(hide_password=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        with self._failing("open the store"):
            metadata.create_all(self.engine)
        remove_stale_temporaries(self.images)
        from .store_migrate import migrate_json_conversations  # the one-time import of the JSON files

        migrate_json_conversations(self)
        self.sweep()

    # -- the keys ------------------------------------------------------------------------------------------------

    def key(self, name: str, make: Callable[[], str] = new_key) -> str:
        """The store's key ``name``, made once by ``make`` (the first replica to start wins; all share it)."""
        with self._failing("read the store's keys"), self.engine.begin() as c:
            c.execute(_insert_ignore(self.engine, store_keys, ["name"]).values(name=name, value=make()))
            return c.execute(sa.select(store_keys.c.value).where(store_keys.c.name == name)).scalar_one()

    # -- conversations -------------------------------------------------------------------------------------------

    def save(self, owner: str, conversation: str, record: Record) -> None:
        """Store ``record`` (JSON-able; its ``chat.turns[].segments[]`` images as base64 PNG) as ``conversation``
        of ``owner``, replacing its previous version: all of it or, on ``StoreError``, none of it."""
        folder = self._folder(owner, conversation)
        body, images = _split_images(record)
        title = str(record.get("title") or "New chat")
        now = self.clock()
        added: list[Path] = []
        try:
            if images:
                private_dir(private_dir(folder.parent) / folder.name)
            for name, png in images.items():
                path = folder / name
                if not path.exists():  # named by content: an existing file holds the same bytes
                    write_atomic(path, png)
                    added.append(path)
            text = json.dumps({**body, "updated": now})
            with self.engine.begin() as c:
                c.execute(
                    _upsert(self.engine, conversations, ["owner", "id"], ["title", "updated", "body"]).values(
                        owner=owner, id=conversation, title=title, created=now, updated=now, body=text
                    )
                )
        except (OSError, SQLAlchemyError) as e:
            for path in added:  # nothing half-stored: the files this save added go with it
                path.unlink(missing_ok=True)
            raise StoreError(f"could not store the conversation: {_reason(e)}") from e

    def load(self, owner: str, conversation: str) -> Record | None:
        """The record as saved (images back as base64 PNG, plus ``updated``), None when there is none;
        ``UnreadableConversation`` when its row or an image file is damaged (logged)."""
        folder = self._folder(owner, conversation)
        with self._failing("read the conversation"), self.engine.connect() as c:
            row = c.execute(
                sa.select(conversations.c.title, conversations.c.body).where(
                    conversations.c.owner == owner, conversations.c.id == conversation
                )
            ).first()
        if row is None:
            return None
        try:
            return _join_images(_body(row.body), folder)
        except UnreadableConversation as e:
            self._report(owner, conversation, str(e))
            raise

    def delete(self, owner: str, conversation: str) -> None:
        self._folder(owner, conversation)  # checks both ids
        with self._failing("delete the conversation"), self.engine.begin() as c:
            c.execute(
                sa.delete(conversations).where(conversations.c.owner == owner, conversations.c.id == conversation)
            )
        self._remove_images(owner, conversation)

    def list(self, owner: str) -> list[StoredConversation]:
        """The owner's readable conversations, the most recent first."""
        return self.scan(owner).conversations

    def scan(self, owner: str) -> Listing:
        """The owner's conversations, the most recent first, and apart those whose row cannot be read (each
        logged once): a damaged row never hides the others."""
        check_id(owner, "owner")
        self.sweep()
        with self._failing("list the conversations"), self.engine.connect() as c:
            rows = c.execute(
                sa.select(conversations.c.id, conversations.c.title, conversations.c.updated, conversations.c.body)
                .where(conversations.c.owner == owner)
                .order_by(conversations.c.updated.desc())
            ).all()
        out = Listing()
        for row in rows:
            title = str(row.title or "New chat")
            try:
                _body(row.body)
                out.conversations.append(StoredConversation(row.id, title, float(row.updated)))
            except (UnreadableConversation, TypeError, ValueError) as e:
                self._report(owner, row.id, str(e))
                out.unreadable.append(Unreadable(row.id, title, str(e)))
        return out

    def sweep(self) -> None:
        """Delete the conversations not changed for ``ttl_s``, with their images."""
        cutoff = self.clock() - self.ttl_s
        with self._failing("delete expired conversations"), self.engine.begin() as c:
            gone = c.execute(
                sa.delete(conversations)
                .where(conversations.c.updated < cutoff)
                .returning(conversations.c.owner, conversations.c.id)
            ).all()
        for owner, conversation in gone:
            self._remove_images(owner, conversation)

    # -- owners migrated from the JSON files -----------------------------------------------------------------------

    def claim_legacy_owner(self, owner: str) -> bool:
        """True the first time only that an owner id migrated from the JSON files is claimed (by the browser that
        kept it unsigned, which then gets a signed token): an old id cannot be replayed after that."""
        check_id(owner, "owner")
        with self._failing("check the owner"), self.engine.begin() as c:
            return c.execute(sa.delete(legacy_owners).where(legacy_owners.c.owner == owner)).rowcount == 1

    def import_record(self, owner: str, conversation: str, record: Record, updated: float) -> bool:
        """Insert a migrated conversation unless it is already there (so a repeated migration changes nothing)."""
        folder = self._folder(owner, conversation)
        body, images = _split_images(record)
        if images:
            private_dir(private_dir(folder.parent) / folder.name)
        for name, png in images.items():
            if not (folder / name).exists():
                write_atomic(folder / name, png)
        title = str(record.get("title") or "New chat")
        with self.engine.begin() as c:
            c.execute(_insert_ignore(self.engine, legacy_owners, ["owner"]).values(owner=owner))
            done = c.execute(
                _insert_ignore(self.engine, conversations, ["owner", "id"]).values(
                    owner=owner,
                    id=conversation,
                    title=title,
                    created=updated,
                    updated=updated,
                    body=json.dumps({**body, "updated": updated}),
                )
            )
            return done.rowcount == 1

    # -- internals -----------------------------------------------------------------------------------------------

    def _folder(self, owner: str, conversation: str) -> Path:
        return self.images / check_id(owner, "owner") / check_id(conversation, "conversation")

    def _remove_images(self, owner: str, conversation: str) -> None:
        shutil.rmtree(self._folder(owner, conversation), ignore_errors=True)
        with contextlib.suppress(OSError):  # the owner's folder goes with its last conversation
            (self.images / owner).rmdir()

    def _report(self, owner: str, conversation: str, reason: str) -> None:
        if (owner, conversation) not in self._reported:
            self._reported.add((owner, conversation))
            logger.warning("stored conversation %s/%s cannot be read (%s); it is skipped", owner, conversation, reason)

    @contextmanager
    def _failing(self, what: str) -> Generator[None, None, None]:
        try:
            yield
        except SQLAlchemyError as e:
            raise StoreError(f"could not {what} ({self.where}): {_reason(e)}") from e


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """WAL: readers never wait for the writer, and a write interrupted by a crash is rolled back at the next open;
    FULL: a committed turn is on disk; a busy timeout: several processes may share the file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def _insert_ignore(engine: sa.Engine, table: sa.Table, keys: list[str]) -> DialectInsert:
    return _dialect_insert(engine, table).on_conflict_do_nothing(index_elements=keys)


def _upsert(engine: sa.Engine, table: sa.Table, keys: list[str], columns: list[str]) -> DialectInsert:
    insert = _dialect_insert(engine, table)
    return insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in columns})


def _dialect_insert(engine: sa.Engine, table: sa.Table) -> DialectInsert:
    name = engine.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"the conversation store supports SQLite and PostgreSQL, not {name}")
    return insert(table)


def _reason(e: BaseException) -> str:
    """A failure in words a user can act on (never the SQL statement, which would hold the conversation)."""
    orig = getattr(e, "orig", None) or e
    words = str(orig).lower()
    if isinstance(orig, OSError) and orig.errno == errno.ENOSPC or "disk is full" in words or "no space left" in words:
        return "the disk is full; free some space and try again"
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return text[:300]


def _body(text: str | bytes | None) -> Record:
    """A row's record; ``UnreadableConversation`` saying what is wrong with it."""
    if text is None:
        raise UnreadableConversation("its stored data is empty")
    try:
        record = json.loads(text)
    except (TypeError, ValueError) as e:
        raise UnreadableConversation(f"its stored data is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("chat"), dict):
        raise UnreadableConversation("its stored data has no 'chat' object")
    return record


def _image_segments(record: Record) -> Iterator[Record]:
    turns = record.get("chat", {}).get("turns") if isinstance(record.get("chat"), dict) else None
    for turn in turns if isinstance(turns, list) else []:
        segments = turn.get("segments") if isinstance(turn, dict) else None
        for seg in segments if isinstance(segments, list) else []:
            if isinstance(seg, dict) and seg.get("type") == "image":
                yield seg


def _split_images(record: Record) -> tuple[Record, dict[str, bytes]]:
    """The record with each image's base64 PNG replaced by a file name (its SHA-256), and {name: PNG bytes}."""
    body = _copy_image_segments(record)  # the caller's record stays as it was
    images: dict[str, bytes] = {}
    for seg in _image_segments(body):
        png = seg.pop("png", None)
        if isinstance(png, str):
            try:
                data = base64.b64decode(png, validate=True)
            except (binascii.Error, ValueError):
                raise StoreError("could not store the conversation: an image is not valid base64 PNG") from None
            name = hashlib.sha256(data).hexdigest() + ".png"
            images[name] = data
            seg["png_file"] = name
    return body, images


def _copy_image_segments(record: Record) -> Record:
    """``record`` with new dicts down to each image segment (and the rest shared): what ``_split_images`` edits,
    without copying megabytes of text and PNG that stay as they are."""
    chat = record.get("chat")
    if not isinstance(chat, dict) or not isinstance(chat.get("turns"), list):
        return dict(record)

    def turn_copy(turn: JSONValue) -> JSONValue:
        if not isinstance(turn, dict) or not isinstance(turn.get("segments"), list):
            return turn
        return {**turn, "segments": [dict(s) if isinstance(s, dict) else s for s in turn["segments"]]}

    return {**record, "chat": {**chat, "turns": [turn_copy(t) for t in chat["turns"]]}}


def _join_images(record: Record, folder: Path) -> Record:
    for seg in _image_segments(record):
        name = seg.pop("png_file", None)
        if name is None:
            continue
        if not isinstance(name, str) or not IMAGE_NAME.fullmatch(name):
            raise UnreadableConversation(f"an image reference is damaged ({name!r})")
        try:
            seg["png"] = base64.b64encode((folder / name).read_bytes()).decode("ascii")
        except OSError as e:
            raise UnreadableConversation(f"its image file {name} cannot be read ({e.strerror or e})") from None
    return record
