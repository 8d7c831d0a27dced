"""The handlers of conversations kept across reloads and restarts: saving a tab's conversation to the store,
restoring a browser's conversations on page load (only to the browser that owns them), listing and opening them.
Browser tabs only: a session through the API has no owner and is not stored.

``ChatHandlers`` (handlers.py) inherits these; they use its ``new_session``, ``close_session``, ``pipelines``,
``_settings_of`` and ``_reply``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from ..generate import Chat, GenerationSettings
from ..pipeline import Pipeline
from ..typed_json import JSONValue
from .controls import control_values
from .live import LiveTurns
from .options import AppOptions
from .owner import OwnerTokens
from .records import TITLE_CHARS, record_chat, session_record
from .reply import Reply
from .session import ChatSession
from .store import (
    ID,
    ConversationStore,
    Listing,
    StoredConversation,
    StoreError,
    Unreadable,
    UnreadableConversation,
)
from .store_migrate import BROWSER_KEY

logger = logging.getLogger(__name__)


class KeptConversations:
    """Saving, restoring, listing and opening the conversations of a browser (see the module's docstring)."""

    store: ConversationStore
    owners: OwnerTokens
    browser_key: str
    live: LiveTurns[Reply]
    _titles: dict[str, str]  # conversation id -> the title its owner gave it
    # provided by ChatHandlers
    options: AppOptions
    model_name: str
    pipelines: dict[str, Pipeline]
    new_session: Callable[..., ChatSession]
    make_chat: Callable[..., Chat]
    close_session: Callable[[ChatSession | None], None]
    _settings_of: Callable[[dict[str, JSONValue]], GenerationSettings]
    _reply: Callable[..., Reply]

    def open_store(self) -> None:
        """The store of ``options.cache_dir`` / ``options.db_url``, its owner key, the browsers' value key."""
        self.store = ConversationStore(self.options.cache_dir, self.options.conversation_ttl_s, url=self.options.db_url)
        self.owners = owner_tokens(self.store)
        # What gradio encrypts the browser's kept value with. Not a secret: gradio sends it to every visitor in
        # GET /config. Kept in the store so that a restart and every replica read the same browsers' values; what
        # is checked is the signed owner token inside the value (owner.py).
        self.browser_key = self.store.key(BROWSER_KEY, lambda: secrets.token_urlsafe(24))

    @property
    def browser_secret(self) -> str:
        """The former name of ``browser_key`` (which is public, not a secret)."""
        return self.browser_key

    def save(self, session: ChatSession, *, running: bool = False) -> bool:
        """Store the session's conversation; ``running``: a turn is under way (its text so far is stored too).
        A failure is told to the user (a note) and returns False; the conversation stays as shown."""
        failure = self._store(session, running=running)
        if failure is not None:
            session.note(f"This conversation is shown but not saved: {failure}.", kind="error")
        return failure is None

    def _store(self, session: ChatSession, *, running: bool = False) -> str | None:
        """``save`` without the note: None when stored (or nothing to store), else what went wrong (logged)."""
        if session.owner is None:
            return None
        try:
            if not session.chat.history:
                self.store.delete(session.owner, session.conversation)
                return None
            partial = "".join(s for s in session.live or [] if isinstance(s, str)) if running else ""
            record = session_record(session, model_name=self.model_name, running=running, partial=partial)
            if session.conversation in self._titles:
                record.update(title=self._titles[session.conversation], renamed=True)
            self.store.save(session.owner, session.conversation, record)
        except StoreError as e:
            logger.warning("conversation %s not stored: %s", session.conversation, e)
            return str(e)
        return None

    def restore(self, saved: JSONValue) -> tuple[ChatSession, dict[str, str]]:
        """On page load: the browser's kept value (``{"owner": token}``) -> the tab's session, its most recent
        stored conversation (or a new one), and the value for the browser to keep (a new signed owner token the
        first time). Only a token the server signed names an owner (owner.py): a bare or forged id gets a new
        owner, never someone else's conversations. What cannot be shown is said in a note: a token that does not
        verify, conversations that cannot be read, a store that cannot be reached."""
        token = saved.get("owner") if isinstance(saved, dict) else None
        owner = self.owners.verify(token)
        problem = None
        if owner is None and isinstance(token, str) and ID.fullmatch(token):
            try:  # an id kept unsigned by the app before tokens: recognised once, for its migrated conversations
                owner = token if self.store.claim_legacy_owner(token) else None
            except StoreError as e:
                problem = str(e)
        if owner is None:
            owner, _ = self.owners.new()
            if token is not None and problem is None:
                problem = (
                    "this browser's saved identity is not one this app issued (its key changed, or the value was "
                    "altered), so its earlier conversations cannot be shown here; they are not deleted"
                )
        kept = {"owner": self.owners.token(owner)}
        running = self.live.take_up(owner)  # a turn still running on the server: the page follows it
        if running is not None:
            return running, kept
        session = None
        try:
            listing = self.store.scan(owner)
        except StoreError as e:
            listing, problem = Listing(), str(e)
        unreadable = list(listing.unreadable)
        for stored in listing.conversations:
            try:
                session = self._open(owner, stored.id)
            except (UnreadableConversation, StoreError) as e:
                unreadable.append(Unreadable(stored.id, stored.title, str(e)))
            if session is not None:
                break
        session = session or self.new_session(owner=owner)
        if problem is not None:
            session.note(f"Earlier conversations cannot be shown: {problem}.", kind="error")
        if unreadable:
            titles = ", ".join(f"“{u.title}”" for u in unreadable[:3]) + (" …" if len(unreadable) > 3 else "")
            session.note(
                f"{len(unreadable)} stored conversation(s) could not be read and are not shown: {titles}.", "error"
            )
        return session, kept

    def conversations(self, session: ChatSession | None) -> list[StoredConversation]:
        """The browser's stored conversations, the most recent first (the sidebar's list)."""
        if session is None or session.owner is None:
            return []
        try:
            return self.store.list(session.owner)
        except StoreError as e:
            session.note(f"The conversations cannot be listed: {e}.", kind="error")
            return []

    def unreadable(self, session: ChatSession | None) -> list[Unreadable]:
        """The browser's stored conversations that could not be read (damaged), for the app to list as such."""
        if session is None or session.owner is None:
            return []
        try:
            return self.store.scan(session.owner).unreadable
        except StoreError:
            return []

    def open_conversation(self, session: ChatSession | None, conversation: str | None) -> Reply:
        """Go back to a stored conversation of this browser (only its own: the owner is the session's)."""
        session = session or self.new_session()
        if session.running:
            session.note("Still answering: press Stop before opening another conversation.", kind="error")
            return self._reply(session)
        if conversation == session.conversation:
            return self._reply(session)
        opened = None
        try:
            if (
                session.owner is not None
                and isinstance(conversation, str)
                and conversation in {c.id for c in self.store.list(session.owner)}
            ):
                opened = self._open(session.owner, conversation)
        except (UnreadableConversation, StoreError) as e:
            session.note(f"That conversation could not be read: {e}.", kind="error")
            return self._reply(session)
        if opened is None:
            session.note("That conversation is no longer stored (it expired or was cleared).", kind="error")
            return self._reply(session)
        self.close_session(session)
        return self._reply(opened, controls=control_values(opened.settings) if opened.settings else None)

    def rename(self, session: ChatSession | None, title: str | None) -> Reply:
        """Give the current conversation a title of its own (the sidebar shows it instead of its first words)."""
        session = session or self.new_session()
        title = " ".join((title or "").split())[:TITLE_CHARS]
        if not title or not session.chat.history or session.owner is None:
            session.note("Type a name for a conversation that has a message (an empty one is not kept).", "error")
        else:
            self._titles[session.conversation] = title
            if self.save(session):
                session.note(f"Renamed to “{title}”.")
        return self._reply(session)

    def _open(self, owner: str, conversation: str) -> ChatSession | None:
        """A session on a stored conversation (None: there is none); a turn cut short by a crash is shown as
        interrupted (and stored so). ``UnreadableConversation`` says why a stored one cannot be shown."""
        record = self.store.load(owner, conversation)
        if record is None:
            return None
        session = self.new_session(owner=owner)
        try:
            data = record_chat(record)
            session.chat = self.make_chat(session.chat.pipeline, data)  # the view of the session's index
            session.settings = self._settings_of(data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            logger.warning("stored conversation %s/%s cannot be restored: %s", owner, conversation, e)
            session.close()
            raise UnreadableConversation(str(e)) from None
        session.conversation = conversation
        if record.get("renamed") and isinstance(record.get("title"), str):
            self._titles[conversation] = record["title"]
        if record.get("running"):
            self._store(session)  # stored as it is now shown: an interrupted answer, no turn running
        return session


def owner_tokens(store: ConversationStore) -> OwnerTokens:
    """The signer of owner tokens, with the key kept in the store (made at the first start, shared by replicas).
    A damaged key stops the app with what to do, rather than a new key silently hiding every conversation."""
    key = store.key("owner_key")
    try:
        return OwnerTokens(key)
    except ValueError:
        raise StoreError(
            f"the store's owner key (table store_keys, name 'owner_key', in {store.where}) is damaged: restore it "
            "from a backup. Deleting that row makes a new key, and every browser then loses access to its stored "
            "conversations."
        ) from None
