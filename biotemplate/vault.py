"""The vault: the store's sealed state, and the only owner of it.

It holds the records database (sealed rows, through a :class:`~.backends.base.Backend`),
the key state (the :class:`~.keyring.Keyring` and the master key that wraps it; the
subject-key entries in records.db, :class:`~.subject_keys.SubjectKeys`), the codec
between them, and the sealed settings (configuration and retention policy). Nothing else
in the library reads a key or writes a row: the store asks the vault.

Ordering rules the vault keeps, so that a crash at any point leaves a store that opens:

- a new subject's key commits with its rows, in their transaction (:meth:`insert`);
- key material a commit will need (a hold key, a bucket's next key) is saved before the
  commit (:meth:`open_hold`, :meth:`prepare_rotation`);
- key material a commit retires (an old bucket key, an old ratchet state, a hold key) is
  staged in it and destroyed after it (:meth:`stage`, :meth:`apply_staged`);
- the policy goes through both versions (:meth:`replace_policy`).

Files: ``records.db`` and ``keyring`` in the store folder. Another backend (PostgreSQL)
plugs in below the vault: the store never sees which one it talks to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from . import _files, sealing
from .backends.base import Backend, RecordRow
from .backends.postgres import PostgresBackend
from .backends.sqlite import SQLiteBackend
from .clock import StoreClock
from .codec import Plain, RecordCodec, Shredded
from .errors import IntegrityError, KeyUnavailable, StoreExists, StoreNotFound
from .index import TunedEf
from .keyring import Keyring, new_buckets
from .keys import SecretKey
from .keyslot import FileSlot, KeySlot, PgSlot
from .policy import RetentionPolicy
from .subject_keys import SubjectKeys, record_id_bytes

__all__ = ["KEYRING", "RECORDS", "Vault"]

RECORDS, KEYRING = "records.db", "keyring"


class Vault:
    """Sealed rows, key state and sealed settings of one store. Build with :meth:`create`
    or :meth:`open`; every mutation runs under the store's lock (the caller's)."""

    def __init__(self, label: str, db: Backend, slot: KeySlot, keyring: Keyring,
                 kek: SecretKey, *, dim: int, model: str, policy: RetentionPolicy,
                 clock: StoreClock, shared: bool = False) -> None:
        self._label, self._db, self._slot, self._keyring, self._kek = label, db, slot, keyring, kek
        self._policy, self._clock = policy, clock
        # Several instances share this store (PostgreSQL): another may change the key
        # state, the entries and the policy between two calls of this one (``refresh``).
        self.shared = shared
        self.dim, self.model = dim, model
        self._keys = SubjectKeys(db, keyring)
        self._codec = RecordCodec(keyring, model=model, dim=dim, entries=self._keys.entry)
        self._staged: dict[str, Any] | None = None  # the key change the open tx will make
        self._has_entries = True  # records.db's state says it holds the subject keys
        self.rolled_forward = False  # open completed a key change a crash interrupted
        self._completed_unsaved = False  # refresh completed one in memory (shared stores)
        self.lost_subject_keys = 0  # ... without the bucket key it needed (an old keyring)
        self.moved_subject_keys = 0  # open moved them from a keyring of before buckets

    def __repr__(self) -> str:
        return f"Vault({self._label!r}, store={self._keyring.store_id.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("a vault holds key material and cannot be pickled")

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, *, kek: SecretKey, dim: int, model: str,
               policy: RetentionPolicy, clock: StoreClock) -> Vault:
        """Write a new keyring and records database; nothing is left behind on failure.

        Raises:
            StoreExists: the folder already holds a keyring or records database.
        """
        if any((folder / name).exists() for name in (RECORDS, KEYRING)):
            raise StoreExists(f"{folder} already holds a store (or part of one)")
        slot = FileSlot(folder / KEYRING)
        created: list[Path] = []
        try:
            keyring = _new_keyring(policy, clock)
            slot.save(keyring, kek)
            created.append(folder / KEYRING)
            db = SQLiteBackend.create(folder / RECORDS)
            created.append(folder / RECORDS)
            _write_settings(db, keyring, dim, model, policy)
        except BaseException:
            _files.remove_all(created)  # no half-made store left to block a retry
            raise
        return cls(str(folder), db, slot, keyring, kek, dim=dim, model=model, policy=policy,
                   clock=clock)

    @classmethod
    def create_shared(cls, db: PostgresBackend, *, kek: SecretKey, dim: int, model: str,
                      policy: RetentionPolicy, clock: StoreClock) -> Vault:
        """A new store in a PostgreSQL schema just created (``db``): key state and
        settings in one go; the caller drops the schema if this fails."""
        slot = PgSlot(db)
        keyring = _new_keyring(policy, clock)
        slot.save(keyring, kek)
        _write_settings(db, keyring, dim, model, policy)
        return cls(db.location.display, db, slot, keyring, kek, dim=dim, model=model,
                   policy=policy, clock=clock, shared=True)

    @classmethod
    def open_shared(cls, db: PostgresBackend, *, kek: SecretKey, clock: StoreClock,
                    read_only: bool = False) -> Vault:
        """Open the store of a PostgreSQL schema (``db`` checked by ``PostgresBackend.open``).

        Raises:
            KeyUnavailable: wrong master key. IntegrityError: as :meth:`open`.
        """
        # Nothing is written here, outside the store's lock: a change found half done is
        # completed in memory, and saved by the first locked call (``refresh``).
        vault = cls._opened(db, PgSlot(db), db.location.display, kek, clock, True,
                            shared=True)
        if vault.rolled_forward:
            vault.rolled_forward, vault._completed_unsaved = False, not read_only
        return vault

    @classmethod
    def open(cls, folder: Path, *, kek: SecretKey, clock: StoreClock,
             read_only: bool = False) -> Vault:
        """Open the keyring and records database and check they belong together.
        ``read_only``: write nothing (no temp sweep, no keyring save, ``mode=ro``).

        Raises:
            StoreNotFound: no records database or keyring in ``folder``.
            KeyUnavailable: wrong master key.
            IntegrityError: keyring, configuration or policy tampered with, replayed, or
                of another store.
        """
        if not (folder / RECORDS).exists() or not (folder / KEYRING).exists():
            raise StoreNotFound(f"{folder} holds no biotemplate store")
        slot = FileSlot(folder / KEYRING)
        slot.load(kek)  # the master key is checked before the database is touched
        db = SQLiteBackend.open(folder / RECORDS, read_only=read_only)
        return cls._opened(db, slot, str(folder), kek, clock, read_only)

    @classmethod
    def _opened(cls, db: Backend, slot: KeySlot, label: str, kek: SecretKey,
                clock: StoreClock, read_only: bool, *, shared: bool = False) -> Vault:
        try:
            keyring = slot.load(kek)
            if not read_only:
                slot.sweep()
            clock.raise_to(keyring.high_water_us)
            if db.get_meta("store_id") != keyring.store_id:
                raise IntegrityError("the keyring does not belong to this store")
            config = _open_meta(db, keyring, "config")
            policy = RetentionPolicy.from_dict(_open_meta(db, keyring, "policy"))
            vault = cls(label, db, slot, keyring, kek, dim=int(config["dim"]),
                        model=str(config["model"]), policy=policy, clock=clock,
                        shared=shared)
            vault.rolled_forward = vault._check_generation(read_only=read_only)
            vault._settle_policy(save=not read_only)
            vault.moved_subject_keys = vault._move_subject_keys(read_only=read_only)
        except BaseException:
            db.close()
            raise
        return vault

    def close(self) -> None:
        self._db.close()

    def _state_generation(self) -> int:
        """The generation records say the store has (one small read and AEAD open)."""
        try:
            return int(_open_meta(self._db, self._keyring, "state")["gen"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError("store state is malformed") from None

    def refresh(self, *, write: bool) -> bool:
        """On a shared store: take over the key state, policy and subject-key entries
        another instance saved since this one last looked (one query when nothing
        changed). Under the store's lock across instances (exclusive with ``write``, which
        may also complete a change a crashed instance left; shared otherwise, writing
        nothing). Returns whether anything was reloaded.

        Raises:
            IntegrityError: as :meth:`open` (the saved state does not fit the rows).
        """
        if not self.shared:
            return False
        self._keys.invalidate()  # entries may have changed without the key state moving
        # The key state moved, or a change committed whose key-state save never came (an
        # instance that died after its commit, or a COMMIT whose reply was lost): both
        # are read back from the database, never decided from this instance's copy.
        changed = self._slot.changed() or self._state_generation() != self._keyring.generation
        if changed:
            self._keyring.assume(self._slot.load(self._kek))
            self._clock.raise_to(self._keyring.high_water_us)
            self._policy = RetentionPolicy.from_dict(_open_meta(self._db, self._keyring,
                                                                "policy"))
            if self._check_generation(read_only=not write):
                # completed a change an instance that died after its commit left unsaved
                self._completed_unsaved = True
            self._settle_policy(save=write)
        if write and self._completed_unsaved:  # saved now (by _check_generation, or here
            if not changed:                     # for one a reader completed in memory)
                self.save_keys()
            self._completed_unsaved = False
            self.rolled_forward = True  # the store audits it
        return changed

    # --- identity and key state (reads) -------------------------------------------------

    @property
    def store_id(self) -> bytes:
        return self._keyring.store_id

    @property
    def policy(self) -> RetentionPolicy:
        return self._policy

    @property
    def rows(self) -> Backend:
        """The records database, for reads; writes go through :meth:`transaction`."""
        return self._db

    def subject_ref(self, subject_id: str) -> bytes:
        return self._keyring.subject_ref(subject_id)

    def probe_digest(self, unit: NDArray[np.float32]) -> bytes:
        """A keyed digest of a probe: links audit entries of one probe, reveals nothing."""
        data = np.ascontiguousarray(unit, dtype="<f4").tobytes()
        return sealing.probe_digest(self._keyring.digest_key, data)

    def held(self, ref: bytes) -> bool:
        return self._keyring.held(ref)

    def audit_keys(self) -> tuple[Callable[[bytes], bytes], Callable[[bytes, bytes], bool],
                                  bytes]:
        """(sign, verify, public key) of the audit trail, from the keyring's seed."""
        sign, public = sealing.signer_from_seed(self._keyring.audit_seed)
        return sign, sealing.verifier_for(public), public

    def audit_mac(self) -> Callable[[bytes], bytes]:
        """The MAC of the audit trail's search entries (HMAC of the entry hash), from the
        keyring's seed: only the store can make or check one."""
        return sealing.audit_mac(self._keyring.audit_seed)

    @property
    def keyring(self) -> Keyring:
        """For the sealed index snapshot's key only (``snapshot.py``)."""
        return self._keyring

    def key_stats(self) -> dict[str, int]:
        k = self._keyring
        return {"subjects": len(k.legacy_subjects) or self._keys.count(),  # (not moved yet)
                "held_subjects": sum(1 for _, active in k.holds.values() if active),
                "epoch": k.ratchet_epoch, "epoch_seconds": k.epoch_us // 1_000_000,
                "erasure_generation": k.erasures, "generation": k.generation}

    # --- records ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One records transaction: the store appends the audit entry inside it, so the
        rows commit only after the entry is written (fail closed). The subject-key entries
        it wrote are settled in the cache after it (``SubjectKeys.settle``)."""
        committed = False
        try:
            with self._db.transaction():
                yield
            committed = True
        finally:
            self._keys.settle(committed)

    def seal(self, *, record_id: str, subject_ref: bytes, purposes: Sequence[str],
             expiry_us: int, plain: Plain) -> RecordRow:
        """Seal a row of the enrolment in progress (:meth:`ensure_subject_keys` first)."""
        return self._codec.seal(record_id=record_id, subject_ref=subject_ref,
                                purposes=purposes, expiry_us=expiry_us,
                                held=self._keyring.held(subject_ref), plain=plain,
                                subject_key=self._keys.sealing_key(subject_ref))

    def open_row(self, row: RecordRow) -> Plain:
        """Raises: Shredded: the key is gone. IntegrityError: the row was tampered with
        (``Unlisted``: its subject's entry does not list it)."""
        return self._codec.open(row)

    def listed(self, ref: bytes, record_id: str) -> bool:
        """Whether the subject's entry lists the record (False too for no or a bad entry)."""
        rid = record_id_bytes(record_id)
        try:
            entry = self._keys.entry(ref)
        except IntegrityError:
            return False
        return entry is not None and rid is not None and rid in entry.ids

    def listed_ids(self, ref: bytes) -> list[str]:
        """The record ids the subject's entry lists (none for no or a bad entry)."""
        try:
            entry = self._keys.entry(ref)
        except IntegrityError:
            return []
        return sorted(i.hex() for i in entry.ids) if entry is not None else []

    def preload_subject_keys(self) -> int:
        """Open every subject-key entry (before a rebuild); returns the record ids listed."""
        return self._keys.preload()

    def missing_rows(self) -> set[str]:
        """Listed record ids whose row is gone (after :meth:`preload_subject_keys`)."""
        return self._keys.missing()

    def readable(self, row: RecordRow, now_us: int, *, for_export: bool) -> Plain | None:
        """Open a row if retention lets this call see it; shredded rows read as absent.

        Raises:
            Unlisted: its subject's entry does not list it (a deleted row put back).
            IntegrityError: the row was tampered with.
        """
        if row.expiry_us <= now_us and not (for_export and self._keyring.held(row.subject_ref)):
            return None
        try:
            return self._codec.open(row)
        except Shredded:
            return None

    def reseal(self, row: RecordRow, *, held: bool) -> RecordRow:
        """Move a record between its epoch key and its subject's hold key."""
        return self._codec.reseal(row, held=held)

    def with_expiry(self, row: RecordRow, plain: Plain, expiry_us: int) -> RecordRow:
        """``row`` (opened as ``plain``) sealed again with an earlier expiry (a tighter
        policy); written by :meth:`replace_policy`."""
        return self._codec.with_expiry(row, plain, expiry_us)

    def insert(self, rows: Sequence[RecordRow]) -> None:
        """Inside the caller's transaction: an enrolment's rows, and their ids listed in
        their subjects' entries (a new subject's entry, with its key, created): the rows
        and the keys that open them commit together, or neither does."""
        self._db.insert(rows)
        ids: dict[bytes, list[bytes]] = {}
        for row in rows:
            rid = record_id_bytes(row.record_id)
            if rid is None:
                raise IntegrityError("malformed record id")  # a bug: ids are made here
            ids.setdefault(row.subject_ref, []).append(rid)
        self._keys.add(ids)

    def update(self, rows: Sequence[RecordRow]) -> None:
        self._db.update(rows)

    def delete(self, record_ids: Sequence[str]) -> int:
        return self._db.delete(record_ids)

    def unlist(self, ids_by_ref: Mapping[bytes, Iterable[str] | None], *,
               rotate: int | None = None) -> list[bytes]:
        """Inside the caller's transaction: take record ids out of their subjects' entries
        (None: the whole entry); an entry left empty is deleted (its key is gone). Returns
        the refs whose entry went, for :meth:`stage` (``shred``). With ``rotate`` (from
        :meth:`prepare_rotation`) the bucket is resealed under its pending key.

        Decided from the entries, not from the rows present: a row that vanished behind
        the store's back stays listed (reported missing) and never costs its key."""
        changes = {ref: None if ids is None else
                   {rid for rid in map(record_id_bytes, ids) if rid is not None}
                   for ref, ids in ids_by_ref.items()}
        return self._keys.remove(changes, rotate=rotate)

    def checkpoint(self) -> None:
        """Truncate the database's log, so deleted ciphertext does not linger in it."""
        self._db.checkpoint()

    def backup(self, dest: Path) -> None:
        self._db.backup(dest / RECORDS)

    def forget_cached_entries(self) -> None:
        """A shared store's feed brought changes: entries are read afresh when needed."""
        self._keys.invalidate()

    # --- key state (writes) -------------------------------------------------------------

    @property
    def master_key_id(self) -> str:
        """Names the master key the key state is sealed under (for the audit trail)."""
        return sealing.master_key_id(self._kek.reveal()).hex()

    def rewrap(self, new_kek: SecretKey) -> None:
        """Seal the key state under a new master key (atomic replace of the keyring file):
        from then on the old master key opens nothing in this folder. No record changes."""
        old, self._kek = self._kek, new_kek
        try:
            self.save_keys()
        except BaseException:
            self._kek = old  # the keyring on disk is still sealed under the old key
            raise

    def save_keys(self) -> None:
        """Persist the key state (atomic), with the clock's high-water mark."""
        k = self._keyring
        k.high_water_us = max(k.high_water_us, self._clock.high_water_us)
        self._slot.save(k, self._kek)

    def ensure_subject_keys(self, refs: Iterable[bytes]) -> set[bytes]:
        """Before sealing an enrolment's rows: every subject's key, a new random one for a
        subject without one. Nothing is saved: a new key exists in memory only, until
        :meth:`insert` commits it with the rows. Returns the refs that got a new key.

        Raises:
            IntegrityError: a subject's key entry does not open.
        """
        return self._keys.ensure(refs)

    def forget_subject_keys(self, refs: Iterable[bytes]) -> None:
        """The enrolment failed before its transaction: its new keys never existed."""
        self._keys.forget(refs)

    def prepare_rotation(self, ref: bytes) -> int:
        """Before a transaction that takes record ids out of a subject's entry (delete,
        erase): a new key for the subject's bucket, saved as pending (the generation does
        not move). The transaction reseals the bucket under it (:meth:`unlist`);
        :meth:`apply_staged` makes it current, so the old key, which opens the subject's
        entry in every older copy of records.db, is gone. Returns the bucket."""
        bucket = self._keyring.bucket_of(ref)
        self._keyring.pending = {bucket: sealing.random_key()}
        try:
            self.save_keys()
        except BaseException:
            self._keyring.pending = {}
            raise
        return bucket

    def prepare_rekey(self) -> None:
        """Before ``rotate_keys``' transaction: a fresh ratchet state (standing at the
        current epoch), a fresh key for every hold and for every bucket, saved as pending
        (the generation does not move); the transaction reseals under them
        (:meth:`rekey_rows`, :meth:`rewrap_entries`) and :meth:`apply_staged` makes them
        current. None is derivable from any earlier key state."""
        k = self._keyring
        k.pending_ratchet = sealing.random_key()
        k.pending_holds = {ref: sealing.random_key() for ref in k.holds}
        k.pending = {b: sealing.random_key() for b in range(len(k.buckets))}
        try:
            self.save_keys()
        except BaseException:
            self.discard_staged()
            raise

    def rekey_rows(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Inside the transaction: reseal every readable record under the pending keys.
        Rows that do not open (key gone, unlisted, tampered) are left as they are. Returns
        how many were resealed."""
        done, seen, total = 0, 0, self._db.count()
        for batch in self._db.scan():
            out = []
            for row in batch:
                try:
                    out.append(self._codec.rekey(row))
                except (IntegrityError, KeyUnavailable):
                    continue  # unreadable already: nothing to move
            self._db.update(out)
            done, seen = done + len(out), seen + len(batch)
            if progress is not None:
                progress(seen, total)
        return done

    def rewrap_entries(self) -> int:
        """Inside the transaction: every subject-key entry under its bucket's pending key."""
        return self._keys.rewrap_all()

    @property
    def ratchet_epoch(self) -> int:
        return self._keyring.ratchet_epoch

    @property
    def epoch_us(self) -> int:
        return self._keyring.epoch_us

    def open_hold(self, ref: bytes) -> tuple[bytes, bool] | None:
        """Activate a subject's hold key (new or kept), saved; returns the previous entry
        for :meth:`restore_hold` should the hold fail to commit."""
        previous = self._keyring.holds.get(ref)
        self._keyring.holds[ref] = (previous[0] if previous else sealing.random_key(), True)
        self.save_keys()
        return previous

    def restore_hold(self, ref: bytes, previous: tuple[bytes, bool] | None) -> None:
        if previous is None:
            self._keyring.holds.pop(ref, None)
        else:
            self._keyring.holds[ref] = previous
        self.save_keys()

    def active_holds(self) -> list[bytes]:
        return [ref for ref, (_, active) in self._keyring.holds.items() if active]

    def released_holds_without_rows(self) -> list[bytes]:
        """Released hold keys with nothing sealed under them any more (read inside the
        purge transaction): the purge destroys them."""
        return [ref for ref, (_, active) in self._keyring.holds.items()
                if not active and not any(r.held for r in self._db.by_subject(ref))]

    # --- key-state changes: staged inside the records transaction, applied after it -----
    #
    # A change that destroys or retires key material (erasure, deletion, purge, lifting a
    # hold, a new policy) is written down, sealed, in the records database by the same
    # transaction that commits its rows and audit entry, together with the generation the
    # key state will have. After the commit the keyring applies it and is saved with that
    # generation. So the keyring, records.db and the audit trail each name the
    # generation they have seen: a file put back from an older copy is caught on open,
    # and a crash between the commit and the keyring save is completed on open.

    def stage(self, *, shred: Iterable[bytes] = (), rotate: Iterable[int] = (),
              ratchet_to: int | None = None, holds: dict[bytes, bool] | None = None,
              policy: bytes | None = None, rekey: bool = False,
              hold_keys: Iterable[bytes] = ()) -> int:
        """Inside a records transaction: record the key change this commit makes; returns
        the generation it gives the store, for the audit entry of the same transaction.

        ``shred``: subjects whose entry this transaction deleted (their hold key goes
        too); ``rotate``: buckets resealed under their pending key; ``holds`` maps a
        subject to False (hold key kept, inactive) or True (destroyed); ``rekey``: the
        records were resealed under the pending ratchet state and hold keys;
        ``hold_keys``: subjects whose rows were resealed under a hold key saved just
        before (a keyring without it is older, not a crash: see ``_has_pending_for``).
        """
        gen = self._keyring.generation + 1
        intent: dict[str, Any] = {"shred": sorted(set(shred)), "ratchet": ratchet_to,
                                  "holds": {ref: bool(drop) for ref, drop in (holds or {}).items()},
                                  "policy": policy, "rotate": sorted(set(rotate))}
        if rekey:
            intent["rekey"] = True
        if hold_keys:
            intent["hold_keys"] = sorted(set(hold_keys))
        self._db.put_meta("state", _seal_meta(self._keyring, "state", _state(gen, intent)))
        self._staged = {"gen": gen, "intent": intent}
        return gen

    def discard_staged(self) -> None:
        """The transaction that staged a change rolled back: forget it, and the pending
        bucket key (nothing that committed is sealed under it)."""
        self._staged = None
        self._keyring.pending = {}
        self._keyring.pending_ratchet, self._keyring.pending_holds = None, {}

    def apply_staged(self) -> KeyChange:
        """After the commit: destroy what the staged change retires, save the key state
        with its generation. Raises RuntimeError if nothing is staged (a bug)."""
        if self._staged is None:
            raise RuntimeError("no key change staged")
        staged, self._staged = self._staged, None
        change = self._apply(staged["intent"])
        self._keyring.generation = staged["gen"]
        self.save_keys()
        return change

    def _apply(self, intent: dict[str, Any]) -> KeyChange:
        k = self._keyring
        shred = list(intent.get("shred", []))
        for ref in shred:
            k.holds.pop(ref, None)
            k.legacy_subjects.pop(ref, None)  # a change staged before bucket keys existed
        rotate = [int(b) for b in intent.get("rotate", [])]
        if not all(0 <= b < len(k.buckets) for b in rotate):
            raise IntegrityError("store state is malformed")
        for bucket in rotate:
            key = k.pending.get(bucket)
            if key is None:  # not the keyring saved before the commit: an older copy
                self.lost_subject_keys += len(self._db.bucket_entries(bucket))
                key = sealing.random_key()  # the old key must die all the same
            k.buckets[bucket] = key
        k.pending = {}
        if intent.get("rekey"):  # records resealed under the pending state and hold keys
            k.promote_pending_ratchet()
        destroyed = len(shred)
        for ref, drop in intent.get("holds", {}).items():
            if ref in k.holds:
                if drop:
                    del k.holds[ref]
                else:
                    k.holds[ref] = (k.holds[ref][0], False)
        if destroyed or rotate:  # snapshots holding those templates can never open again
            k.erasures += 1
            k.snapshot_secret = sealing.random_key()
        moved = intent.get("ratchet") is not None and k.advance(int(intent["ratchet"]))
        if intent.get("policy") is not None:
            k.policies = [intent["policy"]]
        return KeyChange(subjects_destroyed=destroyed, ratchet_moved=moved)

    def _has_pending_for(self, intent: dict[str, Any]) -> bool:
        """The keyring holds every pending key a staged change sealed under."""
        k = self._keyring
        if intent.get("rekey") and k.pending_ratchet is None:
            return False
        if not all(ref in k.holds for ref in intent.get("hold_keys", [])):
            return False
        return all(int(b) in k.pending for b in intent.get("rotate", []))

    @property
    def generation(self) -> int:
        return self._keyring.generation

    def _check_generation(self, *, read_only: bool) -> bool:
        """Cross-check the keyring with records.db; complete an interrupted key change.

        Returns True when a change was rolled forward (a read-only open applies it in
        memory only, writing nothing). Raises IntegrityError naming the file that is
        older than the other (put back from a copy)."""
        blob = self._db.get_meta("state")
        kept = self._keyring.generation
        if blob is None:  # a store from before generations: start counting here
            if self._keyring.buckets and not self._keyring.legacy_subjects:
                raise IntegrityError("store state is missing")  # written since buckets
            if read_only:
                self._has_entries = False
                return False
            with self._db.transaction():
                self._db.put_meta("state", _seal_meta(self._keyring, "state",
                                                      {"gen": kept, "intent": {}}))
            self._has_entries = False
            return False
        state = _open_meta(self._db, self._keyring, "state")
        try:
            gen, intent = int(state["gen"]), dict(state["intent"])
            self._has_entries = bool(state.get("subject_keys", False))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError("store state is malformed") from None
        if gen == kept:
            if self._keyring.pending or self._keyring.pending_ratchet is not None:
                self.discard_staged()  # saved for a change that never committed
                if not read_only:
                    self.save_keys()
            return False
        if gen == kept + 1 and not self._has_pending_for(intent):
            # a crash leaves the keys the commit sealed under as pending in the keyring:
            # without them this is an older keyring, and completing the change would lose
            # every entry or record sealed under them
            raise IntegrityError(f"the keyring is older than records.db (generation {kept} "
                                 f"< {gen}) and lacks the keys that change committed: was "
                                 "an old keyring put back?")
        if gen == kept + 1:  # committed, but the keyring save did not happen (a crash)
            self._apply(intent)
            self._keyring.generation = gen
            if not read_only:
                self.save_keys()
            return True
        if gen > kept:
            raise IntegrityError(f"the keyring is older than records.db (generation {kept} "
                                 f"< {gen}): was an old keyring put back?")
        raise IntegrityError(f"records.db is older than the keyring (generation {gen} < "
                             f"{kept}): was an old copy of records.db put back?")

    def _move_subject_keys(self, *, read_only: bool) -> int:
        """A store from before bucket keys: move the keyring's subject keys into records.db,
        one step saved before the next starts, so a crash anywhere re-runs or completes it
        on the next open. Returns how many keys were moved (0: nothing to do). A read-only
        open moves nothing (it decrypts nothing either): the first writer does.

        Raises:
            IntegrityError: records.db and the keyring are not of the same time (one is a
                copy from before the move, the other from after it).
        """
        k = self._keyring
        if k.buckets and not k.legacy_subjects:
            if not self._has_entries:
                raise IntegrityError("records.db is older than the keyring (it predates the "
                                     "subject keys moving into it): was an old copy put back?")
            return 0
        if read_only:
            return 0
        if not k.buckets:
            if self._db.entry_count():
                raise IntegrityError("the keyring is older than records.db (it predates the "
                                     "subject keys moving out of it): was an old keyring put "
                                     "back?")
            k.buckets = new_buckets()
            self.save_keys()  # 1: the bucket keys exist before anything is sealed under them
        moved = len(k.legacy_subjects)
        with self.transaction():  # 2: every entry, and the state that says they are here
            self._keys.import_legacy(k.legacy_subjects)
            self._db.put_meta("state", _seal_meta(k, "state", _state(k.generation, {})))
        k.legacy_subjects = {}
        self.save_keys()  # 3: the keyring no longer holds them
        self._has_entries = True
        return moved

    # --- sealed settings ----------------------------------------------------------------

    def _settle_policy(self, *, save: bool) -> None:
        """Refuse a sealed policy replayed from an older database copy (it authenticates,
        but it is not the one the keyring says is current)."""
        policies = self._keyring.policies
        if not policies:
            return  # a keyring from before policies were tracked
        found = policy_digest(self._policy)
        if found not in policies:
            raise IntegrityError("the stored policy is not the current one (an old copy?)")
        if len(policies) > 1 and save:  # a set_policy was interrupted: settle on it
            self._keyring.policies = [found]
            self.save_keys()

    def replace_policy(self, policy: RetentionPolicy, audit: Callable[[int], int],
                       transaction: Callable[[], AbstractContextManager[None]], *,
                       shortened: Sequence[RecordRow] = ()) -> int:
        """Store ``policy`` and call ``audit(generation)`` inside ``transaction()`` (the
        caller's records transaction); returns what ``audit`` returned. The caller then
        applies the staged change. Both versions are accepted while the change is in
        flight, so a crash on either side of the commit leaves a store that opens (with
        the version that committed).

        ``shortened``: rows a tighter policy resealed with an earlier expiry
        (:meth:`with_expiry`), written in the same transaction. The buckets of their
        subjects are rotated with them (new keys saved as pending before, the old ones
        destroyed after the commit), so an older copy of records.db, which still holds
        those records with their longer expiry, no longer opens them with this keyring."""
        current, new = policy_digest(self._policy), policy_digest(policy)
        buckets = sorted({self._keyring.bucket_of(r.subject_ref) for r in shortened})
        self._keyring.policies = [current, new]
        self._keyring.pending = {b: sealing.random_key() for b in buckets}
        self.save_keys()
        try:
            with transaction():
                self._db.update(shortened)
                self._keys.rewrap(buckets)
                self._db.put_meta("policy", _seal_meta(self._keyring, "policy",
                                                       policy.to_dict()))
                seq = audit(self.stage(policy=new, rotate=buckets))
        except BaseException:
            self._staged = None
            self._keyring.policies = [current]
            self._keyring.pending = {}
            self.save_keys()
            raise
        self._policy = policy
        return seq

    def index_tuning(self) -> dict[str, TunedEf]:
        """The efs ``tune_index`` measured, per purpose (sealed setting ``index``; absent
        until the first tuning). A setting of an unknown version is ignored: the index
        then falls back to ``auto_ef``, which is never less safe than a stale tuning.

        Raises:
            IntegrityError: the setting was edited in the database.
        """
        if self._db.get_meta(_TUNING) is None:
            return {}
        value = _open_meta(self._db, self._keyring, _TUNING)
        try:
            if value["v"] != 1:
                return {}
            return {str(p): TunedEf(int(t["ef"]), int(t["live"]), int(t["M"]))
                    for p, t in value["purposes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return {}

    def save_index_tuning(self, tuned: Mapping[str, TunedEf]) -> None:
        """Replace the ``index`` setting; call inside :meth:`transaction` (with the audit
        entry of the tuning). A few bytes per purpose: ef, live count, M."""
        value = {"v": 1, "purposes": {p: {"ef": t.ef, "live": t.live, "M": t.M}
                                      for p, t in sorted(tuned.items())}}
        self._db.put_meta(_TUNING, _seal_meta(self._keyring, _TUNING, value))


_TUNING = "index"  # the sealed meta row of tune_index's efs


@dataclass(frozen=True, slots=True)
class KeyChange:
    """What applying a staged key change destroyed."""

    subjects_destroyed: int
    ratchet_moved: bool


def policy_digest(policy: RetentionPolicy) -> bytes:
    """Names a policy version (not a secret): what the keyring says is current."""
    return sealing.digest(msgpack.packb(policy.to_dict(), use_bin_type=True))


def _new_keyring(policy: RetentionPolicy, clock: StoreClock) -> Keyring:
    keyring = Keyring.new(sealing.random_id(sealing.STORE_ID_SIZE),
                          policy.epoch // timedelta(microseconds=1), clock.now_us())
    keyring.policies = [policy_digest(policy)]
    return keyring


def _write_settings(db: Backend, keyring: Keyring, dim: int, model: str,
                    policy: RetentionPolicy) -> None:
    """A new store's identity and sealed settings, in one transaction."""
    config = {"v": 1, "dim": dim, "model": model, "metric": "cosine",
              "epoch_us": keyring.epoch_us}
    with db.transaction():
        db.put_meta("store_id", keyring.store_id)
        db.put_meta("config", _seal_meta(keyring, "config", config))
        db.put_meta("policy", _seal_meta(keyring, "policy", policy.to_dict()))
        db.put_meta("state", _seal_meta(keyring, "state", _state(0, {})))


def _state(gen: int, intent: dict[str, Any]) -> dict[str, Any]:
    """The sealed ``state`` row: generation, staged change, and the mark that records.db
    holds the subject keys (a copy from before they moved there has none)."""
    return {"gen": gen, "intent": intent, "subject_keys": True}


def _seal_meta(keyring: Keyring, name: str, value: Any) -> bytes:
    """Configuration and policy are authenticated: editing them in the DB is detected."""
    body = msgpack.packb(value, use_bin_type=True)
    return sealing.seal_bound(keyring.meta_key, "meta", keyring.store_id, [name.encode()],
                              bytes(body))


def _open_meta(db: Backend, keyring: Keyring, name: str) -> Any:
    blob = db.get_meta(name)
    if blob is None:
        raise IntegrityError(f"store {name} is missing")
    return msgpack.unpackb(sealing.open_bound(keyring.meta_key, "meta", keyring.store_id,
                                              [name.encode()], blob), raw=False)
