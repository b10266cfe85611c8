"""Subject keys: one random key per subject, sealed in records.db under its bucket's key.

Why not in the keyring: the keyring is one file, rewritten whole (atomic replace, fsync)
at every change, so with every subject's key in it, enrolling a new subject or erasing one
rewrote ~68 MB at a million subjects. Instead each subject has an *entry* in the
``subject_keys`` table of records.db: its key and the sorted ids of its live records,
sealed (``sealing.seal_bound``, kind "subject-key") under the key of its bucket, bucket =
first 4 bytes of the keyed subject ref mod B (B = 1,024, fixed per store). The keyring
keeps only the B bucket keys (32 KiB).

- Enrolment lists its record ids in the records transaction that inserts the rows; a new
  subject's random key exists only in memory until that commit (a failed commit leaves no
  key anywhere). The keyring is not written.
- Deleting a record or erasing a subject *rotates* its bucket: every entry of the bucket
  is resealed under a new key, saved as pending before the transaction and made current
  after it (``Vault.prepare_rotation``, ``Vault.apply_staged``). An older records.db copy
  then holds the subject's entry only under a key that no longer exists.
- The entries authenticate the set of rows: a row is live only if its entry lists its id
  (``codec.Unlisted`` otherwise: a deleted row copied back stays dead). A listed row that
  is gone was removed behind the store's back: reported as missing, and a purge, which
  decides from the entries, never destroys its subject's key for it.

docs/architecture.md, "Subject keys", has the design, its costs and its limits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import NamedTuple, NoReturn

import msgpack

from . import sealing
from .backends.base import Backend
from .errors import IntegrityError
from .keyring import Keyring

__all__ = ["KIND", "Entry", "SubjectKeys", "open_entry", "record_id_bytes"]

KIND = "subject-key"
ID_SIZE = 16
_SMALL = 8  # up to this many ids a tuple (less memory), above it a frozenset


class Entry(NamedTuple):
    """A subject's key and the ids (16 bytes each) of its live records."""

    key: bytes
    ids: tuple[bytes, ...] | frozenset[bytes]

    def __repr__(self) -> str:
        return f"Entry(records={len(self.ids)})"  # never the key


def _ids(ids: Iterable[bytes]) -> tuple[bytes, ...] | frozenset[bytes]:
    unique = sorted(set(ids))
    return tuple(unique) if len(unique) <= _SMALL else frozenset(unique)


def record_id_bytes(record_id: str) -> bytes | None:
    """A record id as entries hold it; None for an id that is not 32 lowercase hex."""
    try:
        raw = bytes.fromhex(record_id)
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == ID_SIZE and raw.hex() == record_id else None


def _encode(entry: Entry) -> bytes:
    return bytes(msgpack.packb([entry.key, sorted(entry.ids)], use_bin_type=True))


def _decode(raw: bytes) -> Entry:
    """Authenticated bytes that do not decode mean a bug or a key compromise: fail closed."""
    try:
        key, ids = msgpack.unpackb(raw, raw=False)
        if not (type(key) is bytes and len(key) == sealing.KEY_SIZE and type(ids) is list
                and set(map(type, ids)) <= {bytes} and set(map(len, ids)) <= {ID_SIZE}
                and ids == sorted(set(ids))):
            raise ValueError
    except (ValueError, TypeError, msgpack.ExtraData):
        raise IntegrityError("subject key entry is malformed") from None
    return Entry(key, _ids(ids))


def open_entry(keyring: Keyring, bucket: int, ref: bytes, blob: bytes,
               key: bytes | None = None) -> Entry:
    """Open one entry under its bucket's key (or ``key``). Raises IntegrityError."""
    bucket_key = keyring.buckets[bucket] if key is None else key
    return _decode(sealing.open_bound(bucket_key, KIND, keyring.store_id, [ref, bucket], blob))


class SubjectKeys:
    """The subject-key entries of one store: every read, write and the cache of them.

    Owned by the vault. Reads come from any thread (verify and export run without the
    store's lock); writes run under the store's lock inside a records transaction. What a
    transaction adds reaches the cache before its commit (a reader cannot see the rows it
    lists before then, and must not meet them unlisted just after); what it removes, only
    once it committed (:meth:`settle`, which also undoes the additions of a rollback).
    """

    def __init__(self, db: Backend, keyring: Keyring) -> None:
        self._db, self._keyring = db, keyring
        self._lock = threading.Lock()
        self._cache: dict[bytes, Entry] = {}  # ref -> entry, as committed
        self._version = 0  # moved by every settle: a read that raced a commit is not cached
        self._enrolling: dict[bytes, tuple[bytes, bool]] = {}  # ref -> (key, new subject)
        self._written: dict[bytes, Entry | None] = {}  # by the open transaction

    def __repr__(self) -> str:
        return f"SubjectKeys(cached={len(self._cache)})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")

    # --- reads --------------------------------------------------------------------------

    def entry(self, ref: bytes) -> Entry | None:
        """The subject's entry; None if it has none (erased, purged, never enrolled).

        Raises:
            IntegrityError: the entry does not open under its bucket key (edited, or put
                back from a copy whose bucket key was rotated away).
        """
        with self._lock:
            found, version = self._cache.get(ref), self._version
        if found is not None:
            return found
        bucket = self._keyring.bucket_of(ref)
        for _ in range(2):  # once more if a rotation committed while this one read
            blob = self._db.get_entry(bucket, ref)
            if blob is None:
                return None
            entry = self._open(bucket, ref, blob)
            with self._lock:
                if entry is not None and self._version == version:
                    self._cache[ref] = entry
                moved, version = self._version != version, self._version
            if entry is not None:
                return entry
            if not moved:
                break
        raise IntegrityError("subject key entry failed authentication")

    def _open(self, bucket: int, ref: bytes, blob: bytes) -> Entry | None:
        """Under the bucket's key, or its pending key (a rotation that committed and is
        not applied yet); None if neither opens it."""
        for key in (self._keyring.buckets[bucket], self._keyring.pending.get(bucket)):
            if key is not None:
                try:
                    return open_entry(self._keyring, bucket, ref, blob, key)
                except IntegrityError:
                    continue
        return None

    def count(self) -> int:
        return self._db.entry_count()

    def invalidate(self) -> None:
        """Drop every cached entry: on a shared store another instance may have changed
        them (listed a new record, resealed a bucket); they are read again when needed."""
        with self._lock:
            self._cache, self._version = {}, self._version + 1

    def preload(self) -> int:
        """Open every entry into the cache (a rebuild reads every row anyway); returns how
        many record ids they list. An entry that does not open is left out, so its rows
        fail when read; one stored under another bucket than its ref's is never used."""
        cache: dict[bytes, Entry] = {}
        listed = 0
        for batch in self._db.scan_entries():
            for bucket, ref, blob in batch:
                if bucket != self._keyring.bucket_of(ref):
                    continue
                entry = self._open(bucket, ref, blob)
                if entry is not None:
                    cache[ref] = entry
                    listed += len(entry.ids)
        with self._lock:
            self._cache, self._version = cache, self._version + 1
        return listed

    def missing(self) -> set[str]:
        """Record ids the cached entries list and records.db lacks (after :meth:`preload`):
        rows removed behind the store's back."""
        with self._lock:
            listed = [i.hex() for entry in self._cache.values() for i in entry.ids]
        gone: set[str] = set()
        for start in range(0, len(listed), 500):
            chunk = listed[start : start + 500]
            present = {r.record_id for r in self._db.headers(chunk)}
            gone.update(rid for rid in chunk if rid not in present)
        return gone

    # --- enrolment (under the store's lock) ---------------------------------------------

    def ensure(self, refs: Iterable[bytes]) -> set[bytes]:
        """Before an enrolment seals its rows: each subject's key, a new random one for a
        subject without an entry (in memory only until the commit). Returns the new refs.

        Raises:
            IntegrityError: an existing entry does not open (its rows could not be read).
        """
        new: set[bytes] = set()
        for ref in set(refs) - set(self._enrolling):
            entry = self.entry(ref)
            if entry is None:
                self._enrolling[ref] = (sealing.random_key(), True)
                new.add(ref)
            else:
                self._enrolling[ref] = (entry.key, False)
        return new

    def sealing_key(self, ref: bytes) -> bytes:
        """The key :meth:`ensure` chose for a subject of the enrolment in progress."""
        return self._enrolling[ref][0]

    def forget(self, refs: Iterable[bytes]) -> None:
        """The enrolment failed before its transaction: its new keys never existed."""
        for ref in refs:
            self._enrolling.pop(ref, None)

    def add(self, ids_by_ref: Mapping[bytes, Iterable[bytes]]) -> None:
        """Inside the transaction that inserts an enrolment's rows: list their ids in their
        subjects' entries (a new subject's entry is created with its new key).

        Raises:
            IntegrityError: an entry changed since :meth:`ensure` (its rows would be sealed
                under a key it does not hold), or does not open.
        """
        puts = []
        for ref, ids in ids_by_ref.items():
            key, new = self._enrolling[ref]
            bucket = self._keyring.bucket_of(ref)
            blob = self._db.get_entry(bucket, ref)
            current = None if blob is None else self._open(bucket, ref, blob)
            if (blob is None) != new or (blob is not None and (current is None
                                                               or current.key != key)):
                raise IntegrityError("subject key entry failed authentication")
            entry = Entry(key, _ids([*(current.ids if current else ()), *ids]))
            puts.append((bucket, ref, self._seal(bucket, ref, entry)))
            self._written[ref] = entry
        self._db.put_entries(puts)
        with self._lock:  # before the commit: see the class docstring
            self._cache.update((ref, e) for ref, e in self._written.items() if e is not None)
            self._version += 1

    # --- removal (under the store's lock, inside a records transaction) ------------------

    def remove(self, ids_by_ref: Mapping[bytes, Iterable[bytes] | None],
               rotate: int | None = None) -> list[bytes]:
        """Take record ids out of entries (None: the whole entry, an erasure); an entry
        left with no id is deleted. Returns the refs whose entry was deleted.

        Decided from the entries, never from which rows exist: rows that vanished behind
        the store's back stay listed, so their subject keeps its key. An entry that does
        not open is left as it is (an erasure deletes it all the same).

        With ``rotate`` (a bucket whose pending key the keyring saved), every entry of
        that bucket is resealed under the pending key, the changed ones included.

        Raises:
            IntegrityError: ``rotate`` is given and an entry to change does not open.
        """
        kr = self._keyring
        deleted: list[bytes] = []
        puts: list[tuple[int, bytes, bytes]] = []
        for ref, ids in ids_by_ref.items():
            bucket = kr.bucket_of(ref)
            blob = self._db.get_entry(bucket, ref)
            if blob is None:
                continue
            current = None if ids is None else self._open(bucket, ref, blob)
            if ids is not None and current is None:
                if rotate is not None:
                    raise IntegrityError("subject key entry failed authentication")
                continue
            left = () if current is None else tuple(set(current.ids) - set(ids or ()))
            if not left:
                deleted.append(ref)
                self._written[ref] = None
            elif current is not None and (len(left) < len(current.ids) or rotate == bucket):
                entry = Entry(current.key, _ids(left))
                puts.append((bucket, ref, self._seal(bucket, ref, entry,
                                                     kr.pending[bucket] if rotate == bucket
                                                     else None)))
                self._written[ref] = entry
        if rotate is not None:
            old, new = kr.buckets[rotate], kr.pending[rotate]
            for ref, blob in self._db.bucket_entries(rotate):
                if ref in ids_by_ref:
                    continue
                try:  # the content stays; only the key that seals it changes
                    raw = sealing.open_bound(old, KIND, kr.store_id, [ref, rotate], blob)
                except IntegrityError:
                    continue  # unreadable already, and stays so
                puts.append((rotate, ref, sealing.seal_bound(new, KIND, kr.store_id,
                                                             [ref, rotate], raw)))
        self._db.delete_entries([(kr.bucket_of(ref), ref) for ref in deleted])
        self._db.put_entries(puts)
        return deleted

    def rewrap_all(self) -> int:
        """Inside a records transaction: reseal every entry under its bucket's pending key
        (``rotate_keys``; the keyring saved a pending key for every bucket). Entries keep
        their content. Returns how many were resealed; one that does not open is left as
        it is (unreadable already, and it stays so)."""
        kr, done = self._keyring, 0
        for batch in self._db.scan_entries():
            puts = []
            for bucket, ref, blob in batch:
                try:
                    raw = sealing.open_bound(kr.buckets[bucket], KIND, kr.store_id,
                                             [ref, bucket], blob)
                except IntegrityError:
                    continue
                puts.append((bucket, ref, sealing.seal_bound(kr.pending[bucket], KIND,
                                                             kr.store_id, [ref, bucket], raw)))
            self._db.put_entries(puts)
            done += len(puts)
        return done

    def rewrap(self, buckets: Iterable[int]) -> int:
        """Inside a records transaction: reseal every entry of these buckets under their
        pending keys (saved by the keyring before it), content unchanged: after the
        commit the old bucket keys are destroyed, so the entries of those buckets in any
        older copy of records.db no longer open. Returns how many were resealed."""
        kr, done = self._keyring, 0
        for bucket in sorted(set(buckets)):
            old, new, puts = kr.buckets[bucket], kr.pending[bucket], []
            for ref, blob in self._db.bucket_entries(bucket):
                try:
                    raw = sealing.open_bound(old, KIND, kr.store_id, [ref, bucket], blob)
                except IntegrityError:
                    continue  # unreadable already, and stays so
                puts.append((bucket, ref, sealing.seal_bound(new, KIND, kr.store_id,
                                                             [ref, bucket], raw)))
            self._db.put_entries(puts)
            done += len(puts)
        return done

    def settle(self, committed: bool) -> None:
        """After every records transaction: what it wrote reaches the cache if it
        committed; an enrolment's new keys are dropped either way (they are in their
        entries now, or they never were)."""
        with self._lock:
            for ref, entry in self._written.items():
                if committed and entry is not None:
                    self._cache[ref] = entry
                else:
                    self._cache.pop(ref, None)
            self._version += 1
        self._written.clear()
        self._enrolling.clear()

    # --- a store from before bucket keys ------------------------------------------------

    def import_legacy(self, keys: Mapping[bytes, bytes]) -> int:
        """Inside a records transaction, once: an entry for each subject key of a keyring
        from before bucket keys that has none yet (an interrupted run wrote the others),
        listing the subject's rows as they are now. Returns how many were written."""
        rows: dict[bytes, list[bytes]] = {}
        for batch in self._db.scan_headers():
            for row in batch:
                rid = record_id_bytes(row.record_id)
                if rid is not None:
                    rows.setdefault(row.subject_ref, []).append(rid)
        puts = []
        for ref, key in keys.items():
            bucket = self._keyring.bucket_of(ref)
            if self._db.get_entry(bucket, ref) is None:
                entry = Entry(key, _ids(rows.get(ref, ())))
                puts.append((bucket, ref, self._seal(bucket, ref, entry)))
        self._db.put_entries(puts)
        return len(puts)

    def _seal(self, bucket: int, ref: bytes, entry: Entry, key: bytes | None = None) -> bytes:
        bucket_key = self._keyring.buckets[bucket] if key is None else key
        return sealing.seal_bound(bucket_key, KIND, self._keyring.store_id, [ref, bucket],
                                  _encode(entry))
