"""The audit trail: append-only, hash-chained, signed or sealed, in its own ``audit.db``.

It is kept apart from ``records.db`` so that restoring an old records database cannot roll
the audit back. Signing is injected (``Signer``/``Verifier``) so that only the crypto module
imports a crypto library; the chain is stdlib SHA-256 over canonical msgpack bodies::

    row  = entries(seq, ref_seq, body, hash, sig)
    body = msgpack({"v": 1, "seq", "prev", "store", "ts0", "ts1", "event", "actor",
                    "outcome", "f": fields})   # fixed key order, field maps sorted by key
    hash = SHA-256(b"biotemplate-audit-v1\\x00" || body)
    sig  = Ed25519(hash), 64 bytes                    # durable entries (mutations)
         | HMAC-SHA256(mac key, hash), 32 bytes        # searches, verifications
    seal = seals(seq, Ed25519(hash of entry seq))     # the head, at each group commit
    prev = hash of entry seq-1 (32 zero bytes for seq 1); ts = µs since 1970, UTC
    ref_seq = f["ref_seq"] copied to an indexed column; verify() checks the copy

Signing each search entry cost ~50 µs of a search's ~550 µs overhead (issue 13), so a
search entry carries a MAC under a key of its own (HKDF of the audit seed, "audit-mac";
only the store has it) and is *sealed*: the background syncer, ``sync()``,
``checkpoint()``, ``backup()`` and ``close()`` sign the head's hash into ``seals`` before
they fsync, at most ``SYNC_WINDOW`` after the first search entry not yet sealed. A
signature over entry s's hash covers every entry up to s through the ``prev`` links, so one
seal per window (or the next signed mutation, which needs none) proves all of them. What a
verifier checks: each hash, link, store and body; each Ed25519 signature (an entry's own or
a seal); given the MAC key (the store's own trail), each MAC. What changed for one: an
entry's authenticity to an auditor rests on the next signature at or after it, and a MAC
proves it to the store only. Entries after the last signature, the *unsealed tail* (on a
live store at most ~50 ms of searches; after a crash, what the syncer had not sealed), are
reported as ``unsealed``, not counted as verified, and do not fail ``verify``: they chain
to a signed entry, but anyone with write access could have appended them. The next writable
open checks their MACs (a forged one raises ``IntegrityError``) and seals the head; a
read-only or keyless open accepts a tail that chains to a signature. A trail without a MAC
key (PostgreSQL, the tests' bare trails) signs every entry, as before.

EU AI Act Art. 12(3) (logs of remote biometric identification) maps to:
(a) period of each use -> ts0/ts1 (``started=``, then the clock at append);
(b) reference database -> field "purpose" (each purpose is its own gallery);
(c) input data that led to a match -> field "probe_digest" (a keyed digest, never the probe);
(d) natural persons who verified the result -> "confirm" entries with "reviewer" and
"ref_seq" = the search; Art. 14(5) wants two distinct reviewers: ``find("confirm", seq)``.

Fields take msgpack primitives only (None, bool, int, float, str, bytes, lists and str-keyed
dicts of these); anything else raises ``InvalidInput`` naming only the type. Callers pass
digests and record ids, never templates, keys or clear subject ids.

A chain alone cannot reveal truncation or an old file restored: keep a ``checkpoint()`` with
a witness and pass it to ``verify()``. A live trail also compares the file with the head it
holds in memory, so truncation under a running process is caught without one.

The public key travels with the trail, so an auditor needs no master key
(:func:`verify_audit`): ``meta(key, value)`` holds ``store_id`` and ``public_key`` in the
clear, and the same key is a signed field of the genesis entry ("create"; a trail created
before keys were published gets an "audit-key" entry on its next writable open), so editing
the clear copy is detected. A checkpoint (version 2) carries the key too: a whole file
re-signed under another key verifies on its own, but not against a witness's checkpoint.
A version 3 checkpoint (keyless) is taken at the newest signed point, not a MAC'd head.
A read-only trail (``open(..., read_only=True)``) connects with ``mode=ro`` and writes
nothing; its ``checkpoint()`` signs the head as it is in the file now.

Durability is a measured choice (an fsync costs more than a search, SECURITY.md §4). The file is
WAL. ``durable=True`` (mutations) commits under ``synchronous=FULL``: the WAL is fsynced
before return. ``durable=False`` (searches) commits under ``synchronous=NORMAL``: the entry
is in the OS page cache before return, so it survives a process crash at once, and a
background thread fsyncs the WAL at most ``SYNC_WINDOW`` (50 ms) after the first entry not
yet synced: group commit, off the caller's path. So a power cut loses at most the search
entries of the last ~50 ms (plus one fsync's duration); any durable entry, ``sync()``,
``checkpoint()`` and ``close()`` also fsync, and one fsync covers the whole WAL (the seal
written before it too). If the background seal or fsync fails, the trail fails closed:
every later append raises ``AuditError``. Measured (ext4, 2,000 appends, Ed25519 ~20 µs
of each): durable ~160-220 µs (up to 1.6 ms on a busy disk), non-durable ~65-75 µs signed;
a MAC'd one ~60-80 µs against ~105-115 µs signed, same machine and minute, under load.

Appends are serialised by a lock (the chain needs one order); use one trail per file: a
second writing process makes appends fail, never forks the chain. Fail closed: an entry
that cannot be signed (or MAC'd) or written raises ``AuditError``, is rolled back, and
leaves the head as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack

from biotemplate import _files, sealing
from biotemplate.errors import (
    AuditError,
    IntegrityError,
    InvalidInput,
    RecordNotFound,
    StoreExists,
    StoreNotFound,
)

__all__ = ["AuditEntry", "AuditReport", "AuditTrail", "AuditView", "Checkpoint", "Mac",
           "SignedEntry", "Signer", "Verifier", "checkpoint_audit", "offline_trail",
           "verify_audit"]

Signer = Callable[[bytes], bytes]
Verifier = Callable[[bytes, bytes], bool]
Mac = Callable[[bytes], bytes]  # entry hash -> 32-byte HMAC (the store's key)

_ENTRY_DOMAIN = b"biotemplate-audit-v1\x00"
_CHECKPOINT_DOMAIN = b"biotemplate-checkpoint-v1\x00"
_ZERO = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EVENT = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_OUTCOMES = frozenset({"ok", "refused", "error"})
_KEYS = frozenset({"v", "seq", "prev", "store", "ts0", "ts1", "event", "actor", "outcome", "f"})
_MAX_BODY = 16 << 20  # bytes: a purge listing ~400k record ids still fits
SYNC_WINDOW = 0.05  # seconds: a non-durable entry is fsynced at most this long after it
# An unsealed tail longer than this (by its entries' times) is not a crash's: verify fails
UNSEALED_SPAN = timedelta(seconds=10)
_MAX_PROBLEMS = 100
_SIG_SIZE, _MAC_SIZE = 64, 32  # the ``sig`` column: Ed25519 signature, or a search's MAC
_CHECKPOINT_FIELDS = frozenset({"v", "store", "seq", "head", "ts", "sig"})  # "key" in v2
_COLS = "SELECT seq, ref_seq, body, hash, sig FROM entries"
_SEALED = ("SELECT e.seq, e.ref_seq, e.body, e.hash, e.sig, s.sig AS seal FROM entries e "
           "LEFT JOIN seals s ON s.seq = e.seq WHERE e.seq >= ? AND e.seq <= ?")
_UNSEALED = ("SELECT seq, ref_seq, body, hash, sig, NULL FROM entries "  # no seals table
             "WHERE seq >= ? AND seq <= ?")
_SCHEMA = """
CREATE TABLE entries(seq INTEGER PRIMARY KEY, ref_seq INTEGER, body BLOB NOT NULL,
                     hash BLOB NOT NULL, sig BLOB NOT NULL);
CREATE INDEX entries_ref_seq ON entries(ref_seq) WHERE ref_seq IS NOT NULL;  -- searches add none
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
  BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
  BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
PRAGMA user_version = 1;
"""
# Write-once, clear copies of what an auditor needs without the master key; added to a
# trail created before it existed on its next writable open.
_META = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS meta_no_update BEFORE UPDATE ON meta
  BEGIN SELECT RAISE(ABORT, 'the audit meta table is write-once'); END;
CREATE TRIGGER IF NOT EXISTS meta_no_delete BEFORE DELETE ON meta
  BEGIN SELECT RAISE(ABORT, 'the audit meta table is write-once'); END;
"""
# Signatures over the hash of a MAC'd entry (a search), each covering every entry up to it
# through the ``prev`` links; added to an older trail on its next writable open.
_SEALS = """
CREATE TABLE IF NOT EXISTS seals(seq INTEGER PRIMARY KEY, sig BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS seals_no_update BEFORE UPDATE ON seals
  BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS seals_no_delete BEFORE DELETE ON seals
  BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""
_KEY_EVENTS = ("create", "audit-key")  # entries whose "public_key" field is the signed copy


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One verified entry; ``fields`` is read-only (tuples written come back as lists)."""

    seq: int
    ts_start: datetime
    ts_end: datetime
    event: str
    actor: str | None
    outcome: str
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SignedEntry:
    """A verified entry with its chain hash, its predecessor's hash and the signature that
    covers it, so that whoever receives it (an export) can check it against the public
    key: the entry's own (``signed_seq`` is its seq), or for a search entry the next seal,
    over the hash of entry ``signed_seq``, which the ``prev`` links chain back to this one."""

    entry: AuditEntry
    hash: bytes
    prev: bytes
    signature: bytes
    signed_seq: int


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What ``verify()`` found; ``ok`` is True iff ``problems`` is empty.

    ``entries`` counts the entries a signature covers; ``unsealed`` the newest ones after
    the last signature (hash-chained to it, but not yet proven to an auditor: a live
    store seals them within ``SYNC_WINDOW``; a crashed one on its next open)."""

    ok: bool
    entries: int
    problems: tuple[str, ...]
    unsealed: int = 0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed (store, seq, head hash, time, public key), to be kept by a witness outside
    the host. Version 2 carries (and signs) the audit public key, so a witness can check it
    and :func:`verify_audit` can check that it is the file's; version 1 (no key, written
    before keys were published) is still read and verified.

    Version 3 (``entry_signed``, from :func:`checkpoint_audit`) is taken without the
    master key: its signature is the head entry's own (over ``head``, the entry's hash,
    whose body names its seq, store and time), and ``ts`` is that entry's time. It proves
    the same thing to :meth:`AuditTrail.verify`: the trail reached entry ``seq`` with
    hash ``head``, signed under ``public_key``."""

    store_id: bytes
    seq: int
    head: bytes
    ts: datetime
    signature: bytes
    public_key: bytes | None = None  # Ed25519, raw 32 bytes; None in version 1
    entry_signed: bool = False  # version 3: ``signature`` is the head entry's

    def message(self) -> bytes:
        """The signed bytes: for versions 1 and 2 their length (> 32) keeps them apart
        from entry signatures; version 3 is an entry signature, over the head hash."""
        if self.entry_signed:
            return self.head
        signed = [self.store_id, self.seq, self.head, _us(self.ts)]
        return _CHECKPOINT_DOMAIN + _pack(signed if self.public_key is None
                                          else [*signed, self.public_key])

    @property
    def version(self) -> int:
        return 3 if self.entry_signed else 1 if self.public_key is None else 2

    def to_bytes(self) -> bytes:
        d = {"v": 1, "store": self.store_id, "seq": self.seq, "head": self.head,
             "ts": _us(self.ts), "sig": self.signature}
        if self.public_key is not None:
            d.update(v=self.version, key=self.public_key)
        return _pack(d)

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Raises: IntegrityError: malformed (the signature is checked by ``verify``)."""
        try:
            d = _unpack(data, 4096)
            if not isinstance(d, dict) or set(d) - {"key"} != _CHECKPOINT_FIELDS:
                raise ValueError
            return cls._build(d["v"], d["store"], d["seq"], d["head"], d["ts"], d["sig"],
                              d.get("key"))
        except ValueError:
            raise IntegrityError("malformed checkpoint") from None

    def to_json(self) -> str:
        d = {"v": 1, "store_id": self.store_id.hex(), "seq": self.seq,
             "head": self.head.hex(), "ts": self.ts.isoformat(),
             "signature": self.signature.hex()}
        if self.public_key is not None:
            d.update(v=self.version, public_key=self.public_key.hex())
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        """Raises: IntegrityError: malformed (the signature is checked by ``verify``)."""
        try:
            d = json.loads(text[:4096])
            key = d.get("public_key")
            return cls._build(d["v"], bytes.fromhex(d["store_id"]), d["seq"],
                              bytes.fromhex(d["head"]), _us(datetime.fromisoformat(d["ts"])),
                              bytes.fromhex(d["signature"]),
                              None if key is None else bytes.fromhex(key))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise IntegrityError("malformed checkpoint") from None

    @classmethod
    def _build(cls, v: Any, store: Any, seq: Any, head: Any, ts: Any, sig: Any,
               key: Any) -> Checkpoint:
        if not (v in ((1,) if key is None else (2, 3)) and isinstance(store, bytes)
                and 1 <= len(store) <= 64 and type(seq) is int and seq >= 1
                and isinstance(head, bytes) and len(head) == 32 and type(ts) is int
                and isinstance(sig, bytes) and len(sig) == 64
                and (key is None or (isinstance(key, bytes) and len(key) == 32))):
            raise ValueError
        return cls(store, seq, head, _dt(ts), sig, key, entry_signed=v == 3)


class AuditTrail:
    """The audit trail of one store; build it with ``create`` or ``open``."""

    # Whether an entry appended inside the records transaction commits or rolls back with
    # it (one database): then a failed commit needs no "rollback" entry after it.
    atomic_with_records = False
    # Whether this kind of trail may hold MAC'd entries at all (``audit.db``: searches). A
    # trail that never writes them (PostgreSQL) treats a 32-byte ``sig`` as a bad signature,
    # so a forged entry cannot pass as "a MAC this reader has no key for".
    macs_possible = True

    def __init__(self, conn: sqlite3.Connection, path: Path, store_id: bytes,
                 signer: Signer, verifier: Verifier, clock: Callable[[], datetime], *,
                 public_key: bytes | None = None, read_only: bool = False,
                 mac: Mac | None = None) -> None:
        self._conn, self._path, self._store_id = conn, path, store_id
        self._signer, self._verifier, self._clock = signer, verifier, clock
        self._mac = mac  # None: every entry is signed (PostgreSQL, offline readers)
        self._sealed = 0  # the newest seq a signature covers (own or seal)
        self._public_key, self._read_only = public_key, read_only
        self._head: tuple[int, bytes] = (0, _ZERO)  # (seq, hash) of the last entry
        self._lock = threading.Lock()
        self._full: bool | None = None  # the connection's synchronous setting
        self._pending = 0  # non-durable entries since the last fsync
        self._closed = False
        self._sync_failed = False  # a background fsync failed: fail closed from then on
        self._wake = threading.Event()  # set when an entry awaits the background fsync
        self._stop = threading.Event()  # set by close: the syncer leaves at once
        self._syncer: threading.Thread | None = None  # started by the first search entry
        # The store's key-state generation, written into every entry as field "gen" (an
        # entry that stages a change passes its own): open compares it with the keyring's
        # and records.db's, so an audit.db put back from an older copy is caught.
        self.generation: int | None = None

    @classmethod
    def create(cls, path: Path, *, store_id: bytes, signer: Signer, verifier: Verifier,
               clock: Callable[[], datetime], public_key: bytes | None = None,
               mac: Mac | None = None) -> AuditTrail:
        """Create the file and write its genesis entry (event "create"); all or nothing.
        ``public_key`` (the signer's) goes into ``meta`` and into the genesis entry;
        given ``mac``, search entries are MAC'd and sealed (module docstring).

        Raises:
            StoreExists: the file exists. InvalidInput: bad store_id, or a naive clock.
            AuditError: the file or the genesis entry could not be written.
        """
        path = Path(path)
        if not isinstance(store_id, bytes) or not 1 <= len(store_id) <= 64:
            raise InvalidInput("store_id must be 1 to 64 bytes")
        try:
            # Create the file ourselves with mode 0600 (SQLite would use the umask); its
            # -wal and -shm files inherit the database file's permissions.
            _files.create_exclusive(path)
        except FileExistsError:
            raise StoreExists(f"{path} already exists") from None
        except OSError as exc:
            raise AuditError("cannot create the audit database") from exc
        trail = None
        try:
            trail = cls(_files.sqlite_connect(path), path, store_id, signer, verifier, clock,
                        public_key=public_key, mac=mac)
            if trail._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise AuditError("the audit database needs WAL mode")
            trail._conn.executescript(_SCHEMA + _SEALS)
            trail._publish_key(genesis=True)
            _files.fsync_dir(path.parent)  # the new directory entry must survive a power cut
            return trail
        except BaseException as exc:
            if trail is not None:
                trail._conn.close()
            _files.remove_sqlite(path)
            if isinstance(exc, sqlite3.Error | OSError):
                raise AuditError("cannot create the audit database") from exc
            raise

    @classmethod
    def open(cls, path: Path, *, store_id: bytes, signer: Signer, verifier: Verifier,
             clock: Callable[[], datetime], public_key: bytes | None = None,
             read_only: bool = False, mac: Mac | None = None) -> AuditTrail:
        """Open a trail; its newest entries are verified before anything is chained to them.

        Every entry after the newest signature (a search tail left unsealed by a crash)
        must chain to it and, given ``mac``, carry a valid MAC; a writable open then seals
        the head. Without ``mac`` a read-only open accepts such a tail (``verify`` reports
        it as unsealed); a writable one refuses it, since it could not tell a forgery.

        A writable open of a trail that does not name ``public_key`` yet (created before
        keys were published) appends an "audit-key" entry carrying it, then stores it in
        ``meta``; one without a ``seals`` table gets it. ``read_only``: connect with
        ``mode=ro``; append nothing, ever.

        Raises:
            StoreNotFound: no file. AuditError: not a readable audit database.
            IntegrityError: no entries, or the newest are forged or another store's.
        """
        path = Path(path)
        if not path.is_file():
            raise StoreNotFound(f"no audit trail at {path}")
        trail = None
        try:
            conn = _files.sqlite_connect(path, "ro" if read_only else "rw")
            trail = cls(conn, path, store_id, signer, verifier, clock,
                        public_key=public_key, read_only=read_only, mac=mac)
            if conn.execute("PRAGMA user_version").fetchone()[0] != 1:
                raise AuditError("not a biotemplate audit database")
            if not read_only:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SEALS)
            trail._head = trail._read_head()
            if not read_only:
                if trail._head[0] > trail._sealed:  # crash recovery: the tail checked out
                    trail._seal_head()
                    trail._sync_files()
                if public_key is not None:
                    trail._publish_key(genesis=False)
            return trail
        except BaseException as exc:
            if trail is not None:
                trail._conn.close()
            if isinstance(exc, sqlite3.Error):
                raise AuditError("cannot read the audit database") from exc
            raise

    def _read_head(self) -> tuple[int, bytes]:
        """(seq, hash) of the newest entry in the file, verified: walking back to the
        newest signature (an entry's own or a seal), every entry must chain to the next
        and, given the MAC key, carry a valid MAC. Sets ``self._sealed``.

        Raises:
            IntegrityError: no entries, a forged or unchained one, or (writable, without
                the MAC key) a tail this trail cannot check.
        """
        seal = None
        if _has_table(self._conn, "seals"):
            seal = self._conn.execute("SELECT seq, sig FROM seals WHERE seq <= (SELECT "
                                      "max(seq) FROM entries) ORDER BY seq DESC LIMIT 1"
                                      ).fetchone()
            gone = self._conn.execute("SELECT max(seq) FROM seals WHERE seq > (SELECT "
                                      "coalesce(max(seq), 0) FROM entries)").fetchone()[0]
            if gone is not None:  # a seal outlived its entry: the file was cut
                raise IntegrityError(f"the audit trail was truncated: a seal names entry "
                                     f"{gone}, which is gone")
        head: tuple[int, bytes] | None = None
        expected, link = 0, b""
        cur = self._conn.execute(f"{_COLS} ORDER BY seq DESC")
        try:
            for row in iter(lambda: cur.fetchmany(256), []):
                for r in row:
                    found, entry, actual, prev, kind = self._inspect(r)
                    if (found or entry is None or prev is None
                            or (head is not None and (r[0] != expected or actual != link))):
                        raise IntegrityError(f"audit entry {r[0]} failed verification")
                    head = head or (r[0], r[3])
                    if seal is not None and seal[0] == r[0]:
                        if not self._sig_ok(actual, seal[1]):
                            raise IntegrityError(f"the seal of audit entry {r[0]} is forged")
                        kind = "sig"
                    if kind == "sig":
                        self._sealed = r[0]
                        return head
                    if kind == "open" and not self._read_only:
                        raise IntegrityError("the audit trail ends in entries this trail "
                                             "cannot check (no MAC key)")
                    expected, link = r[0] - 1, prev
        finally:
            cur.close()
        if head is None:
            raise IntegrityError("the audit trail has no entries: genesis missing")
        raise IntegrityError("no signature covers the newest audit entries")

    def _publish_key(self, *, genesis: bool) -> None:
        """Sign the public key into the trail (genesis, or an "audit-key" entry), then put
        the clear copy in ``meta``, in that order: a crash in between leaves a signed copy,
        and the next writable open adds the clear one. Nothing to do once it is there."""
        key = self._public_key
        if genesis:
            fields: dict[str, Any] = {} if key is None else {"public_key": key}
            self.append("create", actor=None, **fields)
        elif key is None or _meta(self._conn).get("public_key") is not None:
            return
        else:
            self.append("audit-key", actor=None, public_key=key)
        if key is not None:
            self._conn.executescript(_META)
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?), "
                               "('public_key', ?)", (self._store_id, key))

    def append(self, event: str, *, actor: str | None, outcome: str = "ok",
               started: datetime | None = None, durable: bool = True, **fields: Any) -> int:
        """Sign (or, for ``durable=False`` given the MAC key, MAC) and write one entry
        before the audited call returns; returns its seq.

        Args:
            event: a short lower-case name ("search", "confirm", ...).
            actor: who asked; None for the system itself.
            outcome: "ok", "refused" or "error".
            started: when the audited call began (ts0); ts1 is the clock now.
            durable: fsync before returning; False for searches (see the module docstring).
            **fields: msgpack primitives; "ref_seq", if given, is an int (indexed).

        Raises:
            InvalidInput: a bad argument, field or naive time; nothing written.
            AuditError: the entry could not be signed or written; nothing written.
        """
        signed = durable or self._mac is None
        f, ref, ts0 = self._prepared(event, actor, outcome, started, fields)
        with self._lock:  # a refused call may name a bogus ref_seq: audit it as given
            self._writable()
            seq, digest = self._write_entry(
                self._builder(event, actor, outcome, ts0, f, signed), ref, durable)
            self._head = (seq, digest)
            if signed:
                self._sealed = seq  # its signature covers every entry before it
            return seq

    def append_many(self, event: str, items: Sequence[Mapping[str, Any]], *,
                    actor: str | None, started: datetime | None = None) -> list[int]:
        """Non-durable entries of one call, one per item of fields (``search_many``: one
        per probe of a step), written in one transaction: all or none, one commit instead
        of one per entry. Each is the entry ``append(event, durable=False, **item)``
        would write; returns their seqs.

        Raises:
            InvalidInput: a bad argument or field in any item; nothing written.
            AuditError: the entries could not be MAC'd, signed or written; nothing written.
        """
        signed = self._mac is None
        prepared = [self._prepared(event, actor, "ok", started, dict(item)) for item in items]
        if not prepared:
            return []
        with self._lock:
            self._writable()
            builds = [self._builder(event, actor, "ok", ts0, f, signed)
                      for f, _, ts0 in prepared]
            written = self._write_entries(builds, [ref for _, ref, _ in prepared])
            self._head = written[-1]
            if signed:
                self._sealed = written[-1][0]
            return [seq for seq, _ in written]

    def _prepared(self, event: str, actor: str | None, outcome: str,
                  started: datetime | None, fields: dict[str, Any],
                  ) -> tuple[dict[str, Any], int | None, int | None]:
        """(normalised fields, ref_seq, ts0) of one entry, every argument checked."""
        if not isinstance(event, str) or not _EVENT.fullmatch(event):
            raise InvalidInput("audit event must be a short lower-case name")
        if actor is not None and (not isinstance(actor, str) or len(actor) > 256):
            raise InvalidInput("actor must be None or a string of at most 256 characters")
        if outcome not in _OUTCOMES:
            raise InvalidInput(f"outcome must be one of {sorted(_OUTCOMES)}")
        if self.generation is not None and "gen" not in fields:
            fields["gen"] = self.generation
        f = {name: _normalise(fields[name], name, 0) for name in sorted(fields)}
        ref = f.get("ref_seq")
        ts0 = None if started is None else _us(started)
        if ref is not None and not (type(ref) is int and -(1 << 63) <= ref < 1 << 63):
            raise InvalidInput("ref_seq must be an int (the seq of the entry referred to)")
        return f, ref, ts0

    def _writable(self) -> None:
        """Under ``self._lock``: open, and not read-only."""
        self._ensure_open()
        if self._read_only:
            raise AuditError("the audit trail is open read-only")

    def _builder(self, event: str, actor: str | None, outcome: str, ts0: int | None,
                 f: dict[str, Any], signed: bool,
                 ) -> Callable[[int, bytes], tuple[bytes, bytes, bytes]]:
        """seq, prev -> (body, hash, signature or MAC) of one prepared entry."""
        def build(seq: int, prev: bytes) -> tuple[bytes, bytes, bytes]:
            ts1 = _us(self._clock())
            body = _pack({"v": 1, "seq": seq, "prev": prev, "store": self._store_id,
                          "ts0": ts1 if ts0 is None else ts0, "ts1": ts1, "event": event,
                          "actor": actor, "outcome": outcome, "f": f})
            if len(body) > _MAX_BODY:
                raise InvalidInput("audit entry too large")
            digest = hashlib.sha256(_ENTRY_DOMAIN + body).digest()
            return body, digest, self._sign(digest) if signed else self._mac_of(digest)

        return build

    def _write_entries(self, builds: Sequence[Callable[[int, bytes], tuple[bytes, bytes, bytes]]],
                       refs: Sequence[int | None]) -> list[tuple[int, bytes]]:
        """Chain and store non-durable entries after the head in one transaction; returns
        their (seq, hash). Under ``self._lock``. The PostgreSQL trail appends one by one."""
        seq, prev = self._head
        rows = []
        for build, ref in zip(builds, refs, strict=True):
            seq += 1
            body, prev, sig = build(seq, prev)
            rows.append((seq, ref, body, prev, sig))
        try:
            if self._full is not False:  # may not change inside a transaction
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._full = False
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            raise AuditError(f"audit entries {rows[0][0]}-{seq} could not be written") from exc
        first, self._pending = not self._pending, self._pending + len(rows)
        if first:
            self._wake_syncer()
        return [(r[0], r[3]) for r in rows]

    def _write_entry(self, build: Callable[[int, bytes], tuple[bytes, bytes, bytes]],
                     ref: int | None, durable: bool) -> tuple[int, bytes]:
        """Chain, sign and store one entry after the head; returns (seq, hash). Under
        ``self._lock``. The PostgreSQL trail reads the head from the shared table instead."""
        seq = self._head[0] + 1
        body, digest, sig = build(seq, self._head[1])
        full = durable
        try:
            if self._full is not full:  # may not change inside a transaction
                self._conn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
                self._full = full
            # One autocommitted statement is its own atomic transaction: no
            # BEGIN/COMMIT round trips on the search path.
            self._conn.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                               (seq, ref, body, digest, sig))
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            raise AuditError(f"audit entry {seq} could not be written") from exc
        self._pending = 0 if full else self._pending + 1
        if self._pending == 1:
            self._wake_syncer()
        return seq, digest

    def _wake_syncer(self) -> None:
        """The first entry since the last fsync awaits the group commit: start the syncer
        once, wake it (it waits ``SYNC_WINDOW`` for more, then seals and fsyncs)."""
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="biotemplate-audit-sync")
            self._syncer.start()
        self._wake.set()

    @property
    def head_seq(self) -> int:
        """The seq of the last entry written (0 before the genesis entry)."""
        with self._lock:
            return self._head[0]

    def get(self, seq: int) -> AuditEntry:
        """Raises: RecordNotFound: no such entry. IntegrityError: it fails verification."""
        rows = self._query(f"{_COLS} WHERE seq = ?", seq)
        if not rows:
            raise RecordNotFound(f"no audit entry {seq}")
        return self._checked(rows[0])

    def find(self, event: str, ref_seq: int) -> list[AuditEntry]:
        """Entries of ``event`` that refer to entry ``ref_seq`` (e.g. a search's confirmations).

        Raises:
            IntegrityError: one of them fails verification.
        """
        rows = self._query(f"{_COLS} WHERE ref_seq = ? ORDER BY seq", ref_seq)
        return [e for e in map(self._checked, rows) if e.event == event]

    def last(self) -> AuditEntry | None:
        """The newest entry. Raises: IntegrityError: it is missing or fails verification."""
        with self._lock:
            seq = self._head[0]
        try:
            return self.get(seq) if seq else None
        except RecordNotFound:
            raise IntegrityError(f"audit entry {seq} is missing: truncated") from None

    def verify(self, checkpoint: Checkpoint | None = None) -> AuditReport:
        """Check every entry, streamed from a read snapshot; problems are reported, not raised.

        Without a checkpoint, a trail truncated or restored while closed looks whole.
        """
        problems: list[str] = []

        def add(problem: str) -> None:  # a wrecked file must not build a huge report
            if len(problems) < _MAX_PROBLEMS:
                problems.append(problem)
            elif len(problems) == _MAX_PROBLEMS:
                problems.append("further problems not listed")

        with self._lock:  # pin a snapshot that matches the head held in memory
            self._ensure_open()
            held_seq, held_hash = self._head
            try:
                if not self._read_only:
                    self._seal_head()  # a live trail reports no unsealed tail of its own
                reader = self._reader()
                rows, named = reader.__enter__()
            except AuditError:
                return AuditReport(False, 0, ("audit database unreadable",))
        count, prev_seq, prev_hash, pending = 0, 0, _ZERO, 0
        tail_from: datetime | None = None  # ts of the first entry no signature covers yet
        tail_to: datetime | None = None
        seen: dict[int, bytes] = {}  # recomputed hashes of the held head and checkpoint seq
        signed: set[bytes] = set()  # the public keys that entries carry (signed copies)
        try:
            for row in rows:
                count, seq = count + 1, row[0]
                if seq != prev_seq + 1:
                    add(f"gap after seq {prev_seq}")
                found, entry, actual, prev, kind = self._inspect(row)
                if seq == prev_seq + 1 and prev is not None and prev != prev_hash:
                    found.append("chain broken")
                if row[5] is not None:  # a seal: a signature over this entry's hash
                    if self._sig_ok(actual, row[5]):
                        kind = "sig"
                    else:
                        found.append("seal invalid")
                # an entry is proven once a signature at or after it covers it
                pending = 0 if kind == "sig" or found else pending + 1
                if pending == 1 and entry is not None:
                    tail_from = entry.ts_end
                if pending and entry is not None:
                    tail_to = entry.ts_end
                for problem in found:
                    add(f"seq {seq}: {problem}")
                if seq in (held_seq, checkpoint and checkpoint.seq):
                    seen[seq] = actual
                if entry is not None and entry.event in _KEY_EVENTS:
                    key = entry.fields.get("public_key")
                    if isinstance(key, bytes):
                        signed.add(key)
                prev_seq, prev_hash = seq, actual
        except (sqlite3.Error, AuditError):
            add("audit database unreadable")
            return AuditReport(False, count - pending, tuple(problems), pending)
        finally:
            reader.__exit__(None, None, None)
        if pending and not self._read_only:
            add(f"the newest {pending} entries have no seal, but this trail sealed them: "
                "a seal was deleted")
        elif pending and tail_from is not None and tail_to is not None \
                and tail_to - tail_from > UNSEALED_SPAN:
            # a live store seals within SYNC_WINDOW, a crash leaves about that much: a
            # longer tail means seals were deleted, and its MACs only the store can check
            add(f"the newest {pending} entries span {tail_to - tail_from} with no seal "
                f"(a live store seals every {SYNC_WINDOW:g} s): seals were deleted")
        for problem in self._key_problems(named, signed):
            add(problem)
        if count == 0:
            add("no entries: the genesis entry is missing")
        if held_seq > prev_seq:
            add(f"trail ends at seq {prev_seq}, but this process wrote seq {held_seq}: truncated")
        elif seen.get(held_seq, held_hash) != held_hash:
            add(f"entry {held_seq} differs from the head held in memory: rewritten")
        if checkpoint is not None:
            if checkpoint.store_id != self._store_id:
                add("checkpoint is for another store")
            elif checkpoint.public_key not in (None, self._public_key):
                add("checkpoint names another audit public key")
            elif not self._sig_ok(checkpoint.message(), checkpoint.signature):
                add("checkpoint signature invalid")
            elif checkpoint.seq > prev_seq:
                add(f"trail ends at seq {prev_seq}, before checkpoint seq {checkpoint.seq}: "
                    "truncated or an old file restored")
            elif seen.get(checkpoint.seq) != checkpoint.head:
                add(f"entry {checkpoint.seq} differs from checkpoint: rewritten")
        return AuditReport(not problems, count - pending, tuple(problems), pending)

    @contextlib.contextmanager
    def _reader(self, first: int = 1, last: int = (1 << 63) - 1,
                ) -> Iterator[tuple[Iterable[Any], object]]:
        """(the rows ``first`` to ``last`` in seq order, each with its seal's signature or
        None as a sixth column, the clear public key of ``meta``) from one read snapshot,
        on a connection of its own so appends go on meanwhile.

        Raises:
            AuditError: the file cannot be read.
        """
        ro = None
        try:
            ro = _files.sqlite_connect(self._path, "ro")
            ro.execute("BEGIN")
            ro.execute("SELECT max(seq) FROM entries").fetchone()
            named = _meta(ro).get("public_key")  # the clear copy, in the same snapshot
            sql = _SEALED if _has_table(ro, "seals") else _UNSEALED
        except sqlite3.Error as exc:
            if ro is not None:
                ro.close()
            raise AuditError("audit database unreadable") from exc

        def rows() -> Generator[Any, None, None]:
            try:  # a plain loop: closing this generator must not touch the cursor
                cur = ro.execute(f"{sql} ORDER BY 1", (first, last))  # by seq
                batch = cur.fetchmany(1024)
                while batch:
                    yield from batch
                    batch = cur.fetchmany(1024)
            except sqlite3.Error as exc:
                raise AuditError("cannot read the audit trail") from exc

        walk = rows()
        try:
            yield walk, named
        finally:
            walk.close()
            ro.close()

    def checkpoint(self) -> Checkpoint:
        """Sign the current head; appends nothing, so ``verify(cp)`` is exact.

        Syncs first: a witness must never hold a checkpoint that a power cut could falsify.
        A read-only trail signs the head in the file now (the writer appends on), once it
        has checked that the file still holds the head it saw before.

        Raises:
            AuditError: sync or signing failed. InvalidInput: the clock returned a naive time.
            IntegrityError: (read-only) the newest entry is forged, or the file lost
                entries this trail saw.
        """
        with self._lock:
            self._ensure_open()
            if self._read_only:
                self._head = self._newer_head()
            else:
                self._seal_head()  # so that an auditor's copy verifies up to the checkpoint
            self._sync_files()  # after the head is read: the fsync covers it
            cp = Checkpoint(self._store_id, *self._head, _dt(_us(self._clock())), bytes(64),
                            self._public_key)
            return Checkpoint(cp.store_id, cp.seq, cp.head, cp.ts, self._sign(cp.message()),
                              cp.public_key)

    def entry_checkpoint(self) -> Checkpoint:
        """A version 3 checkpoint of the newest signed point in the file now: the newest
        entry signed itself, or sealed (search entries after it, not sealed yet, are left
        for the next one). Nothing is signed here, so it needs no key
        (:func:`checkpoint_audit`).

        Raises:
            IntegrityError: no entries, or the newest signed one fails verification.
            AuditError: the file cannot be read, or the trail names no public key.
        """
        if self._public_key is None:
            raise AuditError("this audit trail names no public key")
        with self._lock:
            self._ensure_open()
            if not self._read_only:
                self._seal_head()
            row, sig = self._signed_point()
        if row is None:
            raise IntegrityError("the audit trail has no entries: genesis missing")
        found, entry, actual, _, _ = self._inspect(row)
        if found or entry is None or not self._sig_ok(actual, sig):
            raise IntegrityError(f"audit entry {row[0]} failed verification")
        return Checkpoint(self._store_id, row[0], row[3], entry.ts_end, sig,
                          self._public_key, entry_signed=True)

    def entries(self, since: int = 1, until: int | None = None) -> Iterator[SignedEntry]:
        """Entries ``since`` to ``until`` (inclusive; None: the last), each verified
        (hash, signature, store) and chained to the one before it, streamed from one
        read snapshot on a connection of its own (appends go on meanwhile). A search
        entry is yielded once the signature that covers it (the next seal or signed
        entry) is read and checked; entries no signature covers yet (an unsealed tail, at
        most ``SYNC_WINDOW`` old on a live store, which a writable trail seals first) are
        left out.

        Raises:
            InvalidInput: ``since`` or ``until`` is not a positive int.
            IntegrityError: an entry fails verification, does not chain, or is missing
                (the message names its seq); the entries before it were yielded.
            AuditError: the file cannot be read.
        """
        for bound in (since, until):
            if bound is not None and (type(bound) is not int or not 1 <= bound < 1 << 63):
                raise InvalidInput("since and until must be audit sequence numbers (>= 1)")
        with self._lock:
            self._ensure_open()
            if not self._read_only:
                self._seal_head()
        last = (1 << 63) - 1 if until is None else until
        expected, prev_hash = max(1, since - 1), None
        waiting: list[tuple[AuditEntry, bytes, bytes]] = []  # for the signature covering them
        with self._reader(expected) as (rows, _):  # one snapshot; read on to a signature
            for row in rows:
                seq = row[0]
                found, entry, actual, prev, kind = self._inspect(row)
                if seq != expected:
                    raise IntegrityError(f"audit entry {expected} is missing")
                if prev_hash is not None and prev != prev_hash:
                    found.append("chain broken")
                if row[5] is not None and not self._sig_ok(actual, row[5]):
                    found.append("seal invalid")
                if found or entry is None or prev is None:
                    raise IntegrityError(f"audit entry {seq} failed verification")
                if since <= seq <= last:
                    waiting.append((entry, actual, prev))
                sig = row[4] if kind == "sig" else row[5]
                if sig is not None:
                    for e, h, p in waiting:
                        yield SignedEntry(e, h, p, sig, seq)
                    waiting.clear()
                    if seq >= last:
                        return
                expected, prev_hash = seq + 1, actual

    def _newest_row(self) -> Any:
        """The newest row of the file, or None (under ``self._lock``)."""
        try:
            return self._conn.execute(f"{_COLS} ORDER BY seq DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            raise AuditError("cannot read the audit trail") from exc

    def sync(self) -> None:
        """Seal the head and make every appended entry durable now.

        Raises:
            AuditError: the seal or the fsync failed.
        """
        with self._lock:
            self._ensure_open()
            if not self._read_only:
                self._seal_head()
            self._sync_files()

    def backup(self, dest: Path) -> None:
        """Copy the trail to a new 0600 file through SQLite's online backup API.

        Raises:
            StoreExists: ``dest`` exists. AuditError: the copy failed (nothing left behind).
        """
        dest = Path(dest)
        with self._lock:
            self._ensure_open()
            if not self._read_only:
                self._seal_head()  # the copy verifies to its last entry
            try:
                _files.sqlite_backup(self._conn, dest)
            except FileExistsError:
                raise StoreExists(f"{dest} exists") from None
            except (sqlite3.Error, OSError) as exc:
                raise AuditError("the audit trail could not be backed up") from exc

    def close(self) -> None:
        """Seal, sync and close; idempotent. Raises: AuditError: the final seal or fsync
        failed.
        (A read-only trail wrote nothing and syncs nothing.)"""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._lock:
            try:
                if not self._read_only:
                    self._seal_head()
                    self._sync_files()
            finally:
                self._conn.close()

    def _newer_head(self) -> tuple[int, bytes]:
        """The head in the file, if it extends the head held (read-only trails)."""
        seq, digest = self._head
        try:
            head = self._read_head()
            held = self._conn.execute("SELECT hash FROM entries WHERE seq = ?",
                                      (seq,)).fetchone()
        except sqlite3.Error as exc:
            raise AuditError("cannot read the audit trail") from exc
        if head[0] < seq or held is None or held[0] != digest:
            raise IntegrityError(f"audit entry {seq} is missing or rewritten since this "
                                 "trail read it")
        return head

    def _key_problems(self, named: object, signed: set[bytes]) -> list[str]:
        """The public key's copies must agree: the clear one in ``meta``, the signed ones
        in entries, and the key this trail verifies with."""
        if named is None and not signed:
            return []  # a trail from before keys were published (a writable open adds it)
        if named is None:
            return ["the public key is missing from the meta table"]
        if not signed:
            return ["no signed entry carries the public key of the meta table"]
        if signed != {named}:
            return ["the public key in the meta table differs from the signed one"]
        if self._public_key is not None and named != self._public_key:
            return ["the trail names another public key than this store's"]
        return []

    def _ensure_open(self) -> None:
        if self._closed:
            raise AuditError("the audit trail is closed")
        if self._sync_failed:
            raise AuditError("the audit trail could not be synced")

    def _sync_loop(self) -> None:
        """Background group commit: seal the head, then fsync the WAL once per window that
        saw search entries, so one fsync makes both durable. The fsync runs outside the
        append lock, so searches never wait for the disk."""
        while True:
            self._wake.wait()
            if self._stop.wait(SYNC_WINDOW):  # the window's entries gather behind one fsync
                return  # close() syncs what is left
            with self._lock:
                self._wake.clear()
                if self._closed:
                    return
                self._pending = 0  # claimed: the fsync below covers them and any later
                try:
                    self._seal_head()
                except AuditError:
                    self._sync_failed = True
                    return
            try:
                for name in (self._path.name + "-wal", self._path.name):
                    with contextlib.suppress(FileNotFoundError):
                        _fsync(self._path.with_name(name))
            except OSError:
                self._sync_failed = True
                return

    def _query(self, sql: str, arg: int) -> list[Any]:
        with self._lock:
            self._ensure_open()
            try:
                return self._conn.execute(sql, (arg,)).fetchall()
            except sqlite3.Error as exc:
                raise AuditError("cannot read the audit trail") from exc

    def _sign(self, message: bytes) -> bytes:
        try:
            sig = self._signer(message)
        except Exception as exc:
            raise AuditError("the audit signer failed") from exc
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise AuditError("the audit signer returned a malformed signature")
        return sig

    def _mac_of(self, digest: bytes) -> bytes:
        try:
            mac = self._mac(digest) if self._mac is not None else None
        except Exception as exc:
            raise AuditError("the audit MAC failed") from exc
        if not isinstance(mac, bytes) or len(mac) != _MAC_SIZE:
            raise AuditError("the audit MAC is malformed")
        return mac

    def _seal_head(self) -> None:
        """Sign the head into ``seals`` if no signature covers it yet (under
        ``self._lock``; the caller fsyncs). Raises: AuditError: not signed or written."""
        seq, digest = self._head
        if seq <= self._sealed:
            return
        sig = self._sign(digest)
        try:
            self._conn.execute("INSERT INTO seals VALUES (?, ?)", (seq, sig))
        except sqlite3.Error as exc:
            raise AuditError("the audit trail could not be sealed") from exc
        self._sealed = seq

    def _signed_point(self) -> tuple[Any, bytes]:
        """(row, signature) of the newest entry signed or sealed; (None, b"") if the trail
        is empty. Under ``self._lock``."""
        try:
            seal = None
            if _has_table(self._conn, "seals"):
                seal = self._conn.execute(
                    _SEALED.replace("LEFT JOIN", "JOIN") + " ORDER BY e.seq DESC LIMIT 1",
                    (1, (1 << 63) - 1)).fetchone()
            own = self._conn.execute(  # only the searches after the seal are scanned
                f"{_COLS} WHERE seq > ? AND length(sig) = {_SIG_SIZE} "
                "ORDER BY seq DESC LIMIT 1", (0 if seal is None else seal[0],)).fetchone()
        except sqlite3.Error as exc:
            raise AuditError("cannot read the audit trail") from exc
        if own is not None:
            return own, own[4]
        if seal is not None:
            return seal, seal[5]
        return self._newest_row(), b""

    def _covered(self, seq: int, digest: bytes) -> bool:
        """Whether a signature at or after entry ``seq`` (hash ``digest``) covers it: the
        next seal or signed entry checks out and every entry up to it chains (for readers
        without the MAC key)."""
        expected, link = seq, digest
        with self._reader(seq) as (rows, _):
            for row in rows:
                found, entry, actual, prev, kind = self._inspect(row)
                if (found or entry is None or row[0] != expected
                        or (actual if row[0] == seq else prev) != link):
                    return False
                if kind == "sig" or (row[5] is not None and self._sig_ok(actual, row[5])):
                    return True
                expected, link = row[0] + 1, actual
        return False

    def _sig_ok(self, message: bytes, sig: object) -> bool:
        try:  # a verifier must return True itself; truthy is not enough
            return isinstance(sig, bytes) and self._verifier(message, sig) is True
        except Exception:
            return False

    def _sync_files(self) -> None:
        # fsync on any descriptor flushes the file: one covers every WAL frame written so far.
        try:
            for name in (self._path.name + "-wal", self._path.name):
                with contextlib.suppress(FileNotFoundError):
                    _fsync(self._path.with_name(name))
        except OSError as exc:
            raise AuditError("the audit trail could not be synced") from exc
        self._pending = 0

    def _inspect(self, row: Any) -> tuple[list[str], AuditEntry | None, bytes, bytes | None,
                                          str]:
        """Check one row on its own: (problems, entry, recomputed hash, body's prev, kind),
        kind "sig" (its own signature checks out), "mac" (its MAC does) or "open" (a MAC
        this trail has no key for: a later signature must cover it)."""
        seq, ref, body, digest, sig = row[:5]
        actual = hashlib.sha256(_ENTRY_DOMAIN + body).digest() if isinstance(body, bytes) else b""
        found = [] if digest == actual else ["hash mismatch"]
        kind = "sig"
        if isinstance(sig, bytes) and len(sig) == _MAC_SIZE and self.macs_possible:
            kind = "open" if self._mac is None else "mac"
            if self._mac is not None and not sealing.mac_equal(self._mac_of(actual), sig):
                found.append("MAC invalid")
        elif not self._sig_ok(actual, sig):
            found.append("signature invalid")
        try:
            entry, prev, store = _parse(body)
        except ValueError:
            return [*found, "body unreadable"], None, actual, None, kind
        for good, problem in ((entry.seq == seq, "body seq mismatch"),
                              (store == self._store_id, "entry of another store"),
                              (entry.fields.get("ref_seq") == ref, "ref_seq column mismatch"),
                              (seq != 1 or entry.event == "create", "not a genesis entry")):
            if not good:
                found.append(problem)
        return found, entry, actual, prev, kind

    def _checked(self, row: Any) -> AuditEntry:
        found, entry, actual, _, kind = self._inspect(row)
        if found or entry is None:
            raise IntegrityError(f"audit entry {row[0]} failed verification")
        if kind == "open" and not self._covered(row[0], actual):
            raise IntegrityError(f"audit entry {row[0]} is not sealed yet (or its seal is "
                                 "missing): no signature covers it")
        return entry


class AuditView:
    """The audit trail as a store's callers see it: verify it, checkpoint it, read it."""

    def __init__(self, trail: AuditTrail, public_key: bytes) -> None:
        self._trail = trail
        self.public_key = public_key  # Ed25519, raw 32 bytes: hand it to auditors

    def __repr__(self) -> str:
        return f"AuditView(public_key={self.public_key.hex()})"

    def verify(self, checkpoint: Checkpoint | None = None) -> AuditReport:
        """Check chain, signatures and, given a checkpoint kept elsewhere, truncation."""
        return self._trail.verify(checkpoint=checkpoint)

    def checkpoint(self) -> Checkpoint:
        """A signed (seq, head hash, public key): keep it outside this host (a witness).
        A read-only handle signs the head the file has now.

        Raises:
            AuditError: the trail could not be synced or signed.
            IntegrityError: (read-only) the file lost entries this handle saw.
        """
        return self._trail.checkpoint()

    def get(self, seq: int) -> AuditEntry:
        """One verified entry.

        Raises:
            RecordNotFound: no such entry. IntegrityError: it fails verification.
        """
        return self._trail.get(seq)

    def entries(self, since: int = 1, until: int | None = None) -> Iterator[SignedEntry]:
        """Verified, chained entries ``since`` to ``until`` (inclusive), streamed; for
        the regulator's view of them see :func:`biotemplate.audit_export.export_audit`.

        Raises:
            InvalidInput: bad bounds. IntegrityError: an entry fails verification or
                does not chain (those before it were yielded). AuditError: unreadable.
        """
        return self._trail.entries(since, until)


def _offline(path: str | os.PathLike[str]) -> AuditTrail | str:
    """A read-only trail over a store's ``audit.db`` with the public key the file names
    (no master key), or the problem that prevents one.

    Raises:
        StoreNotFound: no audit trail at ``path``.
    """
    if isinstance(path, str) and path.startswith(("postgresql://", "postgres://")):
        from .audit_pg import offline_pg  # the audit module itself knows no server

        return offline_pg(path)
    file = Path(path)
    if file.is_dir():
        file = file / "audit.db"
    if not file.is_file():
        raise StoreNotFound(f"no audit trail at {file}")
    conn = None
    try:
        conn = _files.sqlite_connect(file, "ro")
        meta = _meta(conn)
    except sqlite3.Error:
        if conn is not None:
            conn.close()
        return "audit database unreadable"
    key, store = meta.get("public_key"), meta.get("store_id")
    try:
        verifier = sealing.verifier_for(key) if isinstance(key, bytes) else None
    except ValueError:
        verifier = None
    if verifier is None or not isinstance(store, bytes):
        conn.close()
        return ("audit.db names no usable public key (a trail created before keys were "
                "published gets one on its store's next writable open)")
    return AuditTrail(conn, file, store, _cannot_sign, verifier, _no_clock, public_key=key,
                      read_only=True)


@contextlib.contextmanager
def offline_trail(path: str | os.PathLike[str]) -> Iterator[AuditTrail]:
    """A store's audit trail opened read-only with the public key it names, for
    auditors without the master key and beside a running writer (``mode=ro``): it can
    :meth:`~AuditTrail.verify`, read :meth:`~AuditTrail.entries` and take an
    :meth:`~AuditTrail.entry_checkpoint`; it appends and signs nothing.

    Raises:
        StoreNotFound: no audit trail at ``path``.
        AuditError: the file is unreadable or names no public key.
    """
    trail = _offline(path)
    if isinstance(trail, str):
        raise AuditError(trail)
    try:
        yield trail
    finally:
        trail.close()


def checkpoint_audit(path: str | os.PathLike[str]) -> Checkpoint:
    """A checkpoint of a store's audit trail without its master key (version 3: signed
    by the head entry itself), for a witness. ``path`` is the store folder or the
    ``audit.db`` file; the file is opened read-only and may be live under a writer.
    Verify the trail first (:func:`verify_audit`): this checks only the head entry.

    Raises:
        StoreNotFound: no audit trail at ``path``.
        AuditError: the file is unreadable or names no public key.
        IntegrityError: no entries, or the newest fails verification.
    """
    with offline_trail(path) as trail:
        return trail.entry_checkpoint()


def verify_audit(path: str | os.PathLike[str],
                 checkpoint: Checkpoint | None = None) -> AuditReport:
    """Verify a store's audit trail without its master key: for auditors, off the host.

    ``path`` is the store folder (or a backup folder), or the ``audit.db`` file itself. The
    file is opened read-only (``mode=ro``; it may be live under a writer) and every entry's
    chain link and signature is checked against the public key the file names, whose clear
    copy must equal the signed one. Problems are reported, not raised.

    Without a checkpoint this shows the trail is whole and consistent *under the key it
    names*: a file rewritten from scratch under a new key passes. Pass the newest
    checkpoint a witness holds: its key must be the file's, and truncation or an old
    file restored is then found too.

    A trail created before public keys were published names none: open its store once
    writable (that adds it), or verify with the master key (``store.audit.verify()``).

    ``path`` may be a PostgreSQL store URL: the auditor role needs only SELECT on the
    audit tables (docs/scale-out.md).

    Raises:
        StoreNotFound: no audit trail at ``path``.
    """
    trail = _offline(path)
    if isinstance(trail, str):
        return AuditReport(False, 0, (trail,))
    try:
        return trail.verify(checkpoint)
    finally:
        trail.close()


def _cannot_sign(message: bytes) -> bytes:
    raise AuditError("an offline verification signs nothing")


def _no_clock() -> datetime:
    raise AuditError("an offline verification reads no clock")


_fsync = _files.fsync_file  # a name the durability tests can spy on


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether the table exists (``meta`` and ``seals`` are missing from older trails)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def _meta(conn: sqlite3.Connection) -> dict[str, Any]:
    """The ``meta`` rows; {} for a trail created before the table existed."""
    if not _has_table(conn, "meta"):
        return {}
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def _us(moment: object) -> int:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise InvalidInput("audit times must be timezone-aware datetimes (UTC)")
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _dt(us: int) -> datetime:
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


_PLAIN = frozenset({str, bytes, float, bool, type(None)})  # taken as they are


def _normalise(value: Any, name: str, depth: int) -> Any:
    """Admit msgpack primitives only; sort dict keys so that bodies are canonical."""
    kind = type(value)
    if kind in _PLAIN:  # the common case, checked by exact type before the general one
        return value
    if kind is list and set(map(type, value)) <= _PLAIN:  # e.g. a search's record ids
        return list(value)
    if depth <= 8:
        if value is None or isinstance(value, bool | str | bytes | float):
            return value
        if isinstance(value, int) and -(1 << 63) <= value < (1 << 64):
            return value
        if isinstance(value, list | tuple):
            return [_normalise(v, name, depth + 1) for v in value]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _normalise(value[k], name, depth + 1) for k in sorted(value)}
    # Name the type, never the value: it could be a template or a subject id.
    raise InvalidInput(f"audit field {name!r}: {type(value).__name__} is not a msgpack "
                       "primitive (or is out of range, or nested too deeply)")


def _pack(obj: Any) -> bytes:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a lone surrogate in a str
        raise InvalidInput("audit data cannot be encoded") from exc


def _unpack(data: object, limit: int) -> Any:
    if not isinstance(data, bytes) or len(data) > limit:
        raise ValueError("not bytes, or too large")
    try:  # bounded lengths, no ext types; msgpack's own errors are ValueErrors
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=limit,
                               max_bin_len=limit, max_array_len=limit, max_map_len=limit,
                               max_ext_len=0)
    except (TypeError, msgpack.UnpackException) as exc:
        raise ValueError("malformed") from exc


def _parse(body: object) -> tuple[AuditEntry, bytes, bytes]:
    """Decode and type-check a body: (entry, prev, store). Raises ValueError."""
    d = _unpack(body, _MAX_BODY)
    if not (isinstance(d, dict) and set(d) == _KEYS and d["v"] == 1
            and type(d["seq"]) is int and isinstance(d["prev"], bytes) and len(d["prev"]) == 32
            and isinstance(d["store"], bytes) and type(d["ts0"]) is int
            and type(d["ts1"]) is int and isinstance(d["event"], str)
            and (d["actor"] is None or isinstance(d["actor"], str))
            and d["outcome"] in _OUTCOMES and isinstance(d["f"], dict)
            and all(isinstance(k, str) for k in d["f"])):
        raise ValueError("malformed body")
    entry = AuditEntry(d["seq"], _dt(d["ts0"]), _dt(d["ts1"]), d["event"], d["actor"],
                       d["outcome"], MappingProxyType(d["f"]))
    return entry, d["prev"], d["store"]
