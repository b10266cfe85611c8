"""The audit trail of a store on PostgreSQL: one chain that every instance appends to.

The entries, their hashing and signing are the ones of ``audit.py`` (this is a subclass
that only changes where rows live). What differs, and why:

- **One chain for many instances.** An append locks the chain with a transaction-scoped
  advisory lock, reads the head from the table and inserts after it
  (``PostgresBackend.audit_append``): instances append one at a time, the chain never
  forks, and no instance needs to hold the head in memory.
- **Atomic with the rows.** A mutation's entry is written by the records transaction
  itself (same connection), so it commits or rolls back with the rows: the audit never
  claims what did not commit, and no "rollback" entry is needed after a failed commit.
- **Durability.** Mutations commit as usual (``synchronous_commit`` as the server sets
  it, ``on`` by default). Search entries commit with ``synchronous_commit = off`` for
  their transaction: the server's WAL writer flushes them within about three
  ``wal_writer_delay`` (600 ms by default), the counterpart of the SQLite trail's group
  commit; a server crash can lose the search entries of that window, never a mutation's.
- **Every entry signed.** Search entries are not MAC'd and sealed as in ``audit.db``
  (no ``mac`` is passed): instances share no syncer that could seal for all of them.
- **Reading.** ``verify`` walks the table in a ``REPEATABLE READ`` snapshot on a
  connection of its own; ``checkpoint`` signs the head of the table as it is now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from .audit import (
    _COLS,
    AuditEntry,
    AuditTrail,
    Checkpoint,
    Signer,
    Verifier,
    _cannot_sign,
    _dt,
    _no_clock,
    _us,
)
from .backends.postgres import PostgresBackend
from .errors import AuditError, BiotemplateError, IntegrityError, InvalidInput, RecordNotFound

__all__ = ["PgAuditTrail", "offline_pg"]


def _psycopg_error() -> type[Exception]:
    import psycopg

    return psycopg.Error

_ROWS = _COLS.replace("FROM entries", "FROM {s}.audit_entries")


class PgAuditTrail(AuditTrail):
    """The audit trail in a store's PostgreSQL schema (``audit_entries``, ``audit_meta``)."""

    atomic_with_records = True
    macs_possible = False  # every entry here is signed: a 32-byte sig is a forgery

    def __init__(self, db: PostgresBackend, store_id: bytes, signer: Signer,
                 verifier: Verifier, clock: Callable[[], datetime], *,
                 public_key: bytes | None = None, read_only: bool = False) -> None:
        super().__init__(None, db.location.schema, store_id,  # type: ignore[arg-type]
                         signer, verifier, clock, public_key=public_key, read_only=read_only)
        self._db = db
        self._owns_db = False  # an offline trail (no store) closes its own connection

    def __repr__(self) -> str:
        return f"PgAuditTrail({self._db.location.display!r})"

    @classmethod
    def create_in(cls, db: PostgresBackend, *, store_id: bytes, signer: Signer,
                  verifier: Verifier, clock: Callable[[], datetime],
                  public_key: bytes) -> PgAuditTrail:
        """Write the genesis entry (carrying the public key) and the clear ``audit_meta``."""
        if not isinstance(store_id, bytes) or not 1 <= len(store_id) <= 64:
            raise InvalidInput("store_id must be 1 to 64 bytes")
        trail = cls(db, store_id, signer, verifier, clock, public_key=public_key)
        if db.audit_rows("WHERE seq = 1", ()):
            raise AuditError("the schema already holds an audit trail")
        trail.append("create", actor=None, public_key=public_key)
        db.put_audit_meta({"store_id": store_id, "public_key": public_key})
        return trail

    @classmethod
    def open_in(cls, db: PostgresBackend, *, store_id: bytes, signer: Signer,
                verifier: Verifier, clock: Callable[[], datetime], public_key: bytes,
                read_only: bool = False) -> PgAuditTrail:
        """Open the shared trail; its newest entry is verified.

        Raises:
            IntegrityError: no entries, or the newest is forged or another store's, or
                ``audit_meta`` names another key.
        """
        trail = cls(db, store_id, signer, verifier, clock, public_key=public_key,
                    read_only=read_only)
        named = db.audit_meta().get("public_key")
        if named is not None and named != public_key:
            raise IntegrityError("the audit trail names another public key than this store's")
        trail._head = trail._read_head()
        return trail

    # --- storage hooks ------------------------------------------------------------------

    def _write_entry(self, build: Callable[[int, bytes], tuple[bytes, bytes, bytes]],
                     ref: int | None, durable: bool) -> tuple[int, bytes]:
        try:
            return self._db.audit_append(build, ref, durable=durable)
        except BiotemplateError as exc:
            if isinstance(exc, InvalidInput | AuditError):
                raise
            raise AuditError(f"the audit entry could not be written ({exc})") from None

    def _write_entries(self, builds: Sequence[Callable[[int, bytes], tuple[bytes, bytes, bytes]]],
                       refs: Sequence[int | None]) -> list[tuple[int, bytes]]:
        """One by one: each append reads the shared head under the chain's row lock, and
        other instances' entries may fall between them."""
        return [self._write_entry(build, ref, False) for build, ref in zip(builds, refs,
                                                                          strict=True)]

    def _read_head(self) -> tuple[int, bytes]:
        rows = self._rows("ORDER BY seq DESC LIMIT 1", ())
        if not rows:
            raise IntegrityError("the audit trail has no entries: genesis missing")
        self._checked(rows[0])
        return rows[0][0], rows[0][3]

    def _rows(self, where: str, args: tuple[object, ...]) -> list[Any]:
        try:
            return self._db.audit_rows(where, args)
        except BiotemplateError as exc:
            raise AuditError("cannot read the audit trail") from exc

    @property
    def head_seq(self) -> int:
        """The seq of the newest entry in the shared trail (any instance's)."""
        with self._lock:
            self._ensure_open()
        return self._read_head()[0]

    def get(self, seq: int) -> AuditEntry:
        rows = self._rows("WHERE seq = %s", (seq,))
        if not rows:
            raise RecordNotFound(f"no audit entry {seq}")
        return self._checked(rows[0])

    def find(self, event: str, ref_seq: int) -> list[AuditEntry]:
        rows = self._rows("WHERE ref_seq = %s ORDER BY seq", (ref_seq,))
        return [e for e in map(self._checked, rows) if e.event == event]

    def last(self) -> AuditEntry | None:
        rows = self._rows("ORDER BY seq DESC LIMIT 1", ())
        return self._checked(rows[0]) if rows else None

    @contextlib.contextmanager
    def _reader(self, first: int = 1, last: int = (1 << 63) - 1,
                ) -> Iterator[tuple[Iterable[Any], object]]:
        try:
            conn = self._db.connect()
        except BiotemplateError as exc:
            raise AuditError("audit trail unreadable") from exc
        s = self._db.location.schema
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = dict(conn.execute(f"SELECT key, value FROM {s}.audit_meta").fetchall())  # noqa: S608
            named = bytes(meta["public_key"]) if "public_key" in meta else None
            cur = conn.cursor(name="biotemplate_audit_read")
            cur.itersize = 4096
            cur.execute(_ROWS.format(s=s) + " WHERE seq >= %s AND seq <= %s ORDER BY seq",
                        (first, last))
        except Exception as exc:
            conn.close()
            raise AuditError("audit trail unreadable") from exc

        def rows() -> Generator[Any, None, None]:
            try:
                batch = cur.fetchmany(4096)
                while batch:
                    for a, b, c, d, e in batch:  # no seals here: every entry is signed
                        yield (int(a), None if b is None else int(b), bytes(c), bytes(d),
                               bytes(e), None)
                    batch = cur.fetchmany(4096)
            except _psycopg_error() as exc:
                raise AuditError("audit trail unreadable") from exc

        walk = rows()
        try:
            yield walk, named
        finally:
            walk.close()
            conn.close()

    def _newest_row(self) -> Any:
        rows = self._rows("ORDER BY seq DESC LIMIT 1", ())
        return rows[0] if rows else None

    def _signed_point(self) -> tuple[Any, bytes]:
        row = self._newest_row()
        return (row, row[4]) if row is not None else (None, b"")

    def _seal_head(self) -> None:
        """Nothing to seal: every entry here is signed."""

    def checkpoint(self) -> Checkpoint:
        """Sign the shared trail's head as it is now (after checking it)."""
        with self._lock:
            self._ensure_open()
            self._flush()
            head = self._read_head()
            cp = Checkpoint(self._store_id, *head, _dt(_us(self._clock())), bytes(64),
                            self._public_key)
            return Checkpoint(cp.store_id, cp.seq, cp.head, cp.ts, self._sign(cp.message()),
                              cp.public_key)

    def sync(self) -> None:
        """Search entries commit asynchronously: force the WAL out now."""
        with self._lock:
            self._ensure_open()
            self._flush()

    def _flush(self) -> None:
        if self._read_only:
            return
        try:
            self._db.flush_wal()
        except BiotemplateError as exc:
            raise AuditError("the audit trail could not be synced") from exc

    def backup(self, dest: Any) -> None:
        raise AuditError("a PostgreSQL store is backed up with PostgreSQL's tools "
                         "(docs/scale-out.md)")

    def close(self) -> None:
        with self._lock:
            self._closed = True  # the connection belongs to the backend (closed by the vault)
        if self._owns_db:
            self._db.close()

    def _newer_head(self) -> tuple[int, bytes]:
        return self._read_head()


def offline_pg(url: str) -> PgAuditTrail | str:
    """A read-only trail of the PostgreSQL store at ``url`` with the public key it names
    (no master key; the auditor role's SELECT on the audit tables suffices), or the
    problem that prevents one (``audit.offline_trail``, ``verify_audit``).

    Raises:
        StoreNotFound: no store at ``url``. StorageError: the server cannot be reached.
    """
    from . import sealing
    from .backends.postgres import parse_url

    db = PostgresBackend.open(parse_url(url), read_only=True)
    try:
        meta = db.audit_meta()
    except BaseException:
        db.close()
        raise
    key, store = meta.get("public_key"), meta.get("store_id")
    try:
        verifier = sealing.verifier_for(key) if key is not None else None
    except ValueError:
        verifier = None
    if verifier is None or store is None:
        db.close()
        return "the store names no usable audit public key"
    trail = PgAuditTrail(db, store, _cannot_sign, verifier, _no_clock, public_key=key,
                         read_only=True)
    trail._owns_db = True
    return trail
