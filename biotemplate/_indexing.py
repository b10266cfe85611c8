"""The in-memory index: rebuilt from the sealed rows, or loaded from a sealed snapshot.

Rows whose key is gone (an old database copy restored) read as absent and are counted;
rows that fail authentication are excluded and reported, never served.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from . import records as rec
from . import snapshot
from ._core import (
    SNAPSHOT,
    Progress,
    StoreCore,
)
from .backends.base import RecordRow
from .codec import Shredded
from .errors import (
    BiotemplateError,
    IntegrityError,
)
from .index import TemplateIndex


class Indexing(StoreCore):
    """Index loading, snapshots and rebuilds."""

    def _load_index(self, progress: Progress | None = None) -> None:
        """Build a new index from the sealed rows, then swap it in: searches running
        meanwhile keep using the old one instead of seeing an empty or partial index."""
        now_us = self._now_us()
        index = TemplateIndex(self.dim, self._index_params)
        subjects: dict[str, str] = {}
        shredded: set[str] = set()
        failures: set[str] = set()
        total, done = self._db.count(), 0
        # A two-stage pipeline: this thread decrypts batch i+1 (Python, holds the GIL)
        # while a worker inserts batch i into hnswlib (native, releases the GIL), so the
        # per-row decryption hides behind the graph build instead of adding to it.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="biotemplate-rebuild") as pool:
            pending: Future[None] | None = None
            try:
                for batch in self._db.scan():
                    items = self._open_rows(batch, now_us, shredded, failures)
                    if pending is not None:
                        pending.result()
                        if progress is not None:  # rows indexed so far, not just read
                            progress(done, total)
                    pending = pool.submit(self._index_rows, items, index=index,
                                          subjects=subjects)
                    done += len(batch)
                if pending is not None:
                    pending.result()
                if progress is not None:
                    progress(done, total)
            except BaseException:
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        pending.result()
                index.clear()  # a half-built index never replaces the old one
                raise
        old = self._index
        self._index, self._subjects = index, subjects
        self._index_incomplete = False
        self._shredded, self._integrity_failures = shredded, failures
        old.clear()
        self._report_integrity()

    def _open_rows(self, rows: Sequence[RecordRow], now_us: int, shredded: set[str],
                   failures: set[str]) -> list[tuple[RecordRow, rec.Plain]]:
        """Decrypt rows for the index: shredded rows are counted and skipped, tampered
        ones are excluded and reported, expired ones are left out."""
        keep: list[tuple[RecordRow, rec.Plain]] = []
        for row in rows:
            try:
                plain = self._codec.open(row)
            except Shredded:
                shredded.add(row.record_id)
                continue
            except IntegrityError:
                failures.add(row.record_id)
                continue
            if row.expiry_us > now_us:
                keep.append((row, plain))
        return keep

    def _report_integrity(self) -> None:
        if self._integrity_failures:
            self._trail.append("integrity", actor=None, outcome="error",
                               count=len(self._integrity_failures),
                               record_ids=sorted(self._integrity_failures)[:100])

    def _load_snapshot(self) -> bool:
        """Load the sealed snapshot, then bring it up to the rows.

        Every change made through the store is logged in the same transaction as the row
        (the ``changes`` table), so when the last change is still the one the snapshot
        covers and the row count agrees, no row was written since and nothing is read
        (an open then costs one decryption, not a pass over every row). Otherwise every
        row's clear header and AEAD tag is compared with the fingerprint the snapshot
        took: changed rows are re-read (and excluded if forged), rows that are gone are
        dropped. What this does not catch at open is in SECURITY.md. False (and the
        caller rebuilds) when there is no usable snapshot."""
        path = self._path / SNAPSHOT
        if not path.exists():
            return False
        try:
            with snapshot.opened(path, self._keyring) as (seq, state):
                ids, subject_ids = state.pop("record_ids"), state.pop("subject_ids")
                if not (len(ids) == len(subject_ids)
                        and set(map(type, subject_ids)) <= {str}):
                    raise ValueError("subject map")
                subjects = dict(zip(ids, subject_ids, strict=True))
                rows, row_count = bytes(state.pop("rows")), int(state.pop("row_count"))
                failures = {str(x) for x in state.pop("integrity_failures")}
                shredded = {str(x) for x in state.pop("shredded")}
                self._index.import_state(state)
        except (BiotemplateError, KeyError, TypeError, ValueError, AttributeError,
                OverflowError):
            self._index.clear()
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            self._trail.append("snapshot", actor=None, outcome="error", action="rejected")
            return False
        self._subjects, self._integrity_failures, self._shredded = subjects, failures, shredded
        if self._db.last_change() != seq or self._db.count() != row_count:
            self._reconcile(snapshot.unpack_fingerprints(rows))
        self._report_integrity()
        return True

    def _reconcile(self, seen: dict[str, bytes]) -> None:
        """Bring a loaded snapshot up to the rows: re-read changed ones, forget gone ones."""
        current: dict[str, bytes] = {}
        for batch in self._db.scan_headers():
            for row in batch:
                current[row.record_id] = snapshot.fingerprint(row)
        changed = [rid for rid, fp in current.items() if seen.get(rid) != fp]
        self._forget([rid for rid in seen if rid not in current] + changed)
        rows = [r for r in (self._db.get(rid) for rid in changed) if r is not None]
        for stale in (self._integrity_failures, self._shredded):
            stale.intersection_update(current)
            stale.difference_update(changed)
        self._index_rows(self._open_rows(rows, self._now_us(), self._shredded,
                                         self._integrity_failures))

    def snapshot(self) -> int:
        """Write a sealed index snapshot now (also done on close); returns the change
        sequence number it covers. Expired vectors are overwritten before it is taken."""
        self._alive()
        with self._lock:
            if self._index_incomplete:  # rows committed that the index failed to take
                self._load_index()
            seq = self._db.last_change()
            self._index.hide_expired(self._now_us())  # so export_state overwrites them
            state = self._index.export_state()
            state["record_ids"] = list(self._subjects)
            state["subject_ids"] = list(self._subjects.values())
            state["integrity_failures"] = sorted(self._integrity_failures)
            state["shredded"] = sorted(self._shredded)
            fingerprints = {row.record_id: snapshot.fingerprint(row)
                            for batch in self._db.scan_headers() for row in batch}
            state["rows"] = snapshot.pack_fingerprints(fingerprints)
            state["row_count"] = len(fingerprints)
            size = snapshot.write(self._path / SNAPSHOT, self._keyring, state, seq)
            self._trail.append("snapshot", actor=None, seq=seq, records=len(self._index),
                               bytes=size)
            return seq

    def rebuild_index(self, progress: Progress | None = None) -> int:
        """Rebuild the in-memory index from the sealed rows only; returns records indexed.
        ``progress(done, total)`` is called per batch of rows."""
        self._alive()
        with self._lock:
            self._load_index(progress)
            self._trail.append("rebuild", actor=None, records=len(self._index))
            return len(self._index)
