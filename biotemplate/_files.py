"""Every file the library writes goes through here: one way to create, replace and copy.

Why one module: a store's files hold sealed templates and key material, so how they are
created matters as much as what is in them. The rules, each in one function:

- **New files are created exclusively with mode 0600** (``O_CREAT | O_EXCL``): nothing is
  ever overwritten by accident and nothing is readable by another user, whatever the umask.
- **Replacing a file is atomic and durable**: write a temp file in the same folder, fsync
  it, rename it over the target, fsync the folder (without the last step a power cut can
  bring the old file back). A temp file left by a killed process is swept by the next
  replace of the same name, since it may hold key material the new file just retired.
- **SQLite files** are opened only if they exist (``mode=rw``; SQLite would otherwise
  create one silently), removed together with their ``-wal`` and ``-shm`` companions, and
  copied only through SQLite's online backup API (copying a live file can tear it).
- **A lock file** (:class:`FileLock`) is held with ``flock``, which the kernel drops with
  its holder's last descriptor: a killed holder leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FileLock",
    "atomic_replace",
    "create_exclusive",
    "fsync_dir",
    "fsync_file",
    "read_note",
    "remove_sqlite",
    "size_of",
    "sqlite_backup",
    "sqlite_connect",
]

SQLITE_SUFFIXES = ("", "-wal", "-shm")


def create_exclusive(path: Path) -> None:
    """Create an empty file of mode 0600; ``FileExistsError`` if anything is there."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def write_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, never overwriting) holding ``data``, fsynced with its folder.

    Raises:
        FileExistsError: something is already at ``path``.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) survive a power cut."""
    fsync_file(folder)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def sweep_temps(path: Path) -> None:
    """Delete temp files a killed process left beside ``path`` (they may hold keys)."""
    for stale in path.parent.glob(_temp_prefix(path) + "*"):
        stale.unlink(missing_ok=True)


def atomic_replace(path: Path, write: Callable[[BinaryIO], None] | bytes,
                   before_rename: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with what ``write`` puts in a file (or with the given bytes).

    The new file has mode 0600 and is fsynced before the rename; the folder is fsynced
    after it. ``before_rename`` is a seam for the crash tests (a kill between the two).

    Raises:
        OSError: the file could not be written; ``path`` is then left as it was.
    """
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            if isinstance(write, bytes | bytearray | memoryview):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sweep_temps(path)
    fsync_dir(path.parent)


def size_of(path: Path) -> int:
    """Bytes in ``path``; 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def remove_sqlite(path: Path) -> None:
    """Remove a SQLite file and its log files (a half-made store must not block a retry)."""
    for suffix in SQLITE_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def remove_all(paths: Iterable[Path]) -> None:
    for path in paths:
        remove_sqlite(path)


def sqlite_connect(path: Path, mode: str = "rw", timeout: float = 5.0) -> sqlite3.Connection:
    """Connect to an existing file only (``mode=rw`` or ``ro``), autocommit, any thread.

    ``isolation_level=None``: the callers issue BEGIN themselves, so a writer takes its
    lock up front (``BEGIN IMMEDIATE``) instead of failing halfway.
    """
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True,
                           timeout=timeout, isolation_level=None, check_same_thread=False)


def sqlite_backup(conn: sqlite3.Connection, dest: Path) -> None:
    """Copy a live database into a new 0600 file with SQLite's online backup API.

    Raises:
        FileExistsError: ``dest`` exists (a backup never overwrites).
        sqlite3.Error, OSError: the copy failed; nothing is left at ``dest``.
    """
    create_exclusive(dest)
    try:
        target = sqlite_connect(dest)
        try:
            conn.backup(target)
        finally:
            target.close()
        fsync_file(dest)
    except BaseException:
        remove_sqlite(dest)
        raise
    with contextlib.suppress(OSError):
        fsync_dir(dest.parent)


class FileLock:
    """An exclusive ``flock`` on a file, held until :meth:`release` or the holder's death.

    Why ``flock``: the kernel drops it with the holder's last descriptor, so a crashed
    (SIGKILLed) holder leaves no stale lock; and it belongs to an open file description,
    so two ``open()`` calls conflict even inside one process. The holder writes a short
    note (who, since when) into the file for whoever is refused. ``release`` removes the
    file while still holding the lock; an opener that locked a file removed meanwhile
    finds another file (or none) at the path, and tries again.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self._path, self._fd = path, fd

    def __repr__(self) -> str:
        return f"FileLock({str(self._path)!r}, held={self._fd >= 0})"

    @classmethod
    def acquire(cls, path: Path, note: bytes) -> FileLock:
        """Create (0600) or open ``path``, lock it without waiting, write ``note`` into it.

        Raises:
            BlockingIOError: another open file holds the lock (its note: :func:`read_note`).
            OSError: the file could not be created or locked (no folder, no permission).
        """
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _same_file(fd, path):  # released and removed meanwhile: try again
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, note, 0)
            except BaseException:
                os.close(fd)
                raise
            return cls(path, fd)

    def release(self) -> None:
        """Remove the file (still under the lock), then drop the lock. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            if _same_file(fd, path := self._path):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def read_note(path: Path, limit: int = 4096) -> bytes:
    """What a lock's holder wrote into it; empty if there is none (yet) or it is gone."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False
