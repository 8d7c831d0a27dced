"""The store's files: private folders (0700) and files (0600), each file written atomically (a temporary file in
the same folder, flushed to disk, then renamed over the final name), so that a crash or a full disk leaves either
the whole file or none of it, never a truncated one. A temporary file carries its writer's host and process id, so
that the files a killed writer left behind are recognised and removed (``remove_stale_temporaries``)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
HOST = socket.gethostname().replace(".", "_")  # in temporary names, which are split at dots
STALE_TMP_S = 3600.0  # a temporary file of another host (a shared folder) this old belongs to no live writer


def private_dir(path: Path) -> Path:
    """``path`` and its missing parents created, ``path`` itself readable by its owner only (0700), also when it
    existed before with wider permissions (the store's folders hold other people's conversations)."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)  # the parents are not the store's: default permissions
        path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """An empty file created 0600 when missing (SQLite then creates its -wal and -shm files with the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0600) all or nothing: OSError (e.g. ENOSPC) leaves no temporary file behind."""
    tmp = _tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself reaches the disk


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every file system lets a folder be opened for fsync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_files(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(root: Path) -> int:
    """Delete the temporary files under ``root`` that no live writer owns: this host's whose process is gone, and
    any host's older than ``STALE_TMP_S``. Returns how many were removed."""
    removed = 0
    for tmp in Path(root).rglob(f".*{TMP_SUFFIX}"):
        parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        try:
            old = time.time() - tmp.stat().st_mtime > STALE_TMP_S
            mine_and_dead = len(parts) == 3 and parts[1] == HOST and not _alive(int(parts[2]))
            if old or mine_and_dead:
                tmp.unlink()
                removed += 1
        except (OSError, ValueError):
            continue
    if removed:
        logger.info("removed %d temporary file(s) left by writers that stopped mid-write under %s", removed, root)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
