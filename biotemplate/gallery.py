"""The gallery: what search sees, in memory only, and the only owner of it.

It holds the HNSW index (:class:`~.index.TemplateIndex`), the record id -> subject id map
(subject ids exist in clear only here and inside ciphertext), and what it could not index:
rows whose key is gone (``shredded``: an old database copy put back), rows that failed
authentication or that their subject's key entry does not list (``integrity_failures``:
excluded, reported, never served), and records an entry lists whose row is gone
(``missing``: removed behind the store's back). It is rebuilt from the vault's sealed
rows, or loaded from a sealed snapshot (``index.snapshot``) and brought up to the rows.

The gallery writes no audit entry: it reports what happened and the store audits it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _files, snapshot
from ._baseline import RowBaseline
from .backends.base import RecordRow
from .codec import Plain, Shredded
from .errors import BiotemplateError, IntegrityError, InvalidInput, KeyUnavailable
from .index import Hit, IndexParams, TemplateIndex, TunedEf
from .validation import normalised
from .vault import Vault

__all__ = ["SNAPSHOT", "Gallery", "Progress"]

SNAPSHOT = "index.snapshot"
Progress = Callable[[int, int], None]  # (done, total), for long operations


class Gallery:
    """The searchable in-memory gallery of one store."""

    def __init__(self, vault: Vault, snapshot_path: Path | None, params: IndexParams | None,
                 partition: tuple[int, int] | None = None) -> None:
        self._vault, self._path, self._params = vault, snapshot_path, params
        # (i, n): index only the subjects of partition i of n (``in_partition``)
        self.partition = partition
        self._index = TemplateIndex(vault.dim, params)
        # efs measured by tune_index (sealed setting "index"), kept across rebuilds
        self._tuned: dict[str, TunedEf] = vault.index_tuning()
        self._index.set_tuned(self._tuned)
        self._subjects: dict[str, str] = {}  # record id -> subject id
        # record id -> fingerprint of the authentic row it was indexed from (header fields
        # and AEAD tag): every candidate is confirmed against its row before it is served
        self._fingerprints: dict[str, bytes] = {}
        # records a mutation is deleting or resealing right now: a search may meet their
        # row already changed before the gallery is told (not tampering, a race)
        self._changing: set[str] = set()
        self.shredded: set[str] = set()
        self.integrity_failures: set[str] = set()
        self.missing: set[str] = set()  # listed in an entry, row gone: found by a rebuild
        # Committed rows the index failed to take (e.g. out of memory): until a rebuild,
        # no snapshot may be written, or the next open would trust it and miss them.
        self.incomplete = False
        # which candidates must still be confirmed against their rows (SQLite: only those
        # a pass over the rows found changed, while no other connection has committed)
        self.baseline = RowBaseline(vault.rows, lambda: self._fingerprints)

    def __len__(self) -> int:
        return len(self._index)

    # --- reads --------------------------------------------------------------------------

    def search(self, units: NDArray[np.float32], purpose: str, k: int,
               now_us: int) -> list[list[Hit]]:
        """Best record of up to ``k`` subjects per probe (rows already unit vectors)."""
        return self._index.search_units(units, purpose, k, now_us)

    def subject_of(self, record_id: str) -> str | None:
        """None for a record removed while a search ran: the caller drops it."""
        return self._subjects.get(record_id)

    def trusted(self) -> frozenset[str] | None:
        """Taken before the index is searched: the records ``confirm`` must still read,
        or None for all of them (no baseline, another connection committed since, or a
        shared store). Checked first because that is as good as checking after (a commit
        landing meanwhile is one the search ran before) and cheaper: right after hnswlib's
        walk, SQLite's code is out of the CPU's caches (~35 µs instead of ~5 µs)."""
        return None if self._vault.shared else self.baseline.suspects()

    def confirm(self, lists: list[list[Hit]], now_us: int,
                suspects: frozenset[str] | None = None) -> tuple[list[list[Hit]], int]:
        """Keep only hits whose row is still in the records database, unchanged since it
        was indexed (one query for all of them): a row deleted or edited behind the
        store's back, or a stale snapshot, never yields a candidate. Returns the kept
        hits and how many were dropped (each is counted as an integrity failure).
        ``suspects``: what :meth:`trusted` returned before the search (None: read all)."""
        ids = {h.record_id for hits in lists for h in hits}
        if not ids:
            return lists, 0
        if not self._vault.shared:
            if suspects is not None:
                # the rows are as the last pass saw them, or changed by the store itself:
                # read only the suspects and the rows a mutation is changing right now
                ids.intersection_update(suspects | self._changing if self._changing
                                        else suspects)
                if not ids:
                    return lists, 0
        rows = self._vault.rows.headers(list(ids))
        # gone from the records database, or changed (membership tests only, no copy:
        # during rotate_keys every record is changing)
        bad = ids.difference(r.record_id for r in rows) if len(rows) != len(ids) else set()
        known, changing, fingerprint = self._fingerprints, self._changing, snapshot.fingerprint
        for row in rows:
            rid = row.record_id
            if fingerprint(row) != known.get(rid) and rid not in changing:
                bad.add(rid)
        if not bad:
            return lists, 0
        if self._vault.shared:
            # Another instance deletes and reseals rows: a row gone is dropped (deleted
            # elsewhere), a row resealed (a hold, a rotation, a shortened expiry) is read
            # and authenticated now, and kept if it is still this subject's and live. What
            # does not open here (this instance's keys are a change behind) is dropped
            # until the feed brings it; the feed, not a search, reports tampering.
            present = {r.record_id for r in rows}
            resealed = [rid for rid in bad if rid in present and rid in known]
            bad -= self._reauthenticated(resealed, now_us)
            if not bad:
                return lists, 0
            return [[h for h in hits if h.record_id not in bad] for hits in lists], 0
        # no failure: a record the store itself is changing or has already forgotten (a
        # deletion that finished between this search's index lookup and its confirmation)
        failed = {rid for rid in bad if rid not in changing and rid in known}
        self.integrity_failures.update(failed)
        return [[h for h in hits if h.record_id not in bad] for hits in lists], len(failed)

    def _resealed(self, rows: Sequence[RecordRow], now_us: int) -> None:
        """Indexed records another instance resealed (a hold, a rotation, a shorter
        expiry): authenticated again under the current keys; the vector stays where it is,
        the expiry only moves earlier. A row that no longer opens leaves the index."""
        for row in rows:
            try:
                plain = self._vault.open_row(row)
            except Shredded:
                self.forget([row.record_id])
                self.shredded.add(row.record_id)
                continue
            except IntegrityError:
                self.forget([row.record_id])
                self.integrity_failures.add(row.record_id)
                continue
            if plain.subject_id != self._subjects.get(row.record_id):
                self.forget([row.record_id])
                self.integrity_failures.add(row.record_id)
                continue
            self._index.shorten({row.record_id: row.expiry_us})
            self._fingerprints[row.record_id] = snapshot.fingerprint(row)

    def _reauthenticated(self, record_ids: Sequence[str], now_us: int) -> set[str]:
        """The ids among ``record_ids`` (indexed, resealed since) whose row opens under
        this instance's keys, still names the indexed subject and is live; their
        fingerprints are taken again."""
        if not record_ids:
            return set()
        ok: set[str] = set()
        for row in self._vault.rows.rows_by_ids(record_ids):  # type: ignore[attr-defined]
            try:
                plain = self._vault.open_row(row)
            except (IntegrityError, KeyUnavailable):  # (Unlisted, Shredded): not servable
                continue
            if plain.subject_id == self._subjects.get(row.record_id) and row.expiry_us > now_us:
                self._index.shorten({row.record_id: row.expiry_us})
                self._fingerprints[row.record_id] = snapshot.fingerprint(row)
                ok.add(row.record_id)
        return ok

    @contextmanager
    def changing(self, record_ids: Sequence[str]) -> Iterator[None]:
        """Around a mutation that deletes or reseals these records: a search that meets
        their rows mid-change drops or keeps them without reporting tampering."""
        ids = set(record_ids)
        self._changing |= ids
        try:
            yield
        finally:
            self._changing -= ids

    @contextmanager
    def resealing_all(self) -> Iterator[None]:
        """Around ``rotate_keys``, which reseals every row: the fingerprints are taken
        again from the rows once it committed, and no search meanwhile reports tampering."""
        with self.changing(list(self._fingerprints)):
            yield
            for batch in self._vault.rows.scan_headers():
                for row in batch:
                    if row.record_id in self._fingerprints:
                        self._fingerprints[row.record_id] = snapshot.fingerprint(row)

    def exclude(self, record_ids: Sequence[str]) -> None:
        """Rows a read refused (their subject's entry does not list them): counted."""
        self.integrity_failures.update(record_ids)

    def report_failure(self, record_id: str) -> None:
        """A row that failed authentication outside a scan (e.g. while a purge reseals
        it): excluded from search and counted like those found on open."""
        self.integrity_failures.add(record_id)

    def remember(self, rows: Sequence[RecordRow]) -> None:
        """Rows just committed (sealed or resealed) for records the index holds."""
        for row in rows:
            if self.accepts(row.subject_ref):
                self._fingerprints[row.record_id] = snapshot.fingerprint(row)

    def follow(self, changes: Sequence[tuple[int, str, str]], now_us: int) -> int:
        """Apply a batch of the shared store's change feed (another instance's writes, or
        this one's coming back): deleted records leave the index, new and resealed rows
        are read, authenticated and indexed (or re-indexed), rows already indexed as they
        are now are left alone. Returns how many records changed here."""
        final: dict[str, str] = {}
        for _, rid, op in changes:
            if rid:
                final[rid] = op
        gone = [rid for rid, op in final.items() if op == "del"]
        touched = [rid for rid, op in final.items() if op != "del"]
        current = {r.record_id: r for r in self._vault.rows.headers(touched)}
        stale = [rid for rid, row in current.items()
                 if self._fingerprints.get(rid) != snapshot.fingerprint(row)
                 and self.accepts(row.subject_ref)]
        vanished = [rid for rid in touched if rid not in current and rid in self._fingerprints]
        self.forget(gone + vanished)
        if stale:
            self._vault.forget_cached_entries()
            rows = self._vault.rows.rows_by_ids(stale)  # type: ignore[attr-defined]
            resealed = [r for r in rows if r.record_id in self._subjects]
            self._resealed(resealed, now_us)
            fresh = [r for r in rows if r.record_id not in self._subjects]
            _index_rows(self._index, self._subjects, self._fingerprints,
                        self._open_rows(fresh, now_us, self.shredded, self.integrity_failures))
        return len(gone) + len(vanished) + len(stale)

    def shorten(self, rows: Sequence[RecordRow]) -> None:
        """Rows just committed with an earlier expiry (a tighter policy): the index
        filters by it from now on, and candidates are confirmed against the new rows."""
        self._index.shorten({row.record_id: row.expiry_us for row in rows})
        self.remember([row for row in rows if row.record_id in self._fingerprints])

    def live_per_purpose(self) -> dict[str, int]:
        return {p: s["live"] for p, s in self._index.stats().get("purposes", {}).items()}

    def index_stats(self) -> dict[str, Any]:
        return self._index.stats()

    # --- measuring the index (tuning.py: index_health, tune_index) -----------------------

    @property
    def params(self) -> IndexParams:
        return self._params if self._params is not None else IndexParams()

    @property
    def tuned(self) -> dict[str, TunedEf]:
        """The efs in use from the last tuning (a copy)."""
        return dict(self._tuned)

    def use_tuning(self, tuned: dict[str, TunedEf]) -> None:
        """A tuning just committed (``Vault.save_index_tuning``): search with it now."""
        self._tuned = dict(tuned)
        self._index.set_tuned(self._tuned)

    def ef_of(self, purpose: str) -> tuple[int, str, int]:
        return self._index.ef_of(purpose)

    def graph_m(self, purpose: str) -> int:
        return self._index.graph_m(purpose)

    def sample_live(self, purpose: str, n: int, rng: np.random.Generator,
                    ) -> tuple[NDArray[np.float32], list[bytes]]:
        return self._index.sample_live(purpose, n, rng)

    def best_exact(self, units: NDArray[np.float32], purpose: str,
                   now_us: int) -> list[Hit | None]:
        return self._index.best_exact(units, purpose, now_us)

    def best_graph(self, units: NDArray[np.float32], purpose: str, now_us: int,
                   ef: int | None = None) -> tuple[list[Hit | None], float]:
        return self._index.best_graph(units, purpose, now_us, ef)

    # --- writes -------------------------------------------------------------------------

    @contextmanager
    def adding(self, record_ids: list[str], subject_refs: list[bytes], subject_ids: list[str],
               purposes: Sequence[str], expiry_us: int, units: NDArray[np.float32],
               progress: Progress | None = None) -> Iterator[None]:
        """Index records while the ``with`` body seals and commits them: the hnswlib insert
        runs in a worker meanwhile, and the records become searchable only when both have
        succeeded (see ``TemplateIndex.adding``)."""
        if self.partition is not None:  # the other partitions' instances index the rest
            keep = [i for i, ref in enumerate(subject_refs) if self.accepts(ref)]
            record_ids = [record_ids[i] for i in keep]
            subject_refs = [subject_refs[i] for i in keep]
            subject_ids = [subject_ids[i] for i in keep]
            units = units[keep]
        n = len(record_ids)
        if n == 0:
            yield
            return
        with self._index.adding(record_ids, subject_refs, [purposes] * n, [expiry_us] * n,
                                units, progress=progress, checked=True):
            yield
            self._subjects.update(zip(record_ids, subject_ids, strict=True))

    def accepts(self, subject_ref: bytes) -> bool:
        """Whether this instance indexes the subject (always, unless partitioned)."""
        return self.partition is None or in_partition(subject_ref, *self.partition)

    def mark_incomplete(self) -> None:
        """Rows committed that the index lacks: no snapshot may claim them covered."""
        self.incomplete = True
        self.drop_snapshot()

    def forget(self, record_ids: Sequence[str]) -> None:
        """Out of the index at once (vectors overwritten), and out of every table."""
        self._index.remove(record_ids)
        for rid in record_ids:
            self._subjects.pop(rid, None)
            self._fingerprints.pop(rid, None)
            self.shredded.discard(rid)
            self.integrity_failures.discard(rid)
            self.missing.discard(rid)

    def drop_snapshot(self) -> None:
        """After a key destruction the snapshot's key is gone: remove the file too."""
        if self._path is None:
            return
        with contextlib.suppress(OSError):  # its key is gone either way
            self._path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the baseline pass (before the connection closes), then clear."""
        self.baseline.stop()
        self.clear()

    def clear(self) -> None:
        self._index.clear()
        self._subjects.clear()
        self._fingerprints.clear()

    # --- building -----------------------------------------------------------------------

    def rebuild(self, now_us: int, progress: Progress | None = None) -> None:
        """Build a new index from the sealed rows, then swap it in: searches running
        meanwhile keep using the old one instead of seeing an empty or partial index.

        Every subject-key entry is opened first; a row its entry does not list is an
        integrity failure, and a listed record whose row is gone is counted missing."""
        index = TemplateIndex(self._vault.dim, self._params)
        index.set_tuned(self._tuned)
        subjects: dict[str, str] = {}
        fingerprints: dict[str, bytes] = {}
        shredded: set[str] = set()
        failures: set[str] = set()
        listed, present = self._vault.preload_subject_keys(), 0
        total, done = self._vault.rows.count(), 0
        # A two-stage pipeline: this thread decrypts batch i+1 (Python, holds the GIL)
        # while a worker inserts batch i into hnswlib (native, releases the GIL), so the
        # per-row decryption hides behind the graph build instead of adding to it.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="biotemplate-rebuild") as pool:
            pending: Future[None] | None = None
            try:
                for batch in self._vault.rows.scan():
                    items = self._open_rows(batch, now_us, shredded, failures)
                    present += self._listed(batch, items)
                    if pending is not None:
                        pending.result()
                        if progress is not None:  # rows indexed so far, not just read
                            progress(done, total)
                    pending = pool.submit(_index_rows, index, subjects, fingerprints, items)
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
        missing = self._vault.missing_rows() if present != listed else set()
        old = self._index
        self._index, self._subjects, self._fingerprints = index, subjects, fingerprints
        self.incomplete = False
        self.shredded, self.integrity_failures, self.missing = shredded, failures, missing
        old.clear()
        self.baseline.reset()

    def _listed(self, rows: Sequence[RecordRow], opened: Sequence[tuple[RecordRow, Plain]],
                ) -> int:
        """How many of ``rows`` their subject's entry lists (an opened row is listed)."""
        ok = {r.record_id for r, _ in opened}
        return len(ok) + sum(1 for r in rows if r.record_id not in ok
                             and self._vault.listed(r.subject_ref, r.record_id))

    def _open_rows(self, rows: Sequence[RecordRow], now_us: int, shredded: set[str],
                   failures: set[str]) -> list[tuple[RecordRow, Plain]]:
        """Decrypt rows for the index: shredded rows are counted and skipped, tampered
        ones are excluded and reported, expired ones are left out."""
        keep: list[tuple[RecordRow, Plain]] = []
        for row in rows:
            if self.partition is not None and not self.accepts(row.subject_ref):
                continue  # another partition's subject: not even decrypted
            try:
                plain = self._vault.open_row(row)
            except Shredded:
                shredded.add(row.record_id)
                continue
            except IntegrityError:
                failures.add(row.record_id)
                continue
            if row.expiry_us > now_us:
                keep.append((row, plain))
        return keep

    def load_snapshot(self, now_us: int) -> str:
        """Load the sealed snapshot, then bring it up to the rows: "loaded", "absent" or
        "rejected" (the file is deleted; the caller rebuilds).

        Every change made through the store is logged in the same transaction as the row
        (the ``changes`` table), so when the last change is still the one the snapshot
        covers and the row count agrees, no row was written since and nothing is read
        (an open then costs one decryption, not a pass over every row). Otherwise every
        row's clear header and AEAD tag is compared with the fingerprint the snapshot
        took: changed rows are re-read (and excluded if forged), rows that are gone are
        dropped. What this does not catch at open is in SECURITY.md."""
        if self._path is None or not self._path.exists():
            return "absent"
        try:
            with snapshot.opened(self._path, self._vault.keyring) as (seq, state):
                # subject ids and the indexed rows' fingerprints (None: no row when the
                # snapshot was taken) in the order of the index's record ids, so that
                # one str per id serves every table; the other rows' fingerprints packed
                ids, subject_ids = state["records"]["ids"], state.pop("subject_ids")
                taken = state.pop("fingerprints")
                rows, row_count = bytes(state.pop("rows")), int(state.pop("row_count"))
                failures = {str(x) for x in state.pop("integrity_failures")}
                shredded = {str(x) for x in state.pop("shredded")}
                missing = {str(x) for x in state.pop("missing", [])}
                if not (isinstance(ids, list) and len(ids) == len(subject_ids) == len(taken)
                        and set(map(type, subject_ids)) <= {str}
                        and set(map(type, taken)) <= {bytes, type(None)}):
                    raise ValueError("subject map or fingerprints")
                self._index.import_state(state)
        except (BiotemplateError, KeyError, TypeError, ValueError, AttributeError,
                OverflowError):
            self._index.clear()
            self.drop_snapshot()
            return "rejected"
        self._subjects = dict(zip(ids, subject_ids, strict=True))
        self._fingerprints = (dict(zip(ids, taken, strict=True)) if None not in taken else
                              {rid: fp for rid, fp in zip(ids, taken, strict=True) if fp})
        self.integrity_failures, self.shredded, self.missing = failures, shredded, missing
        db = self._vault.rows
        if db.last_change() != seq or db.count() != row_count:
            self._reconcile({**self._fingerprints, **snapshot.unpack_fingerprints(rows)},
                            now_us)
        self.baseline.reset()
        return "loaded"

    def _reconcile(self, seen: dict[str, bytes], now_us: int) -> None:
        """Bring a loaded snapshot up to the rows: re-read changed ones, forget gone ones."""
        db = self._vault.rows
        current: dict[str, bytes] = {}
        others: set[str] = set()  # another partition's rows: never read here
        for batch in db.scan_headers():
            for row in batch:
                current[row.record_id] = snapshot.fingerprint(row)
                if not self.accepts(row.subject_ref):
                    others.add(row.record_id)
        changed = [rid for rid, fp in current.items()
                   if seen.get(rid) != fp and rid not in others]
        gone = [rid for rid in seen if rid not in current]
        # gone but still listed in its subject's entry: removed behind the store's back
        vanished = {rid for rid in gone if (sid := self._subjects.get(rid)) is not None
                    and self._vault.listed(self._vault.subject_ref(sid), rid)}
        self.forget(gone + changed)
        self.missing = (self.missing - set(current)) | vanished
        rows = [r for r in (db.get(rid) for rid in changed) if r is not None]
        for stale in (self.integrity_failures, self.shredded):
            stale.intersection_update(current)
            stale.difference_update(changed)
        _index_rows(self._index, self._subjects, self._fingerprints,
                    self._open_rows(rows, now_us, self.shredded, self.integrity_failures))

    def write_snapshot(self, now_us: int, covered: int | None = None) -> tuple[int, int]:
        """Seal the index to ``index.snapshot``; returns (change seq covered, bytes).
        Expired vectors are overwritten first, so the file holds only live templates.

        On a shared store (``covered``: the last change the feed applied) the snapshot
        claims only what the index holds: its own fingerprints, stamped with that change,
        and no row count, so the next open always compares it with the rows and re-reads
        whatever changed since (another instance may have written meanwhile)."""
        if self._path is None:
            raise InvalidInput("this instance keeps no index snapshot (open it with "
                               "snapshot_dir= to keep one)")
        if self.incomplete:  # rows committed that the index failed to take
            self.rebuild(now_us)
        db = self._vault.rows
        seq = db.last_change() if covered is None else covered
        self._index.hide_expired(now_us)  # so export_state overwrites them
        state = self._index.export_state()
        subjects = self._subjects
        ids = state["records"]["ids"]
        if len(ids) != len(subjects) or not all(rid in subjects for rid in ids):
            raise BiotemplateError("the index and the subject map disagree: not sealed")
        state["subject_ids"] = [subjects[rid] for rid in ids]
        state["integrity_failures"] = sorted(self.integrity_failures)
        state["shredded"] = sorted(self.shredded)
        state["missing"] = sorted(self.missing)
        if covered is None:
            fingerprints = {row.record_id: snapshot.fingerprint(row)
                            for batch in db.scan_headers() for row in batch}
            state["row_count"] = len(fingerprints)
        else:  # only what the index applied; the rows are compared on the next open
            fingerprints = {rid: fp for rid in ids
                            if (fp := self._fingerprints.get(rid)) is not None}
            state["row_count"] = -1
        state["fingerprints"] = [fingerprints.pop(rid, None) for rid in ids]
        state["rows"] = snapshot.pack_fingerprints(fingerprints)  # the rows not indexed
        return seq, snapshot.write(self._path, self._vault.keyring, state, seq)

    def sweep(self) -> None:
        """Temp snapshots left by a killed process (sealed, but under a key that may be
        one erasure old): removed on open."""
        if self._path is not None:
            _files.sweep_temps(self._path)


def in_partition(subject_ref: bytes, i: int, n: int) -> bool:
    """Whether a subject falls in partition ``i`` of ``n``: its keyed ref is uniform, so
    its first eight bytes split subjects evenly and the same way on every instance."""
    return int.from_bytes(subject_ref[:8], "big") % n == i


def _index_rows(index: TemplateIndex, subjects: dict[str, str],
                fingerprints: dict[str, bytes], items: Sequence[tuple[RecordRow, Plain]],
                ) -> None:
    if not items:
        return
    units = normalised(np.stack([p.template for _, p in items]))
    index.add([r.record_id for r, _ in items], [r.subject_ref for r, _ in items],
              [r.purposes for r, _ in items], [r.expiry_us for r, _ in items], units,
              checked=True)
    for r, p in items:
        subjects[r.record_id] = p.subject_id
        fingerprints[r.record_id] = snapshot.fingerprint(r)
