"""TemplateStore: a short coordinator over the parts that own the store's state.

Who owns what (``docs/architecture.md`` draws it):

- the **vault** (``vault.py``): sealed rows, key state, sealed settings (policy);
- the **gallery** (``gallery.py``): the in-memory index and the record -> subject map;
- the **audit trail** (``audit.py``): the signed, hash-chained log in ``audit.db``;
- the **clock** (``clock.py``): the store's time, never running backwards.

This module holds no SQL, no crypto and no index code. Each public method reads as the
ordering of its call: validate, decide, seal, commit, audit, then retire key material:

- everything is validated first, so bad input never reaches a key, a row or the index;
- a refused call from a known caller is audited as refused, then raised (``_calls``);
- mutations write their rows and their audit entry in one records transaction, which
  commits only once the entry is written (if the audit fails, the rows roll back);
- key material a commit needs is saved before it, what it retires is destroyed after it.

One lock serialises mutations; searches take only the index's read lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import numpy as np

from . import matching, sealing
from ._calls import audited, listish, subject_field
from .audit import AuditEntry, AuditTrail, AuditView
from .clock import Clock, StoreClock, checked_clock, from_us, to_us
from .codec import Plain
from .errors import (
    BiotemplateError,
    InvalidInput,
    PolicyViolation,
    RecordNotFound,
    StoreExists,
)
from .gallery import Gallery, Progress
from .index import IndexParams
from .keyring import epoch_of
from .keys import KeyProvider
from .policy import RetentionPolicy, format_duration
from .results import (
    BackupReceipt,
    Confirmation,
    DeleteReceipt,
    ErasureReceipt,
    HoldReceipt,
    IndexReport,
    PolicyReceipt,
    PurgeReport,
    RecordView,
    SearchResult,
    StoreStats,
    Verification,
)
from .validation import (
    MAX_SUBJECT_ID,
    as_template,
    as_templates,
    check_metadata,
    check_text,
    loggable_record_id,
    normalised,
    unit_template,
)
from .vault import KEYRING, RECORDS, Vault, policy_digest

AUDIT = "audit.db"
HOLD_REFUSAL = "the subject is under legal hold (GDPR Art. 17(3)(e))"


class TemplateStore:
    """An encrypted store of face templates with retention, purposes and open-set search.

    Create one with :meth:`create`, reopen it with :meth:`open`. The README states the
    contract; every public method audits before it returns.
    """

    def __init__(self, folder: Path, vault: Vault, trail: AuditTrail, clock: StoreClock,
                 index_params: IndexParams | None, snapshot_on_close: bool) -> None:
        self._folder, self._vault, self._trail, self._clock = folder, vault, trail, clock
        self._gallery = Gallery(vault, folder, index_params)
        self._lock = threading.RLock()  # serialises mutations (key state, rows)
        self._closed = False
        self._snapshot_on_close = snapshot_on_close
        self.dim, self.model = vault.dim, vault.model
        self.audit = AuditView(trail, vault.audit_keys()[2])

    def __repr__(self) -> str:
        return f"TemplateStore({str(self._folder)!r}, dim={self.dim}, model={self.model!r})"

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
            InvalidInput: bad dim, model, policy or clock.
            KeyUnavailable: the key provider cannot supply the master key.
        """
        folder = Path(path)
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
            raise InvalidInput("dim must be an int between 1 and 65536")
        check_text(model, "model", limit=128)
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy (use from_toml/from_dict)")
        store_clock = StoreClock(checked_clock(clock))
        if (folder / AUDIT).exists():
            raise StoreExists(f"{folder} already holds a store (or part of one)")
        kek = key_provider.master_key()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)  # also when it existed: the folder holds the store's files only
        vault = Vault.create(folder, kek=kek, dim=dim, model=model, policy=policy,
                             clock=store_clock)
        try:
            trail = _audit_trail(folder, vault, store_clock, create=True)
        except BaseException:
            vault.close()
            for name in (RECORDS, KEYRING):
                for suffix in ("", "-wal", "-shm"):
                    (folder / (name + suffix)).unlink(missing_ok=True)
            raise
        return cls(folder, vault, trail, store_clock, index_params, snapshot_on_close)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, key_provider: KeyProvider,
             clock: Clock | None = None, index_params: IndexParams | None = None,
             snapshot_on_close: bool = True, progress: Progress | None = None,
             ) -> TemplateStore:
        """Open an existing store. The index comes from the sealed snapshot when one is
        valid for the current epoch and erasure generation (rows changed since are
        re-read), else it is rebuilt from the sealed rows.

        Raises:
            StoreNotFound: no store in ``path``.
            KeyUnavailable: wrong master key.
            IntegrityError: the keyring, configuration or policy was tampered with, or the
                keyring belongs to another store.
        """
        folder = Path(path)
        store_clock = StoreClock(checked_clock(clock))
        vault = Vault.open(folder, kek=key_provider.master_key(), clock=store_clock)
        try:
            trail = _audit_trail(folder, vault, store_clock, create=False)
            last = trail.last()
        except BaseException:
            vault.close()
            raise
        if last is not None:  # the clock never runs back past what the audit has seen
            store_clock.raise_to(to_us(last.ts_end))
        store = cls(folder, vault, trail, store_clock, index_params, snapshot_on_close)
        gallery = store._gallery
        gallery.sweep()
        source = gallery.load_snapshot(store_clock.now_us())
        if source == "rejected":
            trail.append("snapshot", actor=None, outcome="error", action="rejected")
        if source != "loaded":
            gallery.rebuild(store_clock.now_us(), progress)
        store._report_integrity()
        lost = None if last is None else store._uncommitted(last)
        if lost is not None:
            trail.append("rollback", actor=None, ref_seq=lost.seq, of=lost.event)
        trail.append("open", actor=None, records=len(gallery),
                     index="snapshot" if source == "loaded" else "rebuild",
                     integrity_failures=len(gallery.integrity_failures))
        return store

    def _uncommitted(self, entry: AuditEntry) -> AuditEntry | None:
        """The last mutation the trail announced, if it never reached the records database.

        The audit entry is written before the records commit (fail closed), so a process
        killed between the two leaves an "ok" entry for a change that rolled back; the next
        open notices and says so in the trail, so the audit never overstates an erasure.
        """
        for _ in range(256):  # searches may have been audited after it: look past them
            if entry.event not in _READS or entry.seq <= 1:
                break
            entry = self._trail.get(entry.seq - 1)
        f, rows = entry.fields, self._vault.rows
        if entry.outcome != "ok":
            return None
        if entry.event == "enroll" and f.get("record_ids"):
            done = rows.get(str(f["record_ids"][0])) is not None
        elif entry.event == "delete" and isinstance(f.get("record_id"), str):
            done = rows.get(f["record_id"]) is None
        elif entry.event == "erase" and isinstance(f.get("subject_ref"), str):
            done = not rows.by_subject(bytes.fromhex(f["subject_ref"]))
        else:
            done = True
        return None if done else entry

    def _report_integrity(self) -> None:
        failures = self._gallery.integrity_failures
        if failures:
            self._trail.append("integrity", actor=None, outcome="error", count=len(failures),
                               record_ids=sorted(failures)[:100])

    def close(self) -> None:
        """Audit the close, make the audit durable, release files. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            if self._snapshot_on_close and not self._gallery.incomplete:  # else: rebuilt
                try:
                    self.snapshot()
                except BiotemplateError:
                    pass  # a snapshot is an optimisation: the next open rebuilds instead
            try:
                self._trail.append("close", actor=None)
            finally:
                self._closed = True
                self._gallery.clear()
                self._trail.close()
                self._vault.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _alive(self) -> None:
        if self._closed:
            raise InvalidInput("the store is closed")

    def _audited(self, event: str, actor: object, **fields: Any) -> Any:
        self._alive()
        return audited(self._trail, event, actor, **fields)

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
        with self._audited("enroll", actor, purposes=listish(purposes)) as f:
            vec = as_template(template, self.dim)[None, :]
            return self._enroll(vec, [subject_id], purposes, ttl, source, metadata,
                                str(actor), f)[0]

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
        with self._audited("enroll", actor, purposes=listish(purposes)) as f:
            vecs = as_templates(templates, self.dim)
            if isinstance(subject_ids, str) or not isinstance(subject_ids, Sequence):
                raise InvalidInput("subject_ids must be a list of strings, one per row")
            if len(subject_ids) != len(vecs):
                raise InvalidInput(f"{len(subject_ids)} subject_ids for {len(vecs)} templates")
            return self._enroll(vecs, list(subject_ids), purposes, ttl, source, metadata,
                                str(actor), f, progress)

    def _enroll(self, vecs: np.ndarray[Any, Any], subject_ids: list[str],
                purposes: Sequence[str], ttl: timedelta | None, source: str | None,
                metadata: dict[str, Any] | None, actor: str, fields: dict[str, Any],
                progress: Progress | None = None) -> list[str]:
        for sid in subject_ids:
            check_text(sid, "subject_id", limit=MAX_SUBJECT_ID)
        src = check_text(source, "source", optional=True)
        meta = check_metadata(metadata)
        vault = self._vault
        with self._lock:  # the policy is read under the lock set_policy changes it under
            policy = vault.policy
            ttl = policy.resolve_ttl(purposes, ttl)
            for name in purposes:
                if not policy.purpose(name).source_allowed(src):
                    raise PolicyViolation(f"this source is not allowed for purpose {name!r}")
            now_us = self._clock.now_us()
            expiry_us = now_us + ttl // timedelta(microseconds=1)
            refs = [vault.subject_ref(s) for s in subject_ids]
            ids = [sealing.random_id().hex() for _ in subject_ids]
            new_refs: set[bytes] = set()
            committed = False
            try:
                new_refs = vault.ensure_subject_keys(refs)  # keys first: rows need them
                # The index insert (native, in a worker) overlaps the sealing and the commit
                # (Python, here); the records become searchable only once both succeeded.
                with self._gallery.adding(ids, refs, subject_ids, purposes, expiry_us,
                                          normalised(vecs), progress):
                    rows = [vault.seal(record_id=rid, subject_ref=ref, purposes=purposes,
                                       expiry_us=expiry_us,
                                       plain=Plain(template=vec, subject_id=sid,
                                                   metadata=meta, source=src,
                                                   created_us=now_us))
                            for rid, vec, sid, ref in zip(ids, vecs, subject_ids, refs,
                                                          strict=True)]
                    with vault.transaction():
                        vault.insert(rows)
                        self._trail.append("enroll", actor=actor, count=len(rows),
                                           expires=expiry_us, source=src,
                                           record_ids=ids[:100], **fields)
                    committed = True
            except BaseException:
                if committed:  # rows the index lacks: no snapshot may claim them covered
                    self._gallery.mark_incomplete()
                else:  # uncommitted keys protect nothing; a purge sweeps them from disk
                    vault.forget_subject_keys(new_refs)
                raise
            return ids

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
        return self._search(probe, purpose, k, actor, reason, mode, batch=False)[0]

    def search_many(self, probes: object, *, purpose: str, k: int = 10, actor: str,
                    reason: str | None = None, mode: str = "identification",
                    ) -> list[SearchResult]:
        """:meth:`search` for a batch of probes (shape (n, dim)), one result per probe,
        using the index's multi-threaded batch query. Audited as one entry per probe, so
        each result's ``audit_seq`` works with :meth:`confirm_match`.

        Raises:
            As :meth:`search`; a bad row fails the whole batch before anything is searched.
        """
        return self._search(probes, purpose, k, actor, reason, mode, batch=True)

    def _search(self, probes: object, purpose: str, k: int, actor: str, reason: str | None,
                mode: str, *, batch: bool) -> list[SearchResult]:
        started = self._clock()
        with self._audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
            rule = matching.search_rule(self._vault.policy, purpose, mode, k, reason)
            units = (normalised(as_templates(probes, self.dim)) if batch
                     else unit_template(probes, self.dim)[None, :])
            lists = self._gallery.search(units, purpose, min(k, rule.max_candidates),
                                         self._clock.now_us())
            out = []
            for unit, hits in zip(units, lists, strict=True):
                cands, decision = matching.candidates(hits, rule, mode,
                                                      self._gallery.subject_of)
                seq = self._trail.append(
                    "search", actor=str(actor), started=started, durable=False, k=k,
                    threshold=rule.match_threshold, count=len(cands), decision=decision,
                    probe_digest=self._vault.probe_digest(unit),
                    record_ids=[c.record_id for c in cands],
                    scores=[round(c.score, 6) for c in cands], **f)
                out.append(SearchResult(candidates=cands, decision=decision,
                                        threshold=rule.match_threshold, mode=mode,
                                        purpose=rule.name, audit_seq=seq))
            return out

    def verify(self, probe: object, *, subject_id: str, purpose: str, actor: str,
               reason: str | None = None) -> Verification:
        """1:1: compare a probe with the subject's live records for ``purpose`` (best score).

        Raises:
            RecordNotFound: the subject has no live record for this purpose.
            PolicyViolation: unknown purpose or verification not allowed for it.
            IntegrityError: one of the subject's records was tampered with.
        """
        started = self._clock()
        with self._audited("verify", actor, purpose=purpose, reason=reason) as f:
            check_text(reason, "reason", optional=True)
            check_text(subject_id, "subject_id", limit=MAX_SUBJECT_ID)
            rule = self._vault.policy.purpose(purpose)
            if not rule.allows_mode("verification"):
                raise PolicyViolation(f"purpose {purpose!r} does not allow verification")
            unit = unit_template(probe, self.dim)
            now_us, vault = self._clock.now_us(), self._vault
            scored = []
            for row in vault.rows.by_subject(vault.subject_ref(subject_id)):
                if purpose not in row.purposes:
                    continue  # never decrypt data outside the declared purpose
                plain = vault.readable(row, now_us, for_export=False)
                if plain is not None:
                    scored.append((matching.cosine(plain.template, unit), row.record_id))
            if not scored:
                raise RecordNotFound(f"no live record of this subject for purpose {purpose!r}")
            score, record_id = max(scored, key=lambda s: s[0])
            match = score >= rule.match_threshold
            seq = self._trail.append("verify", actor=str(actor), started=started,
                                     durable=False, match=match, score=round(score, 6),
                                     record_ids=[record_id],
                                     probe_digest=vault.probe_digest(unit), **f)
            return Verification(match=match, score=score, record_id=record_id,
                                threshold=rule.match_threshold, audit_seq=seq)

    def confirm_match(self, audit_seq: int, record_id: str, *, reviewer: str) -> Confirmation:
        """Record a human reviewer's confirmation of a candidate of search ``audit_seq``.

        Raises:
            RecordNotFound: no search with that audit sequence number.
            PolicyViolation: ``record_id`` was not a candidate of that search.
        """
        with self._audited("confirm", reviewer, who="reviewer", search_seq=audit_seq,
                           record_id=loggable_record_id(record_id)):
            if isinstance(audit_seq, bool) or not isinstance(audit_seq, int):
                raise InvalidInput("audit_seq must be the int from SearchResult.audit_seq")
            if not 1 <= audit_seq < 1 << 63:
                raise RecordNotFound(f"no audit entry {audit_seq}")
            entry = self._trail.get(audit_seq)
            if entry.event != "search" or entry.outcome != "ok":
                raise RecordNotFound(f"audit entry {audit_seq} is not a completed search")
            if record_id not in entry.fields.get("record_ids", []):
                raise PolicyViolation(f"that record was not a candidate of search {audit_seq}")
            with self._lock:
                before = {e.actor for e in self._trail.find("confirm", audit_seq)
                          if e.outcome == "ok" and e.fields.get("record_id") == record_id}
                who = tuple(sorted({a for a in before if a} | {reviewer}))
                seq = self._trail.append("confirm", actor=reviewer, ref_seq=audit_seq,
                                         record_id=record_id, reviewers=len(who),
                                         two_person=len(who) >= 2)
            return Confirmation(search_seq=audit_seq, record_id=record_id, reviewers=who,
                                two_person_confirmed=len(who) >= 2, audit_seq=seq)

    def export_subject(self, subject_id: str, *, actor: str,
                       reason: str | None = None) -> list[RecordView]:
        """Decrypt a subject's live (or held) records for an access request. Unknown
        subjects give ``[]``.

        Raises:
            IntegrityError: one of the subject's records was tampered with.
        """
        with self._audited("export", actor, reason=reason) as f:
            check_text(reason, "reason", optional=True)
            ref = subject_field(self._vault, subject_id, f)
            now_us, vault, views = self._clock.now_us(), self._vault, []
            for row in vault.rows.by_subject(ref):
                plain = vault.readable(row, now_us, for_export=True)
                if plain is None:
                    continue
                views.append(RecordView(
                    record_id=row.record_id, subject_id=plain.subject_id,
                    template=plain.template.copy(), purposes=row.purposes,
                    expires_at=from_us(row.expiry_us), created_at=from_us(plain.created_us),
                    source=plain.source, metadata=dict(plain.metadata),
                    held=row.held and vault.held(ref)))
            self._trail.append("export", actor=str(actor), count=len(views), **f)
            return views

    # --- retention ----------------------------------------------------------------------

    def delete(self, record_id: str, *, actor: str, reason: str | None = None) -> DeleteReceipt:
        """Delete one record at once (hidden from search before this returns).

        Raises:
            RecordNotFound: no such record. PolicyViolation: its subject is under legal hold.
        """
        with self._audited("delete", actor, record_id=loggable_record_id(record_id),
                           reason=reason) as f:
            check_text(reason, "reason", optional=True)
            vault = self._vault
            with self._lock:
                well_formed = loggable_record_id(record_id) == record_id
                row = vault.rows.get(str(record_id)) if well_formed else None
                if row is None:
                    raise RecordNotFound("no record with that id")
                if vault.held(row.subject_ref):
                    raise PolicyViolation(HOLD_REFUSAL)
                with vault.transaction():
                    vault.delete([record_id])
                    seq = self._trail.append("delete", actor=str(actor), **f)
                self._gallery.forget([record_id])  # committed: out of the index first
                last = not vault.rows.by_subject(row.subject_ref)
                # the subject's last record: shred its key
                destroyed = last and self._shred([row.subject_ref]) > 0
                vault.checkpoint()
                return DeleteReceipt(record_id=record_id, subject_key_destroyed=destroyed,
                                     audit_seq=seq)

    def erase_subject(self, subject_id: str, *, actor: str,
                      reason: str | None = None) -> ErasureReceipt:
        """Erase every record of a subject and destroy its key (crypto-shredding): copies
        of the database taken before this call can no longer be read for this subject.

        Raises:
            PolicyViolation: the subject is under legal hold.
        """
        with self._audited("erase", actor, reason=reason) as f:
            check_text(reason, "reason", optional=True)
            vault = self._vault
            ref = subject_field(vault, subject_id, f)
            with self._lock:
                if vault.held(ref):
                    raise PolicyViolation(HOLD_REFUSAL)
                ids = [r.record_id for r in vault.rows.by_subject(ref)]
                with vault.transaction():
                    n = vault.delete(ids)
                    seq = self._trail.append("erase", actor=str(actor), count=n, **f)
                self._gallery.forget(ids)  # committed: out of the index before anything
                had_key = self._shred([ref]) > 0
                vault.checkpoint()
                return ErasureReceipt(subject_ref=ref.hex(), records_erased=n,
                                      key_destroyed=had_key, at=from_us(self._clock.now_us()),
                                      audit_seq=seq)

    def _shred(self, refs: list[bytes]) -> int:
        """Destroy subject keys after their rows' deletion committed, and the snapshot
        that their key destruction made unreadable anyway."""
        destroyed = self._vault.shred_subjects(refs)
        if destroyed:
            self._gallery.drop_snapshot()
        self._vault.save_keys()
        return destroyed

    def purge_expired(self) -> PurgeReport:
        """Shred every expired record not under legal hold, and advance the epoch ratchet
        so the keys of past epochs are gone (old database copies stay unreadable)."""
        self._alive()
        vault = self._vault
        with self._lock:
            now_us = self._clock.now_us()
            expired = vault.rows.expired(now_us)
            held = [r for r in expired if vault.held(r.subject_ref)]
            target = epoch_of(now_us, vault.epoch_us)
            doomed = {r.record_id for r in expired if not vault.held(r.subject_ref)}
            doomed |= {r.record_id for r in vault.rows.below_epoch(target)
                       if not vault.held(r.subject_ref)}
            strays = self._unsealed_for_hold()
            before = vault.ratchet_epoch
            with vault.transaction():
                vault.update(strays)
                n = vault.delete(sorted(doomed))
                seq = self._trail.append("purge", actor=None, count=n, held_retained=len(held),
                                         epoch_before=before, epoch_after=max(before, target))
            self._gallery.forget(sorted(doomed))  # committed: out of the index first
            if vault.advance_ratchet(target):
                self._gallery.drop_snapshot()
            # keys of subjects with no row left (last record purged, an interrupted enrol)
            gone = vault.shred_subjects(vault.orphan_subjects())
            if gone:
                self._gallery.drop_snapshot()
            vault.drop_released_holds()
            vault.save_keys()
            vault.checkpoint()
            return PurgeReport(purged=n, held_retained=len(held), epoch_before=before,
                               epoch_after=vault.ratchet_epoch, subject_keys_destroyed=gone,
                               at=from_us(now_us), audit_seq=seq)

    def _unsealed_for_hold(self) -> list[Any]:
        """Rows of held subjects still under an epoch key (an interrupted place_hold, or a
        pre-hold row put back), resealed under the hold key before a ratchet step can
        shred them: a legal hold must not depend on every earlier call having finished."""
        vault, out = self._vault, []
        for ref in vault.active_holds():
            for row in vault.rows.by_subject(ref):
                if not row.held and row.epoch >= vault.ratchet_epoch:
                    try:
                        out.append(vault.reseal(row, held=True))
                    except BiotemplateError:
                        self._gallery.integrity_failures.add(row.record_id)  # left out
        return out

    def place_hold(self, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
        """Put a subject under legal hold: its records survive purges (resealed under a
        hold key), stay exportable, and cannot be erased or deleted until released.

        Raises:
            RecordNotFound: the subject has no record.
        """
        with self._audited("hold", actor, reason=reason) as f:
            check_text(reason, "reason")
            vault = self._vault
            ref = subject_field(vault, subject_id, f)
            with self._lock:
                # Everything still readable is preserved, including records that expired
                # but were not purged yet: once a legal claim is known, data that still
                # exists must not be destroyed (the hold itself is audited with its reason).
                rows = [r for r in vault.rows.by_subject(ref)
                        if r.held or r.epoch >= vault.ratchet_epoch]
                if not rows:
                    raise RecordNotFound("the subject has no record to hold")
                previous = vault.open_hold(ref)  # the key is saved before rows use it
                try:
                    moved = [vault.reseal(r, held=True) for r in rows if not r.held]
                    with vault.transaction():
                        vault.update(moved)
                        seq = self._trail.append("hold", actor=str(actor), count=len(rows),
                                                 **f)
                except BaseException:
                    vault.restore_hold(ref, previous)
                    raise
                return HoldReceipt(subject_ref=ref.hex(), records=len(rows), active=True,
                                   audit_seq=seq)

    def release_hold(self, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
        """Lift a legal hold. Records still within retention go back under their epoch key;
        expired ones are shredded at the next purge.

        Raises:
            PolicyViolation: the subject is not under legal hold.
        """
        with self._audited("release", actor, reason=reason) as f:
            check_text(reason, "reason")
            vault = self._vault
            ref = subject_field(vault, subject_id, f)
            with self._lock:
                if not vault.held(ref):
                    raise PolicyViolation("the subject is not under legal hold")
                rows = [r for r in vault.rows.by_subject(ref) if r.held]
                back = [vault.reseal(r, held=False) for r in rows
                        if r.epoch >= vault.ratchet_epoch]
                with vault.transaction():
                    vault.update(back)
                    seq = self._trail.append("release", actor=str(actor), count=len(rows), **f)
                vault.close_hold(ref, still_sealed=len(back) < len(rows))
                vault.save_keys()
                return HoldReceipt(subject_ref=ref.hex(), records=len(rows), active=False,
                                   audit_seq=seq)

    def set_policy(self, policy: RetentionPolicy, *, actor: str,
                   reason: str | None = None) -> PolicyReceipt:
        """Replace the retention policy (audited). The epoch length is fixed at creation;
        existing records keep the expiry they were sealed with.

        Raises:
            PolicyViolation: a different epoch, or a purpose removed while records use it.
        """
        with self._audited("policy", actor, reason=reason) as f:
            check_text(reason, "reason", optional=True)
            if not isinstance(policy, RetentionPolicy):
                raise InvalidInput("policy must be a RetentionPolicy")
            current = self._vault.policy
            if policy.epoch != current.epoch:
                raise PolicyViolation("the epoch length is fixed when the store is created "
                                      f"({format_duration(current.epoch)})")
            with self._lock:  # no enrolment can slip in between the check and the change
                for name, live in self._gallery.live_per_purpose().items():
                    if name not in policy.purposes and live > 0:
                        raise PolicyViolation(f"purpose {name!r} still has live records")
                seq = self._vault.replace_policy(policy, lambda: self._trail.append(
                    "policy", actor=str(actor), policy=policy.to_dict(), **f))
                return PolicyReceipt(digest=policy_digest(policy).hex(), audit_seq=seq)

    @property
    def policy(self) -> RetentionPolicy:
        return self._vault.policy

    # --- operations ---------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike[str], *, actor: str) -> BackupReceipt:
        """Copy ``records.db`` and ``audit.db`` into the new folder ``dest`` with SQLite's
        online backup API (consistent copies of live databases; never copy the files).

        The keyring is deliberately not copied: back it up on its own short schedule
        (SECURITY.md), since a keyring copy is what could resurrect shredded records.

        Raises:
            StoreExists: ``dest`` exists.
        """
        with self._audited("backup", actor) as f:
            folder = Path(dest)
            try:
                folder.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                raise StoreExists(f"{folder} exists; a backup never overwrites") from None
            with self._lock:
                seq = self._trail.append("backup", actor=str(actor), **f)
                self._vault.backup(folder)
                self._trail.backup(folder / AUDIT)
            return BackupReceipt(path=folder, audit_seq=seq)

    def snapshot(self) -> IndexReport:
        """Write a sealed index snapshot now (also done on close). Expired vectors are
        overwritten before it is taken."""
        self._alive()
        with self._lock:
            seq, size = self._gallery.write_snapshot(self._clock.now_us())
            audit_seq = self._trail.append("snapshot", actor=None, seq=seq,
                                           records=len(self._gallery), bytes=size)
            return IndexReport(records=len(self._gallery), change_seq=seq, audit_seq=audit_seq)

    def rebuild_index(self, progress: Progress | None = None) -> IndexReport:
        """Rebuild the in-memory index from the sealed rows only.
        ``progress(done, total)`` is called per batch of rows."""
        self._alive()
        with self._lock:
            self._gallery.rebuild(self._clock.now_us(), progress)
            self._report_integrity()
            seq = self._trail.append("rebuild", actor=None, records=len(self._gallery))
            return IndexReport(records=len(self._gallery),
                               change_seq=self._vault.rows.last_change(), audit_seq=seq)

    def stats(self) -> StoreStats:
        """Counts and sizes for operators. No keys, templates or subject ids."""
        self._alive()
        with self._lock:  # a consistent picture, not one taken mid-mutation
            index = self._gallery.index_stats()
            return StoreStats(dim=self.dim, model=self.model, records=self._vault.rows.count(),
                              indexed=len(self._gallery),
                              shredded_rows=len(self._gallery.shredded),
                              integrity_failures=len(self._gallery.integrity_failures),
                              purposes=index["purposes"], index_params=index["params"],
                              **self._vault.key_stats())


def _audit_trail(folder: Path, vault: Vault, clock: StoreClock, *, create: bool) -> AuditTrail:
    sign, verify, _ = vault.audit_keys()
    factory = AuditTrail.create if create else AuditTrail.open
    return factory(folder / AUDIT, store_id=vault.store_id, signer=sign, verifier=verify,
                   clock=clock)


_READS = frozenset({"search", "verify", "export", "confirm", "snapshot", "integrity",
                    "backup"})
