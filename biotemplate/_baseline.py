"""Which candidates a search may serve without reading their rows again.

Every candidate is confirmed against its row before it is returned (``Gallery.confirm``):
a row deleted or changed behind the store's back never yields a candidate. Reading the
candidates' rows costs ~150-250 µs a search at 20k-100k records, more than all the rest
of a search's overhead (benchmarks/RESULTS.md), and on SQLite it almost always finds what
it found the last time, because the store is the database's only writer (the writer
lock) and it tells the gallery about every row it changes.

SQLite tells a connection when any *other* connection has committed to the database
(``PRAGMA data_version``; its own commits do not move it). So this module keeps a
*baseline*: every row's header and AEAD tag compared with the index's fingerprints (the
comparison confirmation makes) in one pass, at one data version. While the version has
not moved, a candidate's row is still the one that pass saw, or one the store itself
changed and told the gallery about, and the search reads no row; only the rows the pass
found different ("suspect") are still confirmed one by one. Any commit by another
connection (an edit with the triggers dropped, a row put back, another tool) moves the
version: from the next search on, every candidate is confirmed against its row as
before, and a new pass starts in the background.

What it does not see: bytes written into ``records.db`` (or its ``-wal``/``-shm``)
without going through SQLite's own commit, which does not move the version. Before the
baseline, a search read its candidates' rows and saw such an edit on pages SQLite had not
cached; now it is found when that row is next read: a confirmation after another
connection's commit, a rebuild or reopen, or a decryption (verify, export). Until then
search keeps serving the record it indexed, with the authentic template and subject of the
index, never a changed one. SECURITY.md has the line.

On PostgreSQL other instances change rows all the time (``external_version`` is None):
every search there confirms its candidates.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import snapshot
from .backends.base import Backend
from .errors import BiotemplateError

__all__ = ["RowBaseline"]

RETRY_S = 1.0  # at most one pass a second while other connections keep committing
PASS_BATCH = 2048  # rows a query of the pass reads: it holds the connection ~5 ms, not ~50


class RowBaseline:
    """The baseline of one gallery: the data version its pass ran at and the suspects.

    ``fingerprints`` returns the gallery's current record id -> fingerprint map (the
    gallery replaces that dict on a rebuild or a snapshot load and calls ``reset``)."""

    def __init__(self, rows: Backend, fingerprints: Callable[[], dict[str, bytes]]) -> None:
        self._rows, self._fingerprints = rows, fingerprints
        # (data version, suspect record ids), or None: confirm every candidate
        self._state: tuple[int, frozenset[str]] | None = None
        self._epoch = 0  # bumped by reset: a pass started before it installs nothing
        self._guard = threading.Lock()  # starting and stopping the pass
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_start = -RETRY_S

    @property
    def ready(self) -> bool:
        """Whether the last pass holds (the version may have moved since: see ``suspects``)."""
        return self._state is not None

    def suspects(self) -> frozenset[str] | None:
        """The records a search must still confirm one by one, or None: every one (no
        baseline, or another connection committed since its pass; a new pass starts)."""
        state = self._state
        if state is not None:
            try:
                if self._rows.external_version() == state[0]:
                    return state[1]
            except BiotemplateError:
                pass  # the slow path reads the rows and raises what it raises
            self._state = None
        self.start()
        return None

    def reset(self) -> None:
        """The gallery's rows changed wholesale (rebuild, snapshot load): the old baseline
        and any pass under way mean nothing now. The next search starts a new pass (not
        the open: a clean open from a snapshot reads no row)."""
        with self._guard:
            self._epoch += 1
            self._state = None
            self._last_start = -RETRY_S

    def start(self) -> None:
        """Start a pass in a daemon thread unless one runs or the backend cannot tell
        other connections' commits. A pass starts at most once a second: while another
        connection keeps committing, it waits out the rest of the second first."""
        with self._guard:
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            try:
                if self._rows.external_version() is None:
                    return
            except BiotemplateError:
                return
            now = time.monotonic()
            delay = max(0.0, self._last_start + RETRY_S - now)
            self._last_start = now + delay
            self._thread = threading.Thread(target=self._pass, args=(self._epoch, delay),
                                            daemon=True, name="biotemplate-baseline")
            self._thread.start()

    def stop(self) -> None:
        """Stop the pass (it leaves after its current batch) and wait for it: before the
        connection closes."""
        with self._guard:
            self._stop.set()
            thread, self._thread = self._thread, None
            self._state = None
        if thread is not None:
            thread.join()

    def _pass(self, epoch: int, delay: float) -> None:
        """Compare every row's header and tag with the fingerprints, at one version."""
        if delay and self._stop.wait(delay):
            return
        try:
            found = self._compare()
        except Exception:  # a closed connection, or a row too wrecked to read: searches
            return  # keep confirming every candidate, which reports it
        if found is None:
            return
        with self._guard:
            if epoch == self._epoch and not self._stop.is_set():
                self._state = found

    def _compare(self) -> tuple[int, frozenset[str]] | None:
        rows = self._rows
        version = rows.external_version()
        if version is None:
            return None
        known, fingerprint = self._fingerprints(), snapshot.fingerprint
        matched: set[str] = set()  # by id, not by count: a duplicated row must not hide a gone one
        for batch in rows.scan_headers(PASS_BATCH):
            if self._stop.is_set():
                return None
            for row in batch:
                fp = known.get(row.record_id)
                if fp is not None and fingerprint(row) == fp:
                    matched.add(row.record_id)
        if rows.external_version() != version:
            return None  # another connection committed during the pass: not a baseline
        # every indexed record no row matched: changed, gone, or (a race with the store's
        # own mutations, which only costs a row read) enrolled after the pass began
        return version, frozenset(rid for rid in list(known) if rid not in matched)
