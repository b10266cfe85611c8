"""Where the sealed key state is kept: a file beside the SQLite store, or a row of the
PostgreSQL store. The vault reads and writes it only through one of these.

The file (:class:`FileSlot`) is replaced atomically; its temp files may hold shredded keys
and are swept. The row (:class:`PgSlot`) is replaced by compare-and-swap on its version:
an instance that read the key state before another instance changed it cannot save over
the newer state (``PostgresBackend.save_keyring`` refuses), and it can ask cheaply whether
its copy is stale (:meth:`PgSlot.changed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from . import _files
from .backends.postgres import PostgresBackend
from .errors import KeyUnavailable
from .keyring import Keyring
from .keys import SecretKey

__all__ = ["FileSlot", "KeySlot", "PgSlot"]


class KeySlot(Protocol):
    def load(self, kek: SecretKey) -> Keyring: ...

    def save(self, keyring: Keyring, kek: SecretKey) -> None: ...

    def changed(self) -> bool:
        """Whether another writer saved the key state since this slot last read or wrote."""
        ...

    def sweep(self) -> None: ...


class FileSlot:
    """The ``keyring`` file of a SQLite store (one writer: it never changes behind us)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, kek: SecretKey) -> Keyring:
        return Keyring.load(self.path, kek)

    def save(self, keyring: Keyring, kek: SecretKey) -> None:
        keyring.save(self.path, kek)

    def changed(self) -> bool:
        return False

    def sweep(self) -> None:
        _files.sweep_temps(self.path)  # a killed save's temp may hold shredded keys


class PgSlot:
    """The ``keyring`` row of a PostgreSQL store, shared by every instance."""

    def __init__(self, db: PostgresBackend) -> None:
        self._db = db
        self.version = 0  # of the state this instance last read or wrote

    def load(self, kek: SecretKey) -> Keyring:
        found = self._db.load_keyring()
        if found is None:
            raise KeyUnavailable("the store's key state is missing")
        keyring = Keyring.from_bytes(found[1], kek)
        self.version = found[0]
        return keyring

    def save(self, keyring: Keyring, kek: SecretKey) -> None:
        self.version = self._db.save_keyring(keyring.to_bytes(kek), self.version)

    def changed(self) -> bool:
        return self._db.keyring_version() != self.version

    def sweep(self) -> None:
        """Nothing on disk to sweep."""
