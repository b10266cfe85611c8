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
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import msgpack
import numpy as np

from . import records as rec
from . import sealing
from ._core import (
    AUDIT,
    KEYRING,
    RECORDS,
    Clock,
    Progress,
    StoreClock,
    _checked_clock,
    _from_us,
    _to_us,
)
from ._indexing import Indexing
from ._matching import Matching
from ._retention import Retention
from .audit import AuditEntry, AuditTrail
from .backends.base import RecordRow
from .backends.sqlite import SQLiteBackend
from .errors import (
    BiotemplateError,
    IntegrityError,
    InvalidInput,
    PolicyViolation,
    StoreExists,
    StoreNotFound,
)
from .index import IndexParams
from .keys import KeyProvider, Keyring, SecretKey
from .policy import RetentionPolicy, format_duration


class TemplateStore(Matching, Retention, Indexing):
    """An encrypted store of face templates with retention, purposes and open-set search.

    Create one with :meth:`create`, reopen it with :meth:`open`. See DESIGN §2 and the
    README for the contract; every public method audits before it returns.
    """

    def __repr__(self) -> str:
        return f"TemplateStore({str(self._path)!r}, dim={self.dim}, model={self.model!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a TemplateStore cannot be pickled")

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
        store_clock = StoreClock(_checked_clock(clock))
        if any((folder / name).exists() for name in (RECORDS, AUDIT, KEYRING)):
            raise StoreExists(f"{folder} already holds a store (or part of one)")
        kek = key_provider.master_key()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)  # also when it existed: the folder holds the store's files only
        now_us = store_clock.now_us()
        keyring = Keyring.new(os.urandom(sealing.STORE_ID_SIZE),
                              policy.epoch // timedelta(microseconds=1), now_us)
        keyring.policies = [_policy_digest(policy)]
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
            audit = _open_audit(folder, keyring, store_clock, create=True)
            created.append(folder / AUDIT)
        except BaseException:
            for p in created:  # no half-made store left behind to block a retry
                for suffix in ("", "-wal", "-shm"):
                    Path(str(p) + suffix).unlink(missing_ok=True)
            raise
        return cls(path=folder, backend=db, keyring=keyring, master_key=kek, policy=policy,
                   dim=dim, model=model, audit=audit, clock=store_clock,
                   index_params=index_params,
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
        user_clock = _checked_clock(clock)
        kek = key_provider.master_key()
        keyring = Keyring.load(folder / KEYRING, kek)
        for stale in (*folder.glob(".keyring.*"), *folder.glob(".snapshot.*")):
            stale.unlink(missing_ok=True)  # left by a killed process; may hold shredded keys
        store_clock = StoreClock(user_clock, keyring.high_water_us)
        db = SQLiteBackend.open(folder / RECORDS)
        try:
            if db.get_meta("store_id") != keyring.store_id:
                raise IntegrityError("the keyring does not belong to this store")
            config = _open_meta(keyring, "config", db.get_meta("config"))
            policy = RetentionPolicy.from_dict(_open_meta(keyring, "policy",
                                                          db.get_meta("policy")))
            _check_policy_is_current(folder, keyring, kek, policy)
            audit = _open_audit(folder, keyring, store_clock, create=False)
            last = audit.last()
        except BaseException:
            db.close()
            raise
        if last is not None:  # the clock never runs back past what the audit has seen
            store_clock.raise_to(_to_us(last.ts_end))
        store = cls(path=folder, backend=db, keyring=keyring, master_key=kek, policy=policy,
                    dim=int(config["dim"]), model=str(config["model"]), audit=audit,
                    clock=store_clock, index_params=index_params,
                    snapshot_on_close=snapshot_on_close)
        source = "snapshot" if store._load_snapshot() else "rebuild"
        if source == "rebuild":
            store._load_index(progress)
        lost = None if last is None else store._uncommitted(last)
        if lost is not None:
            store._trail.append("rollback", actor=None, ref_seq=lost.seq, of=lost.event)
        store._trail.append("open", actor=None, records=len(store._index), index=source,
                            integrity_failures=len(store._integrity_failures))
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
        f, done = entry.fields, True
        if entry.outcome != "ok":
            pass
        elif entry.event == "enroll" and f.get("record_ids"):
            done = self._db.get(str(f["record_ids"][0])) is not None
        elif entry.event == "delete" and isinstance(f.get("record_id"), str):
            done = self._db.get(f["record_id"]) is None
        elif entry.event == "erase" and isinstance(f.get("subject_ref"), str):
            done = not self._db.by_subject(bytes.fromhex(f["subject_ref"]))
        return None if done else entry

    def close(self) -> None:
        """Audit the close, make the audit durable, release files. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            if self._snapshot_on_close and not self._index_incomplete:  # else: rebuilt on open
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
        src = rec.check_text(source, "source", optional=True)
        meta = rec.check_metadata(metadata)
        with self._lock:  # the policy is read under the lock set_policy changes it under
            ttl = self._policy.resolve_ttl(purposes, ttl)
            for name in purposes:
                if not self._policy.purpose(name).source_allowed(src):
                    raise PolicyViolation(f"this source is not allowed for purpose {name!r}")
            now_us = self._now_us()
            expiry_us = now_us + ttl // timedelta(microseconds=1)
            refs = [self._keyring.subject_ref(s) for s in subject_ids]
            new_refs = {r for r in refs if r not in self._keyring.subjects}
            for r in new_refs:
                self._keyring.subjects[r] = sealing.random_key()
            ids = [os.urandom(16).hex() for _ in subject_ids]
            committed = False
            try:
                if new_refs:
                    self._save_keyring()  # keys first: a committed row must be readable
                # The index insert (native, in a worker) overlaps the sealing and the commit
                # (Python, here); the records become searchable only once both succeeded.
                with self._index.adding(ids, refs, [purposes] * len(ids),
                                        [expiry_us] * len(ids), rec.normalised(vecs),
                                        progress=progress):
                    rows: list[RecordRow] = []
                    for rid, vec, sid, ref in zip(ids, vecs, subject_ids, refs, strict=True):
                        plain = rec.Plain(template=vec, subject_id=sid, metadata=meta,
                                          source=src, created_us=now_us)
                        rows.append(self._codec.seal(
                            record_id=rid, subject_ref=ref, purposes=purposes,
                            expiry_us=expiry_us, held=self._keyring.held(ref), plain=plain))
                    with self._db.transaction():
                        self._db.insert(rows)
                        self._trail.append("enroll", actor=actor, count=len(rows),
                                           expires=expiry_us, source=src,
                                           record_ids=ids if len(ids) <= 100 else ids[:100],
                                           **fields)
                    committed = True
                    self._subjects.update(zip(ids, subject_ids, strict=True))
            except BaseException:
                if committed:  # rows the index lacks: no snapshot may claim them covered
                    self._index_incomplete = True
                    self._drop_snapshot()
                else:  # committed rows would need their keys, these have none
                    for r in new_refs:  # orphan keys on disk are swept by the next purge
                        self._keyring.subjects.pop(r, None)
                raise
            return ids

    def export_subject(self, subject_id: str, *, actor: str,
                       reason: str | None = None) -> list[rec.RecordView]:
        """Decrypt a subject's live (or held) records for an access request. Unknown
        subjects give ``[]``.

        Raises:
            IntegrityError: one of the subject's records was tampered with.
        """
        with self._audited("export", actor, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            ref = self._subject(subject_id, f)
            now_us = self._now_us()
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
            self._trail.append("export", actor=str(actor), count=len(views), **f)
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
            with self._lock:  # no enrolment can slip in between the check and the change
                live = self._index.stats().get("purposes", {})
                for name, info in live.items():
                    if name not in policy.purposes and info.get("live", 0) > 0:
                        raise PolicyViolation(f"purpose {name!r} still has live records")
                current = _policy_digest(self._policy)
                # Accept both versions while the change is in flight, so a crash on either
                # side of the commit leaves a store that opens; then only the new one.
                self._keyring.policies = [current, _policy_digest(policy)]
                self._save_keyring()
                try:
                    with self._db.transaction():
                        self._db.put_meta("policy", _seal_meta(self._keyring, "policy",
                                                               policy.to_dict()))
                        self._trail.append("policy", actor=str(actor),
                                           policy=policy.to_dict(), **f)
                except BaseException:
                    self._keyring.policies = [current]
                    self._save_keyring()
                    raise
                self._policy = policy
                self._keyring.policies = [_policy_digest(policy)]
                self._save_keyring()

    def backup(self, dest: str | os.PathLike[str], *, actor: str) -> Path:
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
                self._trail.append("backup", actor=str(actor), **f)
                self._db.backup(folder / RECORDS)
                self._trail.backup(folder / AUDIT)
            return folder

    @property
    def policy(self) -> RetentionPolicy:
        return self._policy

    def stats(self) -> dict[str, Any]:
        """Counts and sizes for operators. No keys, templates or subject ids."""
        self._alive()
        with self._lock:  # a consistent picture, not one taken mid-mutation
            return self._stats()

    def _stats(self) -> dict[str, Any]:
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


_READS = frozenset({"search", "verify", "export", "confirm", "snapshot", "integrity",
                    "backup"})


def _policy_digest(policy: RetentionPolicy) -> bytes:
    return sealing.digest(msgpack.packb(policy.to_dict(), use_bin_type=True))


def _check_policy_is_current(folder: Path, keyring: Keyring, kek: SecretKey,
                             policy: RetentionPolicy) -> None:
    """Refuse a sealed policy replayed from an older database copy (it authenticates,
    but it is not the one the keyring says is current)."""
    if not keyring.policies:
        return  # a keyring from before policies were tracked
    found = _policy_digest(policy)
    if found not in keyring.policies:
        raise IntegrityError("the stored policy is not the current one (an old copy?)")
    if len(keyring.policies) > 1:  # a set_policy was interrupted: settle on what committed
        keyring.policies = [found]
        keyring.save(folder / KEYRING, kek)
