"""The app's handlers: one method per button and API endpoint (send, regenerate, edit, stop, undo, clear, export,
load, history), on plain values and without gradio.

A handler takes the tab's session (None before its first action), what it acts on (a message ``{"text",
"files"}``, a turn, a file) and the settings controls' values as keyword arguments (``ui``, keyed as in
``controls.SETTING_KEYS`` plus ``seed`` and ``index``). It returns or yields a ``Reply``; ``app.py`` wires each
handler to its gradio event. Bad input never raises: it becomes an error note, and the conversation stays as it was.
The model-using handlers run their turn on the server (live.py): a page that reloads or closes does not stop it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..generate import Chat, GenerationSettings
from ..generate.engine import Engine, GiB
from ..generate.engine_chat import EngineChat
from ..generate.events import TurnEvents
from ..generate.history import JSON
from ..pipeline import Pipeline
from . import export
from .controls import NO_INDEX, SettingValue, control_values, make_settings, settings_panel
from .gate import ModelGate
from .kept import KeptConversations
from .live import LiveTurns
from .messages import ChatMessage, build_message, chatbot_messages, edited_message, text_of
from .options import AppOptions
from .reply import Reply
from .running import turn_updates
from .session import ChatSession, UserPart
from .store import StoreError, new_id

logger = logging.getLogger(__name__)

WAIT_POLL_S = 0.5  # how often a queued request refreshes its "N ahead of you" message


class ChatHandlers(KeptConversations):
    """The handlers of one app: its pipeline (one view per index, sharing the model), the model gate that all of
    its sessions queue at, and the settings' defaults."""

    def __init__(self, pipeline: Pipeline, options: AppOptions | None = None):
        self.options = options or AppOptions()
        self.model_name = pipeline.config.name
        indexes = dict(self.options.indexes) if self.options.indexes else {}
        if not indexes and pipeline.index is not None:
            indexes = {"default": pipeline.index}
        panel = settings_panel(pipeline, self.options.defaults, indexes)  # the settings controls (controls.py)
        self.defaults, self.max_new_tokens, self.decodings = panel.defaults, panel.max_new_tokens, panel.decodings
        self.settings_table = panel.table
        self.index_names = list(indexes)
        # One Pipeline view per index (sharing the model): a session's Chat retrieves from the view it holds.
        self.pipelines = {name: dataclasses.replace(pipeline, index=idx) for name, idx in indexes.items()}
        self.pipelines = self.pipelines or {NO_INDEX: pipeline}
        # Every session's turns decode on one Engine, batched: the gate admits as many turns as the engine's batch
        # holds, so visitors' turns decode together and the rest wait with "Busy: N ahead of you". Made at the
        # first session (a scheduler thread), shared by all.
        self.gate = ModelGate(self.options.concurrency)
        self._pipeline = pipeline
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        # What the tabs show and download lives as long as their sessions: in a private temporary folder (0700, an
        # unpredictable name) that gradio may serve files from; what outlives the app is in the store (cache_dir).
        scratch = Path(tempfile.mkdtemp(prefix="fromage_gill_app_"))
        atexit.register(shutil.rmtree, scratch, True)
        self.image_root = scratch / "images"  # one folder per session; the app serves these files
        self.image_root.mkdir()
        self.export_root = scratch / "exports"  # one folder per session, removed with it
        self._exports = threading.BoundedSemaphore(self.options.max_exports)
        self.open_store()
        self.live = LiveTurns[Reply](self._close)  # turns run on the server, not in the page
        self._titles: dict[str, str] = {}  # conversation id -> the title its owner gave it

    # -- sessions -----------------------------------------------------------------------------------------------

    def new_session(self, index_name: str | None = None, owner: str | None = None) -> ChatSession:
        name = index_name if index_name in self.pipelines else next(iter(self.pipelines))
        sid = uuid.uuid4().hex  # unguessable: the session's image URLs contain it
        chat = self.make_chat(self.pipelines[name])
        return ChatSession(chat, index_name=name, id=sid, image_dir=self.image_root / sid, owner=owner)

    @property
    def engine(self) -> Engine:
        """The engine all sessions' turns decode on (made on first use)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(
                    self._pipeline,
                    max_batch=self.options.concurrency,
                    kv_cache_bytes=int(self.options.kv_cache_gb * GiB),
                )
            return self._engine

    def make_chat(self, pipeline: Pipeline, data: JSON | None = None) -> Chat:
        """A session's conversation on the shared engine (``data``: a saved chat to continue, ``Chat.to_dict``'s
        shape, checked as ``Chat.from_dict`` checks it). MAGIC and contrastive turns decode as a plain ``Chat``'s
        (``EngineChat`` falls back for them), beside the batch."""
        chat = EngineChat(self.engine, pipeline)
        if data is not None:
            chat.history = Chat.from_dict(pipeline, data).history
        return chat

    def close_engine(self) -> None:
        """Stop the engine's scheduler (tests, shutdown); a later session makes a new one."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def use_index(self, session: ChatSession, index_name: str | None) -> None:
        """Retrieve from another index from now on. The same Chat goes on (the engine reads ``pipeline.index`` at
        each retrieval), so the conversation keeps its KV cache and the vision features of its images."""
        if index_name not in self.pipelines or index_name == session.index_name:
            return
        session.chat.pipeline = self.pipelines[index_name]
        session.index_name = index_name

    def view(self, session: ChatSession | None) -> list[ChatMessage]:
        return [] if session is None else chatbot_messages(session)

    def close_session(self, session: ChatSession | None) -> None:
        """The tab is gone or changes conversation: its files go, once its turn (if one runs) ends (live.py)."""
        if session is not None:
            self.live.release(session)

    def _close(self, session: ChatSession) -> None:
        session.close()
        shutil.rmtree(self.export_root / session.id, ignore_errors=True)

    # -- the model-using actions (streamed) ---------------------------------------------------------------------

    def send(
        self, session: ChatSession | None, message: dict[str, object] | None, **ui: SettingValue
    ) -> Iterator[Reply]:
        """A new user message (its text and attached files) and the answer, streamed."""
        session = session or self.new_session(ui.get("index"))

        def queued() -> Iterator[Reply]:
            if session.running:  # typed while an answer runs: sent when it ends, and kept in the box until then
                session.note("Queued: your message is sent when this answer ends (it stays in the box until then).")
                yield self._reply(session)
            yield from session.exclusive(lambda: self._send(session, message, ui), self._refused(session), wait=True)

        yield from self.live.start(session, queued())

    def regenerate(self, session: ChatSession | None, **ui: SettingValue) -> Iterator[Reply]:
        """Another answer to the last message, with a new seed."""
        session = session or self.new_session(ui.get("index"))
        yield from self.live.start(
            session, session.exclusive(lambda: self._regenerate(session, ui), self._refused(session))
        )

    def edit(
        self,
        session: ChatSession | None,
        turn_index: float | None,
        text: str | None,
        part: int | None = None,
        **ui: SettingValue,
    ) -> Iterator[Reply]:
        """Branch from a past user message: replace its text (or only text segment ``part``), keep its images,
        drop what came after it, and answer again."""
        session = session or self.new_session(ui.get("index"))
        turn = session.exclusive(lambda: self._edit(session, turn_index, text, part, ui), self._refused(session))
        yield from self.live.start(session, turn)

    def edit_shown(
        self, session: ChatSession | None, message_index: int, value: object, **ui: SettingValue
    ) -> Iterator[Reply]:
        """``edit`` from the chat's own editor: the text of shown message ``message_index`` became ``value``."""
        where = session.turn_of_message(message_index) if session is not None else None
        if where is None:
            session = session or self.new_session(ui.get("index"))
            session.note(
                "Only the text of your messages can be edited; send a new message to change an image.", "error"
            )
            yield self._reply(session)
            return
        turn, part = where
        yield from self.edit(session, turn, text_of(value), part, **ui)

    def _send(
        self, session: ChatSession, message: dict[str, object] | None, ui: dict[str, SettingValue]
    ) -> Iterator[Reply]:
        message = message or {}
        try:
            self.use_index(session, ui.get("index"))
            settings = make_settings(self.defaults, ui)
            text, files = message.get("text"), message.get("files")  # gr.MultimodalTextbox's value
            segments = build_message(
                text if isinstance(text, str) else None,
                files if isinstance(files, (list, tuple)) else None,
                max_images=self.options.max_images_per_message,
            )
        except ValueError as e:
            session.note(str(e), kind="error")
            yield self._reply(session)  # the box keeps what was typed, to fix and resend
            return
        session.settings = settings
        yield from self._run_turn(session, lambda: session.chat.send(segments, settings), segments)

    def _regenerate(self, session: ChatSession, ui: dict[str, SettingValue]) -> Iterator[Reply]:
        if not any(t.role == "assistant" for t in session.chat.history):
            session.note("Nothing to regenerate yet: send a message first.", kind="error")
            yield self._reply(session)
            return
        try:
            self.use_index(session, ui.get("index"))
            # "Regenerate" means another answer: a fixed seed would only repeat the same one.
            settings = dataclasses.replace(make_settings(self.defaults, ui), seed=None)
        except ValueError as e:
            session.note(str(e), kind="error")
            yield self._reply(session)
            return
        session.settings = settings
        yield from self._run_turn(session, lambda: session.chat.regenerate(settings), None)

    def _edit(
        self,
        session: ChatSession,
        turn_index: float | None,
        text: str | None,
        part: int | None,
        ui: dict[str, SettingValue],
    ) -> Iterator[Reply]:
        history = session.chat.history
        try:
            i = int(turn_index) if turn_index is not None else -1
            if not (0 <= i < len(history)) or history[i].role != "user":
                users = [k for k, t in enumerate(history) if t.role == "user"]
                raise ValueError(f"Turn {turn_index} is not one of your messages (yours are turns {users}).")
            self.use_index(session, ui.get("index"))
            settings = make_settings(self.defaults, ui)
            segments = edited_message(history[i].segments, text or "", part)
        except ValueError as e:
            session.note(str(e), kind="error")
            yield self._reply(session)
            return
        session.settings = settings
        saved = session.chat.to_dict()

        def start() -> TurnEvents:
            session.chat.truncate(i)
            try:
                yield from session.chat.send(segments, settings)
            except ValueError:
                # Refused (e.g. too long): put back the turns that truncate() removed.
                session.chat = self.make_chat(session.chat.pipeline, saved)
                raise

        yield from self._run_turn(session, start, segments, shown_turns=i)

    def _run_turn(
        self,
        session: ChatSession,
        start: Callable[[], TurnEvents],
        pending_user: Sequence[UserPart] | None,
        shown_turns: int | None = None,
    ) -> Iterator[Reply]:
        """Wait for the model (showing the queue position), stream the turn, and fold errors into the chat."""
        before = list(session.chat.history)  # put back if the turn cannot be stored
        session.start_streaming(pending_user, shown_turns)
        ticket = self.gate.join()
        try:
            session.chat.stop_requested.clear()  # a Stop from now on withdraws this message
            while not self.gate.wait(ticket, WAIT_POLL_S):
                if session.chat.stop_requested.is_set():
                    session.end_streaming()
                    session.note("Stopped before the model started; nothing was sent.")
                    yield self._reply(session)
                    return
                ahead = self.gate.ahead(ticket)
                session.live = [
                    f"*Busy: {ahead} ahead of you.* Your message starts when they finish *(press Stop to withdraw it)*"
                ]
                yield self._reply(session)
            session.live = []
            events = start()  # a refusal (too long, bad settings) raises here or at its first event
            first = next(events, None)
            # From now on a crash leaves this turn marked as interrupted. A turn that cannot be stored is not
            # sent: it is withdrawn (nothing half-stored) and the message stays in the box.
            failure = self._store(session, running=True)
            if failure is not None:
                with contextlib.suppress(StoreError):
                    events.throw(StoreError(failure))  # the engine rolls the turn back
                session.chat.history[:] = before
                session.end_streaming()
                session.note(f"Not sent: {failure}. Your message is still in the box.", kind="error")
                yield self._reply(session)
                return
            yield self._reply(session, clear_box=pending_user is not None and shown_turns is None)  # a send's box
            if first is not None:
                session.apply(first)

            def save_running() -> None:  # a failure here is logged; the turn's end says whether it was saved
                self._store(session, running=True)

            for _ in turn_updates(session, events, save=save_running):
                yield self._reply(session)
        except (ValueError, RuntimeError) as e:  # ImageError is a ValueError; the engine leaves the Chat unchanged
            logger.info("turn refused: %s", e)
            session.end_streaming()
            session.note(str(e), kind="error")
            yield self._reply(session)
            return
        finally:
            self.gate.leave(ticket)
            session.end_streaming()
        self.save(session)
        yield self._reply(session)

    def _refused(self, session: ChatSession) -> Callable[[], Iterator[Reply]]:
        def still_answering() -> Iterator[Reply]:
            session.note("Still answering: wait for the answer or press Stop.", kind="error")
            yield self._reply(session)

        return still_answering

    @staticmethod
    def _reply(
        session: ChatSession, *, clear_box: bool = False, controls: dict[str, SettingValue] | None = None
    ) -> Reply:
        return Reply(
            session,
            chatbot_messages(session),
            clear_box=clear_box,
            controls=controls,
            notes=session.take_notes(),
            running=session.streaming,
        )

    # -- quick actions ------------------------------------------------------------------------------------------

    def stop(self, session: ChatSession | None) -> ChatSession | None:
        if session is not None:
            session.stop()
        return session

    def undo(self, session: ChatSession | None) -> Reply:
        session = session or self.new_session()
        if session.running:
            session.note("Still answering: press Stop first, then Undo.", kind="error")
        elif not session.chat.history:
            session.note("Nothing to undo.", kind="error")
        else:
            try:
                session.chat.undo()
            except ValueError as e:
                session.note(str(e), kind="error")
            self.save(session)
        return self._reply(session)

    def clear(self, session: ChatSession | None) -> Reply:
        """Empty the chat: the conversation is deleted (from the sidebar's list too); a new one starts. The page
        asks first (app.py)."""
        if session is not None and session.running:
            session.note("Still answering: press Stop first, then delete.", kind="error")
            return self._reply(session)
        owner = session.owner if session is not None else None
        if session is not None and owner is not None:
            try:
                self.store.delete(owner, session.conversation)
            except StoreError as e:
                session.note(f"The conversation could not be deleted: {e}", kind="error")
                return self._reply(session)
        self.close_session(session)
        return Reply(self.new_session(owner=owner), [], clear_box=True)

    def history(self, session: ChatSession | None) -> JSON:
        """The conversation as JSON-friendly data: turns (text and image labels), seeds, settings."""
        if session is None:
            return {"turns": [], "seeds": {}, "settings": {}}
        return session.summary()

    # -- export and import --------------------------------------------------------------------------------------

    def export_html(self, session: ChatSession | None) -> str | None:
        """The path of a new self-contained HTML page of the conversation (None when too many exports run)."""
        session = session or self.new_session()
        return self._export(
            session, "conversation.html", lambda: export.export_html(session, model_name=self.model_name)
        )

    def export_json(self, session: ChatSession | None) -> str | None:
        """The path of a new JSON export of the conversation, to continue it later with load_json."""
        session = session or self.new_session()
        return self._export(
            session, "conversation.json", lambda: json.dumps(export.export_json(session, model_name=self.model_name))
        )

    def _export(self, session: ChatSession, name: str, text: Callable[[], str]) -> str | None:
        """Write an export into the session's folder (replacing its previous one; the folder goes with the
        session), at most ``max_exports`` at once: more are refused with a note, never queued behind a big one."""
        if not self._exports.acquire(blocking=False):
            session.note(
                f"{self.options.max_exports} exports are being written right now; try again in a moment.", "error"
            )
            return None
        try:
            path = self.export_root / session.id / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text(), encoding="utf-8")
            tmp.replace(path)
            return str(path)
        finally:
            self._exports.release()

    def load_json(self, session: ChatSession | None, file: object) -> Reply:
        """Continue a conversation from a JSON export (a path, ``{"path": ...}`` or an object with ``.path``); its
        settings come back as the controls' values."""
        session = session or self.new_session()
        path = getattr(file, "path", None) or (file.get("path") if isinstance(file, dict) else file)
        if session.running:
            session.note("Still answering: press Stop before loading a conversation.", kind="error")
            return self._reply(session)
        try:
            if not isinstance(path, (str, Path)) or not path:
                raise export.ChatExportError("No file: choose a JSON file saved with 'Export JSON'.")
            data = export.read_export(path)
            chat = Chat.from_dict(session.chat.pipeline, data)  # the view of the session's index
            settings = self._settings_of(data)
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            session.note(f"Could not load the conversation: {msg}", kind="error")
            return self._reply(session)
        session.chat = chat
        session.settings = settings
        session.conversation = new_id()  # a conversation of its own in the sidebar's list
        self.save(session)
        n = sum(t.role == "user" for t in chat.history)  # exchanges, as the chat shows them (not turns)
        session.note(f"Loaded a conversation of {n} exchange{'s' * (n != 1)} from {Path(str(path)).name}.")
        return self._reply(session, controls=control_values(settings))

    def _settings_of(self, data: JSON) -> GenerationSettings:
        """The GenerationSettings of a JSON export (ValueError naming a bad one)."""
        seed = data["settings"].get("seed")
        return make_settings(self.defaults, {**data["settings"], "seed": "random" if seed is None else seed})

    def new_chat(self, session: ChatSession | None) -> Reply:
        """Start another conversation; the current one stays in the list."""
        if session is not None and session.running:
            session.note("Still answering: press Stop before starting a new chat.", kind="error")
            return self._reply(session)
        owner = session.owner if session is not None else None
        self.close_session(session)
        return Reply(self.new_session(owner=owner), [])
