"""TemplateStore: the orchestration of policy, keys, sealed rows, index and audit.

This module composes the others and holds no SQL and no crypto. Its job is ordering:

- validate everything first, so bad input never reaches a key, a row or the index;
- a refused call from a known caller is audited as refused, then raised;
- every call is audited before it returns: mutations write their rows and the audit
  entry in one records transaction, which only commits after the audit entry is written
  (if the audit write fails, the rows roll back: fail closed);
- key material that a commit will need (a new subject key, a hold key) is saved to the
  keyring before the commit; key material that a commit retires (an erased subject key,
  an old ratchet state) is destroyed right after it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import msgpack
import numpy as np

from . import records as rec
from . import sealing, snapshot
from .audit import AuditReport, AuditTrail, Checkpoint
from .backends.base import Backend, RecordRow
from .backends.sqlite import SQLiteBackend
from .codec import RecordCodec, Shredded
from .errors import (
    AuditError,
    BiotemplateError,
    IntegrityError,
    InvalidInput,
    PolicyViolation,
    RecordNotFound,
    StoreExists,
    StoreNotFound,
)
from .index import Hit, IndexParams, TemplateIndex
from .keys import KeyProvider, Keyring, SecretKey, epoch_of
from .policy import Purpose, RetentionPolicy, format_duration
from .results import (
    Candidate,
    Confirmation,
    ErasureReceipt,
    PurgeReport,
    SearchResult,
    Verification,
)

Clock = Callable[[], datetime]
RECORDS, AUDIT, KEYRING, SNAPSHOT = "records.db", "audit.db", "keyring", "index.snapshot"
Progress = Callable[[int, int], None]
SEARCH_MODES = ("identification", "investigation")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _to_us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


class AuditView:
    """The audit trail as callers see it: verify it, take checkpoints, read entries."""

    def __init__(self, trail: AuditTrail, public_key: bytes) -> None:
        self._trail = trail
        self.public_key = public_key  # Ed25519, raw 32 bytes: hand it to auditors

    def verify(self, checkpoint: Checkpoint | None = None) -> AuditReport:
        """Check chain, signatures and, given a checkpoint kept elsewhere, truncation."""
        return self._trail.verify(checkpoint=checkpoint)

    def checkpoint(self) -> Checkpoint:
        """A signed (seq, head hash): keep it outside this host (a witness)."""
        return self._trail.checkpoint()

    def get(self, seq: int) -> Any:
        return self._trail.get(seq)


class TemplateStore:
    """An encrypted store of face templates with retention, purposes and open-set search.

    Create one with :meth:`create`, reopen it with :meth:`open`. See DESIGN §2 and the
    README for the contract; every public method audits before it returns.
    """

    def __init__(self, *, path: Path, backend: Backend, keyring: Keyring,
                 master_key: SecretKey, policy: RetentionPolicy, dim: int, model: str,
                 audit: AuditTrail, clock: Clock, index_params: IndexParams | None,
                 snapshot_on_close: bool = True) -> None:
        self._path, self._db, self._keyring, self._kek = path, backend, keyring, master_key
        self._policy, self.dim, self.model, self._clock = policy, dim, model, clock
        self._codec = RecordCodec(keyring, model=model, dim=dim)
        self._index = TemplateIndex(dim, index_params)
        self._subjects: dict[str, str] = {}  # record id -> subject id, in memory only
        self._lock = threading.RLock()
        self._trail = audit
        self._high_water = keyring.high_water_us
        self._integrity_failures: set[str] = set()
        self._shredded: set[str] = set()  # rows whose key is gone (from old copies)
        self._closed = False
        self._snapshot_on_close = snapshot_on_close
        self.audit = AuditView(audit, sealing.signer_from_seed(keyring.audit_seed)[1])

    def __repr__(self) -> str:
        return f"TemplateStore({str(self._path)!r}, dim={self.dim}, model={self.model!r})"

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
        rec.check_text(model, "model", limit=128)
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy (use from_toml/from_dict)")
        clock = _checked_clock(clock)
        if any((folder / name).exists() for name in (RECORDS, AUDIT, KEYRING)):
            raise StoreExists(f"{folder} already holds a store (or part of one)")
        kek = key_provider.master_key()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        now_us = _to_us(clock())
        keyring = Keyring.new(os.urandom(sealing.STORE_ID_SIZE),
                              policy.epoch // timedelta(microseconds=1), now_us)
        created: list[Path] = []
        try:
            keyring.save(folder / KEYRING, kek)
            created.append(folder / KEYRING)
            db = SQLiteBackend.create(folder / RECORDS)
            created.append(folder / RECORDS)
            config = {"v": 1, "dim": dim, "model": model, "metric": "cosine",
                      "epoch_us": keyring.epoch_us}
            with db.transaction():
                db.put_meta("store_id", keyring.store_id)
                db.put_meta("config", _seal_meta(keyring, "config", config))
                db.put_meta("policy", _seal_meta(keyring, "policy", policy.to_dict()))
            audit = _open_audit(folder, keyring, clock, create=True)
            created.append(folder / AUDIT)
        except BaseException:
            for p in created:  # no half-made store left behind to block a retry
                for suffix in ("", "-wal", "-shm"):
                    Path(str(p) + suffix).unlink(missing_ok=True)
            raise
        return cls(path=folder, backend=db, keyring=keyring, master_key=kek, policy=policy,
                   dim=dim, model=model, audit=audit, clock=clock, index_params=index_params,
                   snapshot_on_close=snapshot_on_close)

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
        if not (folder / RECORDS).exists() or not (folder / KEYRING).exists():
            raise StoreNotFound(f"{folder} holds no biotemplate store")
        clock = _checked_clock(clock)
        kek = key_provider.master_key()
        keyring = Keyring.load(folder / KEYRING, kek)
        db = SQLiteBackend.open(folder / RECORDS)
        try:
            if db.get_meta("store_id") != keyring.store_id:
                raise IntegrityError("the keyring does not belong to this store")
            config = _open_meta(keyring, "config", db.get_meta("config"))
            policy = RetentionPolicy.from_dict(_open_meta(keyring, "policy",
                                                          db.get_meta("policy")))
            audit = _open_audit(folder, keyring, clock, create=False)
        except BaseException:
            db.close()
            raise
        store = cls(path=folder, backend=db, keyring=keyring, master_key=kek, policy=policy,
                    dim=int(config["dim"]), model=str(config["model"]), audit=audit,
                    clock=clock, index_params=index_params, snapshot_on_close=snapshot_on_close)
        last = audit.last()
        if last is not None:  # the clock never runs back past what the audit has seen
            store._high_water = max(store._high_water, _to_us(last.ts_end))
        source = "snapshot" if store._load_snapshot() else "rebuild"
        if source == "rebuild":
            store._load_index(progress)
        store._trail.append("open", actor=None, records=len(store._index), index=source,
                            integrity_failures=len(store._integrity_failures))
        return store

    def close(self) -> None:
        """Audit the close, make the audit durable, release files. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            if self._snapshot_on_close:
                try:
                    self.snapshot()
                except BiotemplateError:
                    pass  # a snapshot is an optimisation: the next open rebuilds instead
            try:
                self._trail.append("close", actor=None)
            finally:
                self._closed = True
                self._index.clear()
                self._subjects.clear()
                self._trail.close()
                self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _now_us(self) -> int:
        """The store's time: the injected clock, never allowed to run backwards."""
        now = _to_us(_checked_time(self._clock()))
        with self._lock:
            self._high_water = max(self._high_water, now)
            return self._high_water

    def _alive(self) -> None:
        if self._closed:
            raise InvalidInput("the store is closed")

    @contextmanager
    def _audited(self, event: str, actor: object, **fields: Any) -> Iterator[dict[str, Any]]:
        """Validate the actor, then audit a refusal if the body raises a policy/input error.

        The body fills the yielded dict with fields for its own success entry.
        """
        self._alive()
        who = rec.check_text(actor, "actor", limit=256)
        try:
            yield fields
        except AuditError:
            raise
        except BiotemplateError as exc:
            refused = isinstance(exc, InvalidInput | PolicyViolation | RecordNotFound)
            self._trail.append(event, actor=who, outcome="refused" if refused else "error",
                               error=type(exc).__name__, **_safe(fields))
            raise

    def _load_index(self, progress: Progress | None = None) -> None:
        now_us = self._now_us()
        self._index.clear()
        self._subjects.clear()
        self._integrity_failures.clear()
        self._shredded.clear()
        total, done = self._db.count(), 0
        for batch in self._db.scan():
            self._index_rows(self._open_rows(batch, now_us))
            done += len(batch)
            if progress is not None:
                progress(done, total)
        self._report_integrity()

    def _open_rows(self, rows: Sequence[RecordRow],
                   now_us: int) -> list[tuple[RecordRow, rec.Plain]]:
        """Decrypt rows for the index: shredded rows are counted and skipped, tampered
        ones are excluded and reported, expired ones are left out."""
        keep: list[tuple[RecordRow, rec.Plain]] = []
        for row in rows:
            try:
                plain = self._codec.open(row)
            except Shredded:
                self._shredded.add(row.record_id)
                continue
            except IntegrityError:
                self._integrity_failures.add(row.record_id)
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
        """Load the sealed snapshot, then re-read every row whose fingerprint changed
        since (new, resealed, edited offline) and drop rows that are gone. False (and the
        caller rebuilds) when there is no usable snapshot."""
        path = self._path / SNAPSHOT
        if not path.exists():
            return False
        try:
            _, state = snapshot.read(path, self._keyring)
            subjects = {str(k): str(v) for k, v in state.pop("subjects").items()}
            seen = {str(k): bytes(v) for k, v in state.pop("rows").items()}
            failures = {str(x) for x in state.pop("integrity_failures")}
            shredded = {str(x) for x in state.pop("shredded")}
            self._index.import_state(state)
        except (BiotemplateError, KeyError, TypeError, ValueError, AttributeError):
            self._index.clear()
            path.unlink(missing_ok=True)
            self._trail.append("snapshot", actor=None, outcome="error", action="rejected")
            return False
        self._subjects, self._integrity_failures, self._shredded = subjects, failures, shredded
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
        self._index_rows(self._open_rows(rows, self._now_us()))
        self._report_integrity()
        return True

    def snapshot(self) -> int:
        """Write a sealed index snapshot now (also done on close); returns the change
        sequence number it covers. Expired vectors are overwritten before it is taken."""
        self._alive()
        with self._lock:
            seq = self._db.last_change()
            state = self._index.export_state()
            state["subjects"] = dict(self._subjects)
            state["integrity_failures"] = sorted(self._integrity_failures)
            state["shredded"] = sorted(self._shredded)
            state["rows"] = {row.record_id: snapshot.fingerprint(row)
                             for batch in self._db.scan_headers() for row in batch}
            size = snapshot.write(self._path / SNAPSHOT, self._keyring, state, seq)
            self._trail.append("snapshot", actor=None, seq=seq, records=len(self._index),
                               bytes=size)
            return seq

    def _drop_snapshot(self) -> None:
        """After an erasure or a ratchet step the snapshot's key is gone: remove the file."""
        (self._path / SNAPSHOT).unlink(missing_ok=True)

    def _index_rows(self, items: Sequence[tuple[RecordRow, rec.Plain]],
                    progress: Progress | None = None) -> None:
        if not items:
            return
        vectors = rec.normalised(np.stack([p.template for _, p in items]))
        self._index.add([r.record_id for r, _ in items], [r.subject_ref for r, _ in items],
                        [r.purposes for r, _ in items], [r.expiry_us for r, _ in items],
                        vectors, progress=progress)
        for r, p in items:
            self._subjects[r.record_id] = p.subject_id

    def _save_keyring(self) -> None:
        self._keyring.high_water_us = max(self._keyring.high_water_us, self._high_water)
        self._keyring.save(self._path / KEYRING, self._kek)

    def _forget(self, record_ids: Sequence[str]) -> None:
        self._index.remove(record_ids)
        for rid in record_ids:
            self._subjects.pop(rid, None)
            self._shredded.discard(rid)
            self._integrity_failures.discard(rid)

    def _readable(self, row: RecordRow, now_us: int, *, for_export: bool) -> rec.Plain | None:
        """Open a row if policy lets this call see it; shredded rows read as absent."""
        held = row.held and self._keyring.held(row.subject_ref)
        if row.expiry_us <= now_us and not (for_export and held):
            return None
        try:
            return self._codec.open(row)
        except Shredded:
            return None

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
        with self._audited("enroll", actor, purposes=_listish(purposes)) as f:
            vec = rec.as_template(template, self.dim)[None, :]
            return self._enroll(vec, [subject_id], purposes, ttl, source, metadata,
                                str(actor), f)[0]

    def enroll_many(self, templates: object, *, subject_ids: Sequence[str],
                    purposes: Sequence[str], ttl: timedelta | None = None,
                    source: str | None = None, metadata: dict[str, Any] | None = None,
                    actor: str, progress: Progress | None = None) -> list[str]:
        """Enrol a batch in one transaction: all rows or none.

        Raises:
            InvalidTemplate: a row is bad (the message names the first bad row).
            InvalidInput: ``subject_ids`` does not match the batch.
            PolicyViolation: as :meth:`enroll`.
        """
        with self._audited("enroll", actor, purposes=_listish(purposes)) as f:
            vecs = rec.as_templates(templates, self.dim)
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
            rec.check_text(sid, "subject_id", limit=rec.MAX_SUBJECT_ID)
        ttl = self._policy.resolve_ttl(purposes, ttl)
        src = rec.check_text(source, "source", optional=True)
        for name in purposes:
            if not self._policy.purpose(name).source_allowed(src):
                raise PolicyViolation(f"source {src!r} is not allowed for purpose {name!r}")
        meta = rec.check_metadata(metadata)
        with self._lock:
            now_us = self._now_us()
            expiry_us = now_us + ttl // timedelta(microseconds=1)
            refs = [self._keyring.subject_ref(s) for s in subject_ids]
            new_refs = {r for r in refs if r not in self._keyring.subjects}
            for r in new_refs:
                self._keyring.subjects[r] = sealing.random_key()
            rows: list[RecordRow] = []
            try:
                if new_refs:
                    self._save_keyring()  # keys first: a committed row must be readable
                for vec, sid, ref in zip(vecs, subject_ids, refs, strict=True):
                    plain = rec.Plain(template=vec, subject_id=sid, metadata=meta,
                                      source=src, created_us=now_us)
                    rows.append(self._codec.seal(
                        record_id=os.urandom(16).hex(), subject_ref=ref, purposes=purposes,
                        expiry_us=expiry_us, held=self._keyring.held(ref), plain=plain))
                ids = [r.record_id for r in rows]
                with self._db.transaction():
                    self._db.insert(rows)
                    self._trail.append("enroll", actor=actor, count=len(rows),
                                       expires=expiry_us, source=src,
                                       record_ids=ids if len(ids) <= 100 else ids[:100],
                                       **fields)
            except BaseException:
                for r in new_refs:  # the orphan keys on disk are swept by the next purge
                    self._keyring.subjects.pop(r, None)
                raise
            live = [(r, rec.Plain(template=v, subject_id=s, metadata={}, source=None,
                                  created_us=now_us))
                    for r, v, s in zip(rows, vecs, subject_ids, strict=True)]
            self._index_rows(live, progress)
            return ids

    # --- search and verification ---------------------------------------------------------

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
        started = self._clock()
        with self._audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
            rule = self._search_rule(purpose, mode, k, reason)
            vec = rec.as_template(probe, self.dim)
            hits = self._index.search(rec.normalised(vec[None, :])[0], purpose,
                                      min(k, rule.max_candidates), self._now_us())
            return self._answer(vec, hits, rule, mode, k, str(actor), started, f)

    def search_many(self, probes: object, *, purpose: str, k: int = 10, actor: str,
                    reason: str | None = None, mode: str = "identification",
                    ) -> list[SearchResult]:
        """:meth:`search` for a batch of probes (shape (n, dim)), one result per probe,
        using the index's multi-threaded batch query. Audited as one entry per probe, so
        each result's ``audit_seq`` works with :meth:`confirm_match`.

        Raises:
            As :meth:`search`; a bad row fails the whole batch before anything is searched.
        """
        started = self._clock()
        with self._audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
            rule = self._search_rule(purpose, mode, k, reason)
            vecs = rec.as_templates(probes, self.dim)
            lists = self._index.search_many(rec.normalised(vecs), purpose,
                                            min(k, rule.max_candidates), self._now_us())
            return [self._answer(v, hits, rule, mode, k, str(actor), started, f)
                    for v, hits in zip(vecs, lists, strict=True)]

    def _search_rule(self, purpose: str, mode: str, k: object, reason: object) -> Purpose:
        rec.check_text(reason, "reason", optional=True)
        if mode not in SEARCH_MODES:
            raise InvalidInput(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        rule = self._policy.purpose(purpose)
        if not rule.allows_mode(mode):
            raise PolicyViolation(f"mode {mode!r} is not allowed for purpose {purpose!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput("k must be a positive int")
        return rule

    def _answer(self, vec: np.ndarray[Any, Any], hits: Sequence[Hit], rule: Purpose, mode: str,
                k: int, actor: str, started: datetime, fields: dict[str, Any]) -> SearchResult:
        """Apply the open-set rule to index hits, audit, and build the result."""
        t = rule.match_threshold
        if mode == "identification":
            hits = [h for h in hits if h.score >= t]
        # A record removed while this search ran has no subject any more: drop it.
        named = [(h, sid) for h in hits if (sid := self._subjects.get(h.record_id))]
        cands = [Candidate(record_id=h.record_id, subject_id=sid, score=float(h.score),
                           rank=i + 1, above_threshold=bool(h.score >= t))
                 for i, (h, sid) in enumerate(named)]
        decision = any(c.above_threshold for c in cands)
        seq = self._trail.append(
            "search", actor=actor, started=started, durable=False, k=k, threshold=t,
            count=len(cands), decision=decision, probe_digest=self._digest(vec),
            record_ids=[c.record_id for c in cands],
            scores=[round(c.score, 6) for c in cands], **fields)
        return SearchResult(candidates=cands, decision=decision, threshold=t, mode=mode,
                            purpose=rule.name, audit_seq=seq)

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
            rec.check_text(reason, "reason", optional=True)
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            rule = self._policy.purpose(purpose)
            if not rule.allows_mode("verification"):
                raise PolicyViolation(f"purpose {purpose!r} does not allow verification")
            vec = rec.normalised(rec.as_template(probe, self.dim)[None, :])[0]
            now_us = self._now_us()
            best: tuple[float, str] | None = None
            for row in self._db.by_subject(self._keyring.subject_ref(subject_id)):
                plain = self._readable(row, now_us, for_export=False)
                if plain is None or purpose not in row.purposes:
                    continue
                score = float(np.dot(rec.normalised(plain.template[None, :])[0], vec))
                if best is None or score > best[0]:
                    best = (score, row.record_id)
            if best is None:
                raise RecordNotFound(f"no live record of this subject for purpose {purpose!r}")
            score = max(-1.0, min(1.0, best[0]))
            match = score >= rule.match_threshold
            seq = self._trail.append("verify", actor=str(actor), started=started,
                                     durable=False, match=match, score=round(score, 6),
                                     record_ids=[best[1]], probe_digest=self._digest(vec),
                                     **f)
            return Verification(match=match, score=score, record_id=best[1],
                                threshold=rule.match_threshold, audit_seq=seq)

    def _digest(self, vec: np.ndarray[Any, Any]) -> bytes:
        """A keyed digest of the probe: links audit entries of one probe, reveals nothing."""
        data = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        return sealing.keyed_hash(self._keyring.digest_key, b"probe:" + data)

    def confirm_match(self, audit_seq: int, record_id: str, *, reviewer: str) -> Confirmation:
        """Record a human reviewer's confirmation of a candidate of search ``audit_seq``.

        Raises:
            RecordNotFound: no search with that audit sequence number.
            PolicyViolation: ``record_id`` was not a candidate of that search.
        """
        with self._audited("confirm", reviewer, ref_seq=audit_seq, record_id=record_id):
            if isinstance(audit_seq, bool) or not isinstance(audit_seq, int):
                raise InvalidInput("audit_seq must be the int from SearchResult.audit_seq")
            entry = self._trail.get(audit_seq)
            if entry.event != "search" or entry.outcome != "ok":
                raise RecordNotFound(f"audit entry {audit_seq} is not a completed search")
            if record_id not in entry.fields.get("record_ids", []):
                raise PolicyViolation(f"record {record_id!r} was not a candidate of "
                                      f"search {audit_seq}")
            with self._lock:
                before = {e.actor for e in self._trail.find("confirm", audit_seq)
                          if e.outcome == "ok" and e.fields.get("record_id") == record_id}
                who = tuple(sorted({a for a in before if a} | {reviewer}))
                seq = self._trail.append("confirm", actor=reviewer, ref_seq=audit_seq,
                                         record_id=record_id, reviewers=len(who),
                                         two_person=len(who) >= 2)
            return Confirmation(search_seq=audit_seq, record_id=record_id, reviewers=who,
                                two_person_confirmed=len(who) >= 2, audit_seq=seq)

    # --- deletion, erasure, purge, holds -------------------------------------------------

    def delete(self, record_id: str, *, actor: str, reason: str | None = None) -> None:
        """Delete one record at once (hidden from search before this returns).

        Raises:
            RecordNotFound: no such record. PolicyViolation: its subject is under legal hold.
        """
        with self._audited("delete", actor, record_id=record_id, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            with self._lock:
                row = self._db.get(record_id) if isinstance(record_id, str) else None
                if row is None:
                    raise RecordNotFound("no record with that id")
                if self._keyring.held(row.subject_ref):
                    raise PolicyViolation("the subject is under legal hold (GDPR Art. 17(3)(e))")
                with self._db.transaction():
                    self._db.delete([record_id])
                    self._trail.append("delete", actor=str(actor), **f)
                self._db.checkpoint()
                self._forget([record_id])
                if not self._db.by_subject(row.subject_ref):  # last record: shred the key
                    self._keyring.subjects.pop(row.subject_ref, None)
                    self._save_keyring()

    def erase_subject(self, subject_id: str, *, actor: str,
                      reason: str | None = None) -> ErasureReceipt:
        """Erase every record of a subject and destroy its key (crypto-shredding): copies
        of the database taken before this call can no longer be read for this subject.

        Raises:
            PolicyViolation: the subject is under legal hold.
        """
        with self._audited("erase", actor, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            with self._lock:
                ref = self._keyring.subject_ref(subject_id)
                f["subject_ref"] = ref.hex()
                if self._keyring.held(ref):
                    raise PolicyViolation("the subject is under legal hold (GDPR Art. 17(3)(e))")
                ids = [r.record_id for r in self._db.by_subject(ref)]
                with self._db.transaction():
                    n = self._db.delete(ids)
                    seq = self._trail.append("erase", actor=str(actor), count=n, **f)
                had_key = self._keyring.subjects.pop(ref, None) is not None
                self._keyring.holds.pop(ref, None)
                self._keyring.erasures += 1
                self._save_keyring()
                self._drop_snapshot()
                self._db.checkpoint()
                self._forget(ids)
                return ErasureReceipt(subject_ref=ref.hex(), records_erased=n,
                                      key_destroyed=had_key, at=_from_us(self._now_us()),
                                      audit_seq=seq)

    def purge_expired(self) -> PurgeReport:
        """Shred every expired record not under legal hold, and advance the epoch ratchet
        so the keys of past epochs are gone (old database copies stay unreadable)."""
        self._alive()
        with self._lock:
            now_us = self._now_us()
            expired = self._db.expired(now_us)
            doomed = [r for r in expired if not self._keyring.held(r.subject_ref)]
            held = [r for r in expired if self._keyring.held(r.subject_ref)]
            target = epoch_of(now_us, self._keyring.epoch_us)
            doomed_ids = {r.record_id for r in doomed}
            doomed_ids |= {r.record_id for r in self._db.below_epoch(target)}
            before = self._keyring.ratchet_epoch
            with self._db.transaction():
                n = self._db.delete(sorted(doomed_ids))
                seq = self._trail.append("purge", actor=None, count=n, held_retained=len(held),
                                         epoch_before=before, epoch_after=max(before, target))
            if self._keyring.advance(target):
                self._drop_snapshot()
            live_refs = self._db.subject_refs()
            gone = [r for r in self._keyring.subjects if r not in live_refs]
            for r in gone:  # orphan keys (last record purged, or an interrupted enrol)
                self._keyring.subjects.pop(r)
                self._keyring.holds.pop(r, None)
            for r, (_, active) in list(self._keyring.holds.items()):
                if not active and not any(x.held for x in self._db.by_subject(r)):
                    del self._keyring.holds[r]  # a released hold with nothing left under it
            self._save_keyring()
            self._db.checkpoint()
            self._forget(sorted(doomed_ids))
            return PurgeReport(purged=n, held_retained=len(held), epoch_before=before,
                               epoch_after=self._keyring.ratchet_epoch,
                               subject_keys_destroyed=len(gone), at=_from_us(now_us),
                               audit_seq=seq)

    def place_hold(self, subject_id: str, *, actor: str, reason: str) -> int:
        """Put a subject under legal hold: its records survive purges (resealed under a
        hold key), stay exportable, and cannot be erased or deleted until released.
        Returns how many records are held.

        Raises:
            RecordNotFound: the subject has no record.
        """
        with self._audited("hold", actor, reason=reason) as f:
            rec.check_text(reason, "reason")
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            with self._lock:
                ref = self._keyring.subject_ref(subject_id)
                f["subject_ref"] = ref.hex()
                rows = [r for r in self._db.by_subject(ref)
                        if r.held or r.epoch >= self._keyring.ratchet_epoch]
                if not rows:
                    raise RecordNotFound("the subject has no record to hold")
                previous = self._keyring.holds.get(ref)
                self._keyring.holds[ref] = (previous[0] if previous else sealing.random_key(),
                                            True)
                try:
                    self._save_keyring()
                    moved = [self._codec.reseal(r, held=True) for r in rows if not r.held]
                    with self._db.transaction():
                        self._db.update(moved)
                        self._trail.append("hold", actor=str(actor), count=len(rows), **f)
                except BaseException:
                    _restore(self._keyring.holds, ref, previous)
                    self._save_keyring()
                    raise
                return len(rows)

    def release_hold(self, subject_id: str, *, actor: str, reason: str) -> int:
        """Lift a legal hold. Records still within retention go back under their epoch key;
        expired ones are shredded at the next purge. Returns how many records were held.

        Raises:
            PolicyViolation: the subject is not under legal hold.
        """
        with self._audited("release", actor, reason=reason) as f:
            rec.check_text(reason, "reason")
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            with self._lock:
                ref = self._keyring.subject_ref(subject_id)
                f["subject_ref"] = ref.hex()
                if not self._keyring.held(ref):
                    raise PolicyViolation("the subject is not under legal hold")
                rows = [r for r in self._db.by_subject(ref) if r.held]
                back = [self._codec.reseal(r, held=False) for r in rows
                        if r.epoch >= self._keyring.ratchet_epoch]
                with self._db.transaction():
                    self._db.update(back)
                    self._trail.append("release", actor=str(actor), count=len(rows), **f)
                key = self._keyring.holds[ref][0]
                if len(back) == len(rows):
                    del self._keyring.holds[ref]  # nothing sealed under it: shred it
                else:
                    self._keyring.holds[ref] = (key, False)
                self._save_keyring()
                return len(rows)

    # --- access requests, policy, maintenance --------------------------------------------

    def export_subject(self, subject_id: str, *, actor: str,
                       reason: str | None = None) -> list[rec.RecordView]:
        """Decrypt a subject's live (or held) records for an access request. Unknown
        subjects give ``[]``.

        Raises:
            IntegrityError: one of the subject's records was tampered with.
        """
        with self._audited("export", actor, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            now_us = self._now_us()
            ref = self._keyring.subject_ref(subject_id)
            views = []
            for row in self._db.by_subject(ref):
                plain = self._readable(row, now_us, for_export=True)
                if plain is None:
                    continue
                views.append(rec.RecordView(
                    record_id=row.record_id, subject_id=plain.subject_id,
                    template=plain.template.copy(), purposes=row.purposes,
                    expires_at=_from_us(row.expiry_us), created_at=_from_us(plain.created_us),
                    source=plain.source, metadata=dict(plain.metadata),
                    held=row.held and self._keyring.held(ref)))
            self._trail.append("export", actor=str(actor), count=len(views),
                               subject_ref=ref.hex(), **f)
            return views

    def set_policy(self, policy: RetentionPolicy, *, actor: str,
                   reason: str | None = None) -> None:
        """Replace the retention policy (audited). The epoch length is fixed at creation;
        existing records keep the expiry they were sealed with.

        Raises:
            PolicyViolation: a different epoch, or a purpose removed while records use it.
        """
        with self._audited("policy", actor, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            if not isinstance(policy, RetentionPolicy):
                raise InvalidInput("policy must be a RetentionPolicy")
            if policy.epoch != self._policy.epoch:
                raise PolicyViolation("the epoch length is fixed when the store is created "
                                      f"({format_duration(self._policy.epoch)})")
            live = self._index.stats().get("purposes", {})
            for name, info in live.items():
                if name not in policy.purposes and info.get("live", 0) > 0:
                    raise PolicyViolation(f"purpose {name!r} still has live records")
            with self._lock, self._db.transaction():
                self._db.put_meta("policy", _seal_meta(self._keyring, "policy",
                                                       policy.to_dict()))
                self._trail.append("policy", actor=str(actor), policy=policy.to_dict(), **f)
                self._policy = policy

    @property
    def policy(self) -> RetentionPolicy:
        return self._policy

    def rebuild_index(self, progress: Progress | None = None) -> int:
        """Rebuild the in-memory index from the sealed rows only; returns records indexed.
        ``progress(done, total)`` is called per batch of rows."""
        self._alive()
        with self._lock:
            self._load_index(progress)
            self._trail.append("rebuild", actor=None, records=len(self._index))
            return len(self._index)

    def stats(self) -> dict[str, Any]:
        """Counts and sizes for operators. No keys, templates or subject ids."""
        self._alive()
        return {
            "dim": self.dim, "model": self.model, "records": self._db.count(),
            "indexed": len(self._index), "subjects": len(self._keyring.subjects),
            "held_subjects": sum(1 for _, a in self._keyring.holds.values() if a),
            "epoch": self._keyring.ratchet_epoch,
            "epoch_seconds": self._keyring.epoch_us // 1_000_000,
            "erasure_generation": self._keyring.erasures,
            "shredded_rows": len(self._shredded),
            "integrity_failures": len(self._integrity_failures),
            "index": self._index.stats(),
        }


# --- small helpers ----------------------------------------------------------------------


def _checked_time(t: object) -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise InvalidInput("the clock must return an aware datetime (UTC)")
    return t


def _checked_clock(clock: Clock | None) -> Clock:
    if clock is None:
        return _utc_now
    if not callable(clock):
        raise InvalidInput("clock must be a zero-argument callable returning a datetime")
    _checked_time(clock())
    return clock


def _seal_meta(keyring: Keyring, name: str, value: Any) -> bytes:
    """Configuration and policy are authenticated: editing them in the DB is detected."""
    key = sealing.hkdf(keyring.meta_key, info=b"biotemplate/v1/meta")
    body = msgpack.packb(value, use_bin_type=True)
    return sealing.seal(key, body, b"meta:" + name.encode() + b":" + keyring.store_id)


def _open_meta(keyring: Keyring, name: str, blob: bytes | None) -> Any:
    if blob is None:
        raise IntegrityError(f"store {name} is missing")
    key = sealing.hkdf(keyring.meta_key, info=b"biotemplate/v1/meta")
    body = sealing.open_sealed(key, blob, b"meta:" + name.encode() + b":" + keyring.store_id)
    return msgpack.unpackb(body, raw=False)


def _open_audit(folder: Path, keyring: Keyring, clock: Clock, *, create: bool) -> AuditTrail:
    sign, public = sealing.signer_from_seed(keyring.audit_seed)
    factory = AuditTrail.create if create else AuditTrail.open
    return factory(folder / AUDIT, store_id=keyring.store_id, signer=sign,
                   verifier=sealing.verifier_for(public), clock=clock)


def _listish(purposes: object) -> list[str]:
    if isinstance(purposes, list | tuple):
        return [p for p in purposes if isinstance(p, str)][:16]
    return []


def _safe(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields of a refused call, trimmed to audit-safe primitives."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            out[key] = value[:256]
        elif isinstance(value, int | float | bool) or value is None:
            out[key] = value
        elif isinstance(value, list):
            out[key] = [str(v)[:64] for v in value[:16]]
    return out


def _restore(holds: dict[bytes, tuple[bytes, bool]], ref: bytes,
             previous: tuple[bytes, bool] | None) -> None:
    if previous is None:
        holds.pop(ref, None)
    else:
        holds[ref] = previous
