"""Following a shared store's change feed: how one instance's index keeps up with the rest.

Every instance of a PostgreSQL store has its own in-memory index. A background thread
(:class:`Follower`) keeps it up with the ``changes`` table that triggers fill in every
writing transaction:

- it LISTENs on the store's channel and wakes on NOTIFY (sent by the writing transaction
  at commit), and polls every ``poll_interval`` seconds anyway, since a notification is
  lost while the listening connection is down;
- it reads the changes after the last sequence number it applied, under the store's lock
  taken shared, so no writer is between its first write and its key-state save: a
  sequence number it has passed can never commit later, and the key state it reloads is
  never half of a change (``PostgresBackend`` explains the lock);
- it applies them (``Gallery.follow``): deleted records leave the index, new and resealed
  rows are authenticated and indexed; the key state, policy and subject-key entries are
  reloaded by the lock itself when another instance changed them (``Vault.refresh``).

A lost connection is retried with a growing pause (up to ``MAX_BACKOFF``); on reconnect
the thread catches up from its sequence number: no rebuild. Until then searches keep
answering from the index as it is, and each candidate is still confirmed against its
row, so a record deleted elsewhere is never served meanwhile; ``lag_error`` says why the
feed stalled. The thread writes no audit entry and holds no template outside the index.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from ._calls import Parts
from .backends.postgres import PostgresBackend
from .errors import BiotemplateError

__all__ = ["Follower"]

BATCH = 1024  # changes applied per lock hold: writers wait at most one batch
MAX_BACKOFF = 5.0  # seconds between reconnect attempts, at most


class Follower:
    """The change-feed thread of one instance."""

    def __init__(self, p: Parts, db: PostgresBackend, *, after: int,
                 poll_interval: float = 0.5) -> None:
        self._p, self._db = p, db
        self.seq = after  # the last change applied (or covered by the index it started from)
        self.poll_interval = poll_interval
        self.lag_error: str | None = None  # why the feed is stalled, if it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Follower(seq={self.seq})"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="biotemplate-feed")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def catch_up(self) -> int:
        """Apply every change committed so far; returns how many were read.

        Raises:
            StorageError: the database could not be read (the feed resumes later).
        """
        total = 0
        while True:
            with self._p.lock.reading():
                if self._p.closed:
                    return total
                changes = self._db.changes_after(self.seq, BATCH)
                if changes:
                    self._p.gallery.follow(changes, self._p.clock.now_us())
                    self.seq = changes[-1][0]
            total += len(changes)
            if len(changes) < BATCH:
                break
        return total

    def _run(self) -> None:
        listener: Any = None
        pause = self.poll_interval
        while not self._stop.is_set():
            try:
                if listener is None:
                    listener = self._db.connect()
                    listener.execute(f"LISTEN {self._db.location.channel}")
                self.catch_up()  # also right after every (re)connect
                self.lag_error, pause = None, self.poll_interval
                for _ in listener.notifies(timeout=self.poll_interval, stop_after=1):
                    pass
            except Exception as exc:
                self.lag_error = (str(exc) if isinstance(exc, BiotemplateError) else
                                  f"the change feed's connection failed ({type(exc).__name__})")
                if listener is not None:
                    with contextlib.suppress(Exception):
                        listener.close()
                    listener = None
                self._stop.wait(pause)
                pause = min(pause * 2, MAX_BACKOFF)
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()
