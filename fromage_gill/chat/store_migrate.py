"""The one-time move of conversations saved by earlier versions of the app (one JSON file each,
``<folder>/conversations/<owner>/<conversation>.json``, and the ``browser_secret`` file that the browsers' kept
value is encrypted with) into the database.

A file is removed once its row is committed, so a migration cut short goes on at the next start, and a repeated
one changes nothing (rows already there are kept as they are). A file that cannot be read is renamed
``*.json.unreadable``, logged, and left for the operator. The owners of migrated conversations are recorded, so that
a browser still holding its old, unsigned id is recognised once and handed a signed token (``owner.py``).

Where the files are looked for: the store's own folder (the old layout under ``$FROMAGE_GILL_APP_CACHE``), and,
when the store is in the new default folder, the old default, ``fromage_gill_app`` in the system's temporary folder,
only when it belongs to this user (another local user could have planted files in a shared temporary folder).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..typed_json import JSONValue
from .owner import OWNER_ID as ID  # conversation ids have the same form

logger = logging.getLogger(__name__)

OLD_DEFAULT = Path(tempfile.gettempdir()) / "fromage_gill_app"  # where versions before the database kept them
BROWSER_KEY = "browser_key"  # the store key name of the browser's kept value's encryption key (public)


def legacy_folders(root: Path, old_default: Path = OLD_DEFAULT) -> list[Path]:
    """``root``, and the old default folder when ``root`` is the new default (the app started without
    $FROMAGE_GILL_APP_CACHE, as it was before) and the old one belongs to this user."""
    from platformdirs import user_data_dir

    folders = [Path(root)]
    if Path(root).resolve() != Path(user_data_dir("fromage_gill", appauthor=False)).resolve():
        return folders
    try:
        st = old_default.lstat()
        ours = old_default.is_dir() and not old_default.is_symlink() and st.st_uid == os.getuid()
    except OSError:
        ours = False
    if ours and old_default.resolve() != Path(root).resolve():
        folders.append(old_default)
    return folders


class MigrationTarget(Protocol):
    """What migrating needs of ``store.ConversationStore`` (which imports this module, so it is not named here)."""

    root: Path

    def key(self, name: str, make: Callable[[], str]) -> str: ...

    def import_record(self, owner: str, conversation: str, record: dict[str, JSONValue], updated: float) -> bool: ...


def migrate_json_conversations(store: MigrationTarget, folders: list[Path] | None = None) -> int:
    """Move the JSON conversations found under ``folders`` (default ``legacy_folders``) into ``store`` (a
    ``store.ConversationStore``, which calls this as it opens); returns how many rows were added."""
    added = 0
    for folder in folders if folders is not None else legacy_folders(store.root):
        secret = folder / "browser_secret"
        if secret.is_file():
            try:
                value = secret.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError):
                value = ""
            if value:  # the browsers' kept values stay readable: their old owner ids can be recognised
                store.key(BROWSER_KEY, lambda value=value: value)
        for path in sorted((folder / "conversations").glob("*/*.json")):
            owner, conversation = path.parent.name, path.stem
            if not (ID.fullmatch(owner) and ID.fullmatch(conversation)):
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("chat"), dict):
                    raise ValueError("no 'chat' object")
                updated = record.get("updated")
                updated = float(updated) if isinstance(updated, (int, float)) else path.stat().st_mtime
            except (OSError, ValueError) as e:
                logger.warning("conversation file %s cannot be read (%s); left as %s.unreadable", path, e, path.name)
                path.rename(path.with_name(path.name + ".unreadable"))
                continue
            added += store.import_record(owner, conversation, record, updated)
            path.unlink()
        for owner_dir in (folder / "conversations").glob("*"):
            if owner_dir.is_dir() and not any(owner_dir.iterdir()):
                owner_dir.rmdir()
    if added:
        logger.info("moved %d conversation(s) from JSON files into the database", added)
    return added
