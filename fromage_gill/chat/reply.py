"""``Reply``: what a handler of the app shows (handlers.py makes them, app.py turns them into component values)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .controls import SettingValue
from .messages import ChatMessage
from .session import ChatSession, Note


@dataclass
class Reply:
    """What a handler shows: the tab's session, the chat's messages, whether the message box is cleared (the model
    took the message; every other reply keeps what is typed there, to fix and send again or to send next), the
    notes to show once as toasts (errors, the engine's notices), whether a turn is running (the app then turns Send
    into Stop and disables the buttons that cannot act), and after loading a conversation the settings controls'
    new values (None: unchanged)."""

    session: ChatSession
    messages: list[ChatMessage]
    clear_box: bool = False
    controls: dict[str, SettingValue] | None = None
    notes: list[Note] = dataclasses.field(default_factory=list)
    running: bool = False

    @property
    def errors(self) -> list[str]:
        return [n.text for n in self.notes if n.kind == "error"]
