"""TemplateStore: a short coordinator over the parts that own the store's state.

Who owns what (``docs/architecture.md`` draws it):

- the **vault** (``vault.py``): sealed rows, key state, sealed settings (policy);
- the **gallery** (``gallery.py``): the in-memory index and the record -> subject map;
- the **audit trail** (``audit.py``): the signed, hash-chained log in ``audit.db``;
- the **clock** (``clock.py``): the store's time, never running backwards.

This module holds no SQL, no crypto and no index code: it builds the parts (``create``,
``open``), hands them over as one :class:`~._calls.Parts`, and names the public calls.
The calls are ordered in one module per job, ``enrolment``, ``matching`` and
``retention``, each reading as: validate, decide, seal, commit, audit, retire key material:

- everything is validated first, so bad input never reaches a key, a row or the index;
- a refused call from a known caller is audited as refused, then raised (``_calls``);
- mutations write their rows and their audit entry in one records transaction, which
  commits only once the entry is written (if the audit fails, the rows roll back);
- key material a commit needs is saved before it, what it retires is destroyed after it.

One lock serialises mutations; searches take only the index's read lock. One writer per
store: a writable handle holds the folder's OS lock from open to close (``_calls``); a
read-only handle (``open(..., read_only=True)``) builds no index and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Self

from . import (
    _files,
    calibration,
    enrolment,
    matching,
    policy_change,
    reports,
    retention,
    rotation,
    shared,
    tuning,
)
from ._calls import Parts, Releasable, StoreLock, listish, writer_lock
from ._files import FileLock
from .audit import AuditEntry, AuditTrail, AuditView, Checkpoint
from .backends.postgres import is_url
from .calibration import CalibrationReport
from .clock import Clock, StoreClock, checked_clock, to_us
from .errors import BiotemplateError, IntegrityError, InvalidInput, StorageError, StoreExists
from .feed import Follower
from .gallery import SNAPSHOT, Gallery, Progress
from .index import IndexParams
from .keys import KeyProvider, check_key_location
from .policy import RetentionPolicy
from .results import (
    BackupReceipt,
    Confirmation,
    DeleteReceipt,
    ErasureReceipt,
    HoldReceipt,
    IndexReport,
    KeyReceipt,
    PolicyDiff,
    PolicyReceipt,
    PurgeReport,
    RecordView,
    RetentionReport,
    RotationReceipt,
    SearchResult,
    StoreStats,
    Verification,
)
from .tuning import IndexHealth, TuneReport
from .validation import as_template, as_templates, check_text
from .vault import KEYRING, RECORDS, Vault

AUDIT = "audit.db"


class TemplateStore:
    """An encrypted store of face templates with retention, purposes and open-set search.

    Create one with :meth:`create`, reopen it with :meth:`open`. The README states the
    contract; every public method audits before it returns.
    """

    def __init__(self, label: str, vault: Vault, trail: AuditTrail, clock: StoreClock,
                 index_params: IndexParams | None, snapshot_on_close: bool,
                 writer: Releasable | None, *, snapshot_path: Path | None = None,
                 partition: tuple[int, int] | None = None,
                 across: Callable[[bool], AbstractContextManager[None]] | None = None) -> None:
        self._label = label
        gallery = Gallery(vault, snapshot_path, index_params, partition)
        self._p = Parts(vault, gallery, trail, clock, writer, StoreLock(across))
        trail.generation = vault.generation  # every entry names the key state's generation
        self._snapshot_on_close = snapshot_on_close and snapshot_path is not None
        self._follower: Follower | None = None
        self.dim, self.model = vault.dim, vault.model
        self.audit = AuditView(trail, vault.audit_keys()[2])

    def __repr__(self) -> str:
        return f"TemplateStore({self._label!r}, dim={self.dim}, model={self.model!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a TemplateStore cannot be pickled")

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, dim: int, model: str,
               policy: RetentionPolicy, key_provider: KeyProvider, clock: Clock | None = None,
               index_params: IndexParams | None = None,
               snapshot_on_close: bool = True) -> TemplateStore:
        """Create a new store in ``path`` (a folder; created if missing, must hold no store).

        Raises:
            StoreExists: the folder already holds a store (or part of one).
            StoreLocked: another handle is creating or has opened a store there.
            InvalidInput: bad dim, model, policy or clock.
            KeyUnavailable: the key provider cannot supply the master key.

        ``path`` may be a PostgreSQL URL instead (``postgresql://user@host/db?schema=NAME``,
        the ``postgres`` extra): the store is then created in that schema (which must not
        exist) and this handle is its first instance (see :meth:`open`).
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
            raise InvalidInput("dim must be an int between 1 and 65536")
        check_text(model, "model", limit=128)
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy (use from_toml/from_dict)")
        if is_url(path):
            return shared.create(cls, str(path), dim=dim, model=model, policy=policy,
                                 key_provider=key_provider, clock=clock,
                                 index_params=index_params)
        folder = Path(path)
        store_clock = StoreClock(checked_clock(clock))
        if (folder / AUDIT).exists():
            raise StoreExists(f"{folder} already holds a store (or part of one)")
        check_key_location(key_provider, folder)  # not in the folder, not via a link
        kek = key_provider.master_key()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)  # also when it existed: the folder holds the store's files only
        writer = writer_lock(folder)  # before anything in the folder is written
        try:
            vault = Vault.create(folder, kek=kek, dim=dim, model=model, policy=policy,
                                 clock=store_clock)
        except BaseException:
            writer.release()
            raise
        try:
            trail = _audit_trail(folder, vault, store_clock, create=True)
        except BaseException:
            vault.close()
            _files.remove_all([folder / RECORDS, folder / KEYRING])  # no half-made store
            writer.release()
            raise
        return cls(str(folder), vault, trail, store_clock, index_params, snapshot_on_close,
                   writer, snapshot_path=folder / SNAPSHOT)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, key_provider: KeyProvider,
             clock: Clock | None = None, index_params: IndexParams | None = None,
             snapshot_on_close: bool = True, progress: Progress | None = None,
             checkpoint: Checkpoint | None = None, read_only: bool = False,
             partition: tuple[int, int] | None = None,
             snapshot_dir: str | os.PathLike[str] | None = None,
             poll_interval: float = 0.5) -> TemplateStore:
        """Open an existing store. The index comes from the sealed snapshot when one is
        valid for the current epoch and erasure generation (rows changed since are
        re-read), else it is rebuilt from the sealed rows.

        The keyring, ``records.db`` and ``audit.db`` each carry the generation of the key
        state they have seen; a file put back from an older copy is refused. Given a
        ``checkpoint`` kept by a witness, a rollback of all three together is refused too.

        ``read_only=True`` is for auditors and reports, also beside a running writer: no
        writer lock, nothing written (no audit entry, keyring save, snapshot or database
        checkpoint), no index built, no template decrypted. It offers :meth:`stats`
        (``indexed``, ``purposes``, ``shredded_rows`` and ``integrity_failures`` stay
        empty: they come from decrypting) and ``audit.verify()``, ``audit.checkpoint()``
        (signed from the file's head now), ``audit.get()`` and ``audit.entries()``,
        :meth:`retention_report` and :attr:`policy`; every other call raises
        ``ReadOnlyStore``.

        ``path`` may be a PostgreSQL URL (``postgresql://user@host/db?schema=NAME``): then
        any number of handles, in any processes on any hosts, open the store at once, each
        an *instance* with its own index that follows the others' writes through the
        change feed (``feed.py``; ``poll_interval`` is its fallback poll). Such an instance
        may index only ``partition=(i, n)``, the subjects of partition i of n (merge the
        n partitions' answers with :func:`biotemplate.merge_results`), and may keep its
        sealed index snapshot in ``snapshot_dir`` (else it rebuilds on open).
        docs/scale-out.md has the guarantees.

        Raises:
            StoreNotFound: no store in ``path``.
            StoreLocked: another handle has the store open for writing (not raised with
                ``read_only=True``).
            KeyUnavailable: wrong master key.
            IntegrityError: the keyring, configuration or policy was tampered with, the
                keyring belongs to another store, a file is older than the others (the
                message names it), or the audit trail ends before ``checkpoint``.
        """
        if not isinstance(read_only, bool):
            raise InvalidInput("read_only must be True or False")
        if is_url(path):
            return shared.open(cls, str(path), key_provider=key_provider, clock=clock,
                               index_params=index_params, progress=progress,
                               checkpoint=checkpoint, read_only=read_only,
                               partition=partition, snapshot_dir=snapshot_dir,
                               poll_interval=poll_interval)
        if partition is not None or snapshot_dir is not None:
            raise InvalidInput("partition and snapshot_dir are for PostgreSQL stores; a "
                               "SQLite store has one index, in its folder")
        writer = None if read_only else writer_lock(Path(path))  # before anything is read
        try:
            return cls._open(path, key_provider, clock, index_params, snapshot_on_close,
                             progress, writer, checkpoint)
        except BaseException:
            if writer is not None:
                writer.release()
            raise

    @classmethod
    def _open(cls, path: str | os.PathLike[str], key_provider: KeyProvider,
              clock: Clock | None, index_params: IndexParams | None, snapshot_on_close: bool,
              progress: Progress | None, writer: FileLock | None,
              checkpoint: Checkpoint | None) -> TemplateStore:
        folder = Path(path)
        store_clock = StoreClock(checked_clock(clock))
        check_key_location(key_provider, folder)  # not in the folder, not via a link
        vault = Vault.open(folder, kek=key_provider.master_key(), clock=store_clock,
                           read_only=writer is None)
        try:
            trail = _audit_trail(folder, vault, store_clock, create=False,
                                 read_only=writer is None)
            try:
                last = trail.last()
                lost = _check_audit_generation(trail, vault, last, checkpoint)
            except BaseException:
                trail.close()
                raise
        except BaseException:
            vault.close()
            raise
        if last is not None:  # the clock never runs back past what the audit has seen
            store_clock.raise_to(to_us(last.ts_end))
        store = cls(str(folder), vault, trail, store_clock, index_params, snapshot_on_close,
                    writer, snapshot_path=folder / SNAPSHOT)
        if writer is None:  # read-only: no index, no temp swept, no entry written
            return store
        store._load_index(progress=progress, lost=lost, last=last)
        return store

    def _load_index(self, *, progress: Progress | None, lost: AuditEntry | None,
                    last: AuditEntry | None) -> None:
        """Build the index on open (snapshot or rebuild) and audit what open found."""
        store, trail, vault = self, self._p.trail, self._p.vault
        store_clock = self._p.clock
        gallery = store._p.gallery
        gallery.sweep()
        source = gallery.load_snapshot(store_clock.now_us())
        if source == "rejected":
            trail.append("snapshot", actor=None, outcome="error", action="rejected")
        if source != "loaded":
            gallery.rebuild(store_clock.now_us(), progress)
        store._report_integrity()
        if vault.moved_subject_keys:
            trail.append("migrate", actor=None, subject_keys=vault.moved_subject_keys)
        if vault.rolled_forward:
            trail.append("rollforward", actor=None, lost_subject_keys=vault.lost_subject_keys)
        if lost is None and last is not None and not trail.atomic_with_records:
            lost = _uncommitted_change(trail, vault, last)
        if lost is not None:
            trail.append("rollback", actor=None, ref_seq=lost.seq, of=lost.event)
        fields: dict[str, Any] = {} if gallery.partition is None else {
            "partition": list(gallery.partition)}
        trail.append("open", actor=None, records=len(gallery),
                     index="snapshot" if source == "loaded" else "rebuild",
                     integrity_failures=len(gallery.integrity_failures), **fields)

    def _report_integrity(self) -> None:
        failures, missing = self._p.gallery.integrity_failures, self._p.gallery.missing
        if failures or missing:
            self._p.trail.append("integrity", actor=None, outcome="error", count=len(failures),
                               record_ids=sorted(failures)[:100], missing=len(missing),
                               missing_ids=sorted(missing)[:100])

    def close(self) -> None:
        """Audit the close, make the audit durable, release files and the writer lock.
        Safe to call twice. A read-only handle only releases its files."""
        if self._p.closed:
            return
        if self._follower is not None:
            self._follower.stop()  # before the lock: it takes the lock per batch
        # A PostgreSQL instance's snapshot and "close" entry are its own: no need to stop
        # every instance's writers for them (the shared lock keeps its keys current).
        lock = self._p.lock.reading() if self._follower is not None else self._p.lock
        try:
            with lock:  # (on PostgreSQL this may fail: the files are released anyway)
                if self._p.closed:
                    return
                if self._snapshot_on_close and not self._p.gallery.incomplete:  # else: rebuilt
                    try:
                        self.snapshot()
                    except BiotemplateError:
                        pass  # an optimisation (the next open rebuilds), refused read-only
                if self._p.writer is not None:
                    self._p.trail.append("close", actor=None)
        finally:
            if not self._p.closed:
                self._p.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- enrolment ----------------------------------------------------------------------

    def enroll(self, template: object, *, subject_id: str, purposes: Sequence[str],
               ttl: timedelta | None = None, source: str | None = None,
               metadata: dict[str, Any] | None = None, actor: str) -> str:
        """Enrol one template; returns its record id.

        Raises:
            InvalidTemplate: wrong dim, NaN/inf, zero vector, 2-D input.
            PolicyViolation: unknown/empty purposes, TTL over the limit or missing, source
                not allowed. Nothing is written.
        """
        with self._p.audited("enroll", actor, purposes=listish(purposes)) as f:
            vec = as_template(template, self.dim)[None, :]
            return enrolment.enroll(self._p, vec, [subject_id], purposes, ttl, source,
                                    metadata, str(actor), f)[0]

    def enroll_many(self, templates: object, *, subject_ids: Sequence[str],
                    purposes: Sequence[str], ttl: timedelta | None = None,
                    source: str | None = None, metadata: dict[str, Any] | None = None,
                    actor: str, progress: Progress | None = None) -> list[str]:
        """Enrol a batch in one transaction: all rows or none. Returns the record ids.

        Raises:
            InvalidTemplate: a row is bad (the message names the first bad row).
            InvalidInput: ``subject_ids`` does not match the batch.
            PolicyViolation: as :meth:`enroll`.
        """
        with self._p.audited("enroll", actor, purposes=listish(purposes)) as f:
            vecs = as_templates(templates, self.dim)
            if isinstance(subject_ids, str) or not isinstance(subject_ids, Sequence):
                raise InvalidInput("subject_ids must be a list of strings, one per row")
            if len(subject_ids) != len(vecs):
                raise InvalidInput(f"{len(subject_ids)} subject_ids for {len(vecs)} templates")
            return enrolment.enroll(self._p, vecs, list(subject_ids), purposes, ttl, source,
                                    metadata, str(actor), f, progress)

    # --- matching -----------------------------------------------------------------------

    def search(self, probe: object, *, purpose: str, k: int = 10, actor: str,
               reason: str | None = None, mode: str = "identification") -> SearchResult:
        """1:N search among the live records enrolled for ``purpose``.

        Open-set: in "identification" mode only candidates at or above the purpose's
        threshold are returned (often none); "investigation" returns up to k, each marked.
        At most one candidate per subject; ``k`` is capped by the purpose's max_candidates.

        Raises:
            InvalidTemplate: bad probe. InvalidInput: bad k or mode.
            PolicyViolation: unknown purpose, or the mode is not allowed for it.
        """
        return matching.search(self._p, probe, purpose, k, actor, reason, mode, batch=False)[0]

    def search_many(self, probes: object, *, purpose: str, k: int = 10, actor: str,
                    reason: str | None = None, mode: str = "identification",
                    ) -> list[SearchResult]:
        """:meth:`search` for a batch of probes (shape (n, dim)), one result per probe,
        using the index's multi-threaded batch query. Audited as one entry per probe, so
        each result's ``audit_seq`` works with :meth:`confirm_match`.

        Raises:
            As :meth:`search`; a bad row fails the whole batch before anything is searched.
        """
        return matching.search(self._p, probes, purpose, k, actor, reason, mode, batch=True)

    def verify(self, probe: object, *, subject_id: str, purpose: str, actor: str,
               reason: str | None = None) -> Verification:
        """1:1: compare a probe with the subject's live records for ``purpose`` (best score).

        Raises:
            RecordNotFound: the subject has no live record for this purpose.
            PolicyViolation: unknown purpose or verification not allowed for it.
            IntegrityError: one of the subject's records was tampered with.
        """
        return matching.verify(self._p, probe, subject_id=subject_id, purpose=purpose,
                               actor=actor, reason=reason)

    def confirm_match(self, audit_seq: int, record_id: str, *, reviewer: str) -> Confirmation:
        """Record a human reviewer's confirmation of a candidate of search ``audit_seq``.

        Raises:
            RecordNotFound: no search with that audit sequence number.
            PolicyViolation: ``record_id`` was not a candidate of that search.
        """
        return matching.confirm_match(self._p, audit_seq, record_id, reviewer=reviewer)

    def export_subject(self, subject_id: str, *, actor: str,
                       reason: str | None = None) -> list[RecordView]:
        """Decrypt a subject's live (or held) records for an access request. Unknown
        subjects give ``[]``.

        Raises:
            IntegrityError: one of the subject's records was tampered with.
        """
        return matching.export_subject(self._p, subject_id, actor=actor, reason=reason)

    # --- retention ----------------------------------------------------------------------

    def delete(self, record_id: str, *, actor: str, reason: str | None = None) -> DeleteReceipt:
        """Delete one record at once (hidden from search before this returns).

        Raises:
            RecordNotFound: no such record. PolicyViolation: its subject is under legal hold.
        """
        return retention.delete(self._p, record_id, actor=actor, reason=reason)

    def erase_subject(self, subject_id: str, *, actor: str,
                      reason: str | None = None) -> ErasureReceipt:
        """Erase every record of a subject and destroy its key (crypto-shredding): copies
        of the database taken before this call can no longer be read for this subject.

        Raises:
            PolicyViolation: the subject is under legal hold.
        """
        return retention.erase_subject(self._p, subject_id, actor=actor, reason=reason)

    def purge_expired(self) -> PurgeReport:
        """Shred every expired record not under legal hold, and advance the epoch ratchet
        so the keys of past epochs are gone (old database copies stay unreadable)."""
        return retention.purge_expired(self._p)

    def place_hold(self, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
        """Put a subject under legal hold: its records survive purges (resealed under a
        hold key), stay exportable, and cannot be erased or deleted until released.

        Raises:
            RecordNotFound: the subject has no record.
        """
        return retention.place_hold(self._p, subject_id, actor=actor, reason=reason)

    def release_hold(self, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
        """Lift a legal hold. Records still within retention go back under their epoch key;
        expired ones are shredded at the next purge.

        Raises:
            PolicyViolation: the subject is not under legal hold.
        """
        return retention.release_hold(self._p, subject_id, actor=actor, reason=reason)

    def set_policy(self, policy: RetentionPolicy, *, actor: str,
                   reason: str | None = None) -> PolicyReceipt:
        """Replace the retention policy (audited). The epoch length is fixed at creation.

        A tighter policy applies to what is stored: a record tagged with a purpose whose
        ``max_retention`` is shortened (or which is removed: a limit of zero) gets the
        expiry ``created + smallest max_retention of its purposes`` when that is earlier,
        or expires at once when that moment has passed. Those records are resealed, and
        their subjects' buckets rotated (older copies of records.db no longer open them),
        in the transaction that stores the policy; the receipt and the audit entry count
        them. A looser policy never extends a stored record. :meth:`policy_diff` shows the
        effect first.

        Raises:
            PolicyViolation: a different epoch length.
        """
        return retention.set_policy(self._p, policy, actor=actor, reason=reason)

    def policy_diff(self, policy: RetentionPolicy) -> PolicyDiff:
        """What :meth:`set_policy` would change now, changing nothing: the fields that
        differ per purpose, and how many stored records it would shorten or expire.
        Decrypts the rows of the purposes it tightens (their creation time is sealed),
        so it needs the writable handle; not audited (it returns counts only).

        Raises:
            InvalidInput: ``policy`` is not a RetentionPolicy.
            ReadOnlyStore: the handle is read-only.
        """
        self._p.alive()
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy")
        with self._p.lock:
            return policy_change.diff(self._p.vault, policy, self._p.clock.now_us())

    def retention_report(self, now: datetime | None = None) -> RetentionReport:
        """Per purpose: live records, how many expire within 24 h / 7 d / 30 d of ``now``
        (default: the store's clock), the oldest and latest expiry, held records, what
        the next purge would shred, and records beyond the policy's limit.

        Read from the rows' clear headers and the keyring's holds: nothing is decrypted,
        so it works on a read-only handle (beside a running writer). Not audited: it
        names no subject and no record.

        Raises:
            InvalidInput: ``now`` is not a timezone-aware datetime.
        """
        self._p.alive(needs_writer=False)
        if now is None:
            now_us = self._p.clock.now_us()
        elif isinstance(now, datetime) and now.utcoffset() is not None:
            now_us = to_us(now)
        else:
            raise InvalidInput("now must be a timezone-aware datetime (UTC)")
        with self._p.lock:
            return reports.retention_report(self._p.vault, now_us)

    def rotate_master_key(self, new_key_provider: KeyProvider, *, actor: str) -> KeyReceipt:
        """Seal the key state under a new master key; no record is re-encrypted (they are
        sealed under keys the key state holds, not under the master key). Afterwards the
        old master key opens nothing in the store folder; keyring backups made before
        stay sealed under it (destroy them, or keep them as long as the old key).

        The audit entry (naming both keys by a keyed id, never the keys) is written
        first: if the process dies before the new keyring is in place, the next open
        sees the store still under the old key and appends a "rollback" entry.

        Raises:
            KeyUnavailable: the new provider cannot supply a key.
            InvalidInput: the new key is the current one.
        """
        return rotation.rotate_master_key(self._p, new_key_provider, actor=actor)

    def rotate_keys(self, *, actor: str, progress: Progress | None = None) -> RotationReceipt:
        """Post-compromise security: records enrolled after this call cannot be opened
        with any copy of the key state taken before it (a leaked keyring and its master
        key). Every readable record is resealed under a fresh ratchet state, every held
        one under a fresh hold key, and every subject-key entry under fresh bucket keys,
        in one transaction (crash-safe: completed or undone on the next open). Costs about
        a rebuild: O(records) decryptions and seals, O(subjects) rewraps; searches wait
        for the transaction. The lookup key (subject refs) is not rotated.

        ``progress(done, total)`` is called per batch of rows.
        """
        return rotation.rotate_keys(self._p, actor=actor, progress=progress)

    @property
    def policy(self) -> RetentionPolicy:
        return self._p.vault.policy

    # --- accuracy (calibration.py, tuning.py) -------------------------------------------

    def calibrate(self, purpose: str, templates: object, labels: Sequence[str | int], *,
                  target_fmr: float | None = None, target_fpir: float | None = None,
                  actor: str) -> CalibrationReport:
        """Propose a threshold for ``purpose`` from a labelled set of this store's model's
        templates (``labels[i]`` names the person of row i): the lowest meeting
        ``target_fmr`` over the set's non-mated pairs and/or ``target_fpir`` over
        non-mated searches of the purpose's live gallery (the set's people must not be
        enrolled for it; each template is one audited search). Changes nothing: apply
        with ``set_policy(report.apply_to(store.policy), ...)``. See ``calibration.py``.

        Raises:
            InvalidInput: no target, a target outside (0, 1), bad labels, fewer than two
                templates, no non-mated pair for ``target_fmr``.
            InvalidTemplate: a bad template. PolicyViolation: unknown purpose, or
                ``target_fpir`` for a purpose that allows no 1:N search.
        """
        return calibration.calibrate(self._p, purpose, templates, labels, target_fmr,
                                     target_fpir, actor)

    def index_health(self, purpose: str | None = None, *, sample: int = 1000, actor: str,
                     seed: int | None = None) -> IndexHealth:
        """Measure how often the HNSW index misses a mate that exact search finds, per
        purpose (or every purpose with a sub-index), on ``sample`` of the store's own
        live templates perturbed like a second capture at the purpose's threshold; and
        the graph's latency at the ef in use. Flags a tuning the gallery has outgrown
        (> 2x). Templates stay in memory; the report and its audit entry hold counts
        and rates only. Mutations wait while it runs. See ``tuning.py``.

        Raises:
            PolicyViolation: unknown purpose. InvalidInput: bad sample or seed.
        """
        return tuning.index_health(self._p, purpose, sample, actor, seed)

    def tune_index(self, target_added_miss: float = 0.001, *, actor: str,
                   purpose: str | None = None, sample: int | None = None,
                   seed: int | None = None) -> TuneReport:
        """Pick, per purpose searched through a graph, the smallest ef whose added miss
        rate (as :meth:`index_health` measures it) is at or under the target with 95 %
        confidence (the Wilson interval's upper end); save it sealed with the store
        (audited), use it now and on every open, growing it with the gallery until the
        next tuning. Says when a larger M would likely be cheaper. ``sample`` defaults
        to 10 / target probes (about half yield a countable mate). ``auto_ef`` remains
        the starting point of an untuned purpose.

        Raises:
            InvalidInput: target not in (0, 1); bad sample or seed; the store was
                opened with a fixed ``IndexParams(ef_search=...)``.
            PolicyViolation: unknown purpose.
        """
        return tuning.tune_index(self._p, target_added_miss, purpose, sample, actor, seed)

    # --- operations ---------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike[str], *, actor: str) -> BackupReceipt:
        """Copy ``records.db`` and ``audit.db`` into the new folder ``dest`` with SQLite's
        online backup API (consistent copies of live databases; never copy the files).

        The keyring is deliberately not copied: back it up on its own short schedule
        (SECURITY.md), since a keyring copy is what could resurrect shredded records.

        Raises:
            StoreExists: ``dest`` exists.
        """
        with self._p.audited("backup", actor) as f:
            if self._follower is not None:
                raise StorageError("a PostgreSQL store is backed up with PostgreSQL's tools "
                                   "(pg_dump --schema, or base backups): see "
                                   "docs/scale-out.md")
            folder = Path(dest)
            try:
                folder.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                raise StoreExists(f"{folder} exists; a backup never overwrites") from None
            with self._p.lock:
                seq = self._p.trail.append("backup", actor=str(actor), **f)
                self._p.vault.backup(folder)
                self._p.trail.backup(folder / AUDIT)
            return BackupReceipt(path=folder, audit_seq=seq)

    def snapshot(self) -> IndexReport:
        """Write a sealed index snapshot now (also done on close). Expired vectors are
        overwritten before it is taken."""
        self._p.alive()
        with self._p.lock.reading() if self._follower is not None else self._p.lock:
            covered = None
            if self._follower is not None:  # a shared store: the index is what the feed
                self._follower.catch_up()   # applied, up to its sequence number
                covered = self._follower.seq
            seq, size = self._p.gallery.write_snapshot(self._p.clock.now_us(), covered)
            audit_seq = self._p.trail.append("snapshot", actor=None, seq=seq,
                                           records=len(self._p.gallery), bytes=size)
            return IndexReport(records=len(self._p.gallery), change_seq=seq, audit_seq=audit_seq)

    def rebuild_index(self, progress: Progress | None = None) -> IndexReport:
        """Rebuild the in-memory index from the sealed rows only.
        ``progress(done, total)`` is called per batch of rows."""
        self._p.alive()
        with self._p.lock:
            self._p.gallery.rebuild(self._p.clock.now_us(), progress)
            self._report_integrity()
            seq = self._p.trail.append("rebuild", actor=None, records=len(self._p.gallery))
            return IndexReport(records=len(self._p.gallery),
                               change_seq=self._p.vault.rows.last_change(), audit_seq=seq)

    def stats(self) -> StoreStats:
        """Counts and sizes for operators. No keys, templates or subject ids."""
        self._p.alive(needs_writer=False)
        with self._p.lock:  # a consistent picture, not one taken mid-mutation
            index, feed = self._p.gallery.index_stats(), self._follower
            return StoreStats(dim=self.dim, model=self.model, records=self._p.vault.rows.count(),
                              indexed=len(self._p.gallery),
                              shredded_rows=len(self._p.gallery.shredded),
                              integrity_failures=len(self._p.gallery.integrity_failures),
                              missing_rows=len(self._p.gallery.missing),
                              purposes=index["purposes"], index_params=index["params"],
                              feed_seq=None if feed is None else feed.seq,
                              feed_error=None if feed is None else feed.lag_error,
                              **self._p.vault.key_stats())


def _last_mutation(trail: AuditTrail, entry: AuditEntry) -> AuditEntry:
    """The newest entry that is not a read (searches may have been audited after it)."""
    for _ in range(256):
        if entry.event not in _READS or entry.seq <= 1:
            break
        entry = trail.get(entry.seq - 1)
    return entry


def _check_audit_generation(trail: AuditTrail, vault: Vault, last: AuditEntry | None,
                            checkpoint: Checkpoint | None) -> AuditEntry | None:
    """Cross-check audit.db with the key state (already checked against records.db).

    Every entry carries the generation the store had ("gen"; entries that stage a key
    change carry the one it gives). Returns the last entry if it announced a key change
    that never committed (a crash between the audit entry and the records commit: the
    audit must not overstate it). Raises IntegrityError naming the file that is older.
    """
    if checkpoint is not None:
        report = trail.verify(checkpoint=checkpoint)
        if not report.ok:
            raise IntegrityError("the audit trail does not reach the checkpoint (all of the "
                                 "store's files put back from an older copy?)")
    if last is None:
        return None
    found, kept = last.fields.get("gen"), vault.generation
    if not isinstance(found, int):
        return None  # a trail from before generations: the next entries carry them
    if found == kept:
        return None
    if found == kept + 1:
        entry = _last_mutation(trail, last)
        if (entry.event in _STAGING and entry.outcome == "ok"
                and entry.fields.get("gen") == found):
            return entry  # staged, audited, never committed
    if found > kept:
        raise IntegrityError(f"the keyring and records.db are older than audit.db "
                             f"(generation {kept} < {found}): were old copies put back?")
    raise IntegrityError(f"audit.db is older than the keyring and records.db (generation "
                         f"{found} < {kept}): was an old copy of audit.db put back?")


def _uncommitted_change(trail: AuditTrail, vault: Vault,
                        last: AuditEntry) -> AuditEntry | None:
    """A change the trail announced that never happened, for changes that move no key
    generation: an enrolment (checked by its first record id) and a master-key rotation
    (checked by the id of the key the store was just opened with)."""
    entry = _last_mutation(trail, last)
    f = entry.fields
    if entry.outcome != "ok":
        return None
    if entry.event == "enroll" and f.get("record_ids"):
        return None if vault.rows.get(str(f["record_ids"][0])) is not None else entry
    if entry.event == "rotate-master-key":
        return None if f.get("new_key") == vault.master_key_id else entry
    if entry.event == "tune-index" and isinstance(f.get("purposes"), dict):
        saved = vault.index_tuning()
        done = all(p in saved and saved[p].ef == v.get("ef") for p, v in f["purposes"].items())
        return None if done else entry
    return None


def _audit_trail(folder: Path, vault: Vault, clock: StoreClock, *, create: bool,
                 read_only: bool = False) -> AuditTrail:
    sign, verify, public = vault.audit_keys()
    if create:
        return AuditTrail.create(folder / AUDIT, store_id=vault.store_id, signer=sign,
                                 verifier=verify, clock=clock, public_key=public,
                                 mac=vault.audit_mac())
    return AuditTrail.open(folder / AUDIT, store_id=vault.store_id, signer=sign,
                           verifier=verify, clock=clock, public_key=public, read_only=read_only,
                           mac=vault.audit_mac())


# events whose entry stages a key change (it carries the generation the change gives)
_STAGING = frozenset({"delete", "erase", "purge", "hold", "release", "policy", "rotate-keys"})
_READS = frozenset({"search", "verify", "export", "confirm", "snapshot", "integrity",
                    "calibrate", "index-health",
                    "backup", "audit-key"})
