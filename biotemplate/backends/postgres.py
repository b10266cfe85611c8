"""The shared backend: one PostgreSQL schema holds everything a store keeps but its master key.

Several handles (workers, hosts) open the same store; each is an *instance* with its own
in-memory index. What they share lives here, in the schema named by the URL
(``postgresql://user@host:port/db?schema=NAME``, default ``biotemplate``):

- ``records``, ``subject_keys``, ``meta``: as in the SQLite backend (sealed rows, sealed
  subject-key entries, sealed settings);
- ``keyring``: one row, the key state sealed under the master key, with a version that
  every save compares and moves (compare-and-swap), so a stale instance can never write
  back old key state (:meth:`PostgresBackend.save_keyring`);
- ``audit_entries`` and ``audit_meta``: one hash-chained, signed audit trail for every
  instance; appends are serialised by a transaction-scoped advisory lock
  (:meth:`PostgresBackend.audit_append`), updates and deletes are refused by triggers;
- ``changes``: the change feed. Triggers log every write to ``records`` and ``keyring`` in
  the writing transaction, and a statement trigger sends ``NOTIFY`` on the store's channel.

Why a feed read by sequence number is safe here (``../shared/notes/pitfalls.md``): every
mutation holds the store's exclusive advisory lock from before its first write until after
its commit (:meth:`PostgresBackend.global_lock`), and a reader takes the same lock shared
while it reads the feed. So no change can commit behind a sequence number a reader has
already passed. NOTIFY only wakes readers; instances also poll, and catch up from the
table after a reconnect.

Connections: one per instance for rows, key state and audit (guarded by a re-entrant lock,
like the SQLite backend's: a transaction holds it from BEGIN to COMMIT), and one for LISTEN
(:meth:`PostgresBackend.listener`). A lost connection fails the call in progress with
``StorageError`` and is replaced on the next call. Messages name the operation and
PostgreSQL's SQLSTATE, never data values or the password.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from biotemplate.backends.base import RecordRow, purposes_column, purposes_of
from biotemplate.backends.pg_schema import (
    MIGRATIONS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    ddl,
    grant_statements,
)
from biotemplate.errors import (
    BiotemplateError,
    InvalidInput,
    RecordNotFound,
    StorageError,
    StoreExists,
    StoreNotFound,
)

if TYPE_CHECKING:
    import psycopg

    from biotemplate.backends.base import Backend

__all__ = ["PgLocation", "PostgresBackend", "grant_roles", "grant_statements", "is_url",
           "parse_url"]

DEFAULT_SCHEMA = "biotemplate"
CONNECT_TIMEOUT_S = 5
LOCK_TIMEOUT_S = 120.0  # a mutation waits this long for another instance's to finish
_COLUMNS = "seq, record_id, subject_ref, epoch, expiry_us, purposes, model, held, blob"
_TAG = _COLUMNS.replace("blob", "substr(blob, length(blob) - 15)")


def is_url(location: object) -> bool:
    """Whether a store location is a PostgreSQL URL (anything else is a SQLite folder)."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


@dataclass(frozen=True, slots=True)
class PgLocation:
    """A parsed store URL: the connection string (without ``schema``) and the schema."""

    conninfo: str
    schema: str

    def __repr__(self) -> str:
        return f"PgLocation({self.display!r})"

    @property
    def display(self) -> str:
        """The URL without its password, for messages and reprs."""
        parts = urlsplit(self.conninfo)
        host = parts.hostname or ""
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"postgresql://{user}{host}{port}{parts.path}?schema={self.schema}"

    @property
    def channel(self) -> str:
        return f"biotemplate_{self.schema}"

    def lock_key(self, name: str) -> int:
        """A 64-bit advisory lock id for this store (schema) and purpose."""
        digest = hashlib.sha256(f"biotemplate/{self.schema}/{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


def parse_url(url: str) -> PgLocation:
    """Split ``postgresql://...?schema=NAME``; the other query parameters are libpq's.

    Raises:
        InvalidInput: not a PostgreSQL URL, or a schema name that is not a plain lower-case
            identifier (it is formatted into SQL as an identifier, and names a channel).
    """
    if not is_url(url):
        raise InvalidInput("a PostgreSQL store location starts with postgresql://")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        raise InvalidInput("malformed PostgreSQL URL") from None
    schema = DEFAULT_SCHEMA
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    if not SCHEMA_NAME.fullmatch(schema):
        raise InvalidInput("schema must be a lower-case identifier of at most 48 characters "
                           "(letters, digits, underscore)")
    encoded = urlencode(rest, quote_via=quote)
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, encoded, ""))
    return PgLocation(conninfo, schema)


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StorageError("PostgreSQL stores need the 'postgres' extra: "
                           "pip install 'biotemplate[postgres]'") from None
    return psycopg


def _translate(exc: Exception, what: str) -> BiotemplateError:
    """Map a psycopg exception to ours; the message never carries data values."""
    psycopg = _psycopg()
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return InvalidInput(f"{what}: a record id already exists")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return StorageError(f"{what}: permission denied for this role (SQLSTATE {state})")
    if _lost(exc):
        return StorageError(f"{what}: lost the connection to PostgreSQL; the call did not "
                            "complete (the next call reconnects)")
    return StorageError(f"{what} failed (SQLSTATE {state or type(exc).__name__})")


def _lost(exc: Exception) -> bool:
    """A connection-level failure (the server went away, the session was terminated)."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, _psycopg().OperationalError) and (
        state is None or state.startswith(("08", "57P")))


def _row(r: Sequence[Any]) -> RecordRow:
    seq, record_id, subject_ref, epoch, expiry_us, purposes, model, held, blob = r
    return RecordRow(record_id, bytes(subject_ref), int(epoch), int(expiry_us),
                     purposes_of(purposes), model, bool(held), bytes(blob), int(seq))


def _params(r: RecordRow) -> tuple[object, ...]:
    return (r.record_id, r.subject_ref, r.epoch, r.expiry_us, purposes_column(r.purposes),
            r.model, r.held, r.blob)


class CommitUnknown(StorageError):
    """The connection was lost while COMMIT was in flight: the transaction may or may not
    have been applied. The store completes or forgets it on its next locked call."""


class PostgresBackend:
    """The :class:`~biotemplate.backends.base.Backend` over one PostgreSQL schema, plus the
    shared key state, the audit entries and the change feed. Build it with :meth:`create`
    or :meth:`open`."""

    def __init__(self, location: PgLocation, *, read_only: bool = False) -> None:
        self.location = location
        self._s = location.schema
        self._read_only = read_only
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._tx_depth = 0
        self._closed = False
        # The session holding the store's advisory lock, while one does: if it is lost,
        # nothing may go on on a new session (which would not hold the lock).
        self._locked: Any = None

    def __repr__(self) -> str:
        return f"PostgresBackend({self.location.display!r})"

    # --- connections --------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection to the server (also for the listener).

        Raises:
            StorageError: the server is unreachable, or refused the credentials.
        """
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(self.location.conninfo, autocommit=True,
                                   connect_timeout=CONNECT_TIMEOUT_S,
                                   fallback_application_name=f"biotemplate:{self._s}",
                                   keepalives=1, keepalives_idle=30, keepalives_interval=10,
                                   keepalives_count=3)
        except psycopg.OperationalError as exc:
            # libpq names host, port, user and database, never the password
            lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
            why = lines[-1][:300] if lines else type(exc).__name__
            raise StorageError(f"cannot connect to PostgreSQL at {self.location.display}: "
                               f"{why}") from None
        # Pinned, whatever the server's or role's defaults: the chain head is read inside
        # mutations (READ COMMITTED), and a mutation's commit is durable when it returns.
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        conn.execute("SET synchronous_commit = on")
        if self._read_only:
            conn.execute("SET default_transaction_read_only = on")
        return conn  # type: ignore[no-any-return]

    def _c(self) -> psycopg.Connection[Any]:
        """The instance's connection; replaced if it was lost (never inside a transaction)."""
        if self._closed:
            raise StorageError("the PostgreSQL backend is closed")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if self._tx_depth:
                raise StorageError("lost the connection to PostgreSQL inside a transaction")
            if self._locked is not None:  # the lock died with the session: fail the call
                raise StorageError("lost the connection to PostgreSQL while holding the "
                                   "store's lock; the call did not complete (the next "
                                   "call reconnects)")
            self._conn = conn = self.connect()
        return conn

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        psycopg = _psycopg()
        try:
            yield
        except psycopg.Error as exc:
            raise _translate(exc, what) from None

    def _query(self, what: str, sql: str, args: Sequence[object] = ()) -> list[Any]:
        """Run one statement; a read outside a transaction that meets a lost connection
        is run once more on a new one (nothing of it was applied), anything else fails."""
        with self._lock:
            try:
                with self._mapped(what):
                    return self._c().execute(sql, args).fetchall()
            except StorageError:
                if self._tx_depth or not self._broken():
                    raise
            with self._mapped(what):
                return self._c().execute(sql, args).fetchall()

    def _broken(self) -> bool:
        conn = self._conn
        return conn is None or conn.closed or conn.broken

    def _write(self, what: str, sql: str, rows: Sequence[Sequence[object]]) -> int:
        if not self._tx_depth:
            raise StorageError("write outside a transaction")
        with self._lock, self._mapped(what):
            cur = self._c().cursor()
            cur.executemany(sql, rows, returning=False)
            return cur.rowcount if cur.rowcount >= 0 else 0

    # --- lifecycle ----------------------------------------------------------------------

    @classmethod
    def create(cls, location: PgLocation) -> PostgresBackend:
        """Create the store's schema and tables (one transaction: all or nothing).

        Raises:
            StoreExists: the schema exists (it is never reused or overwritten).
            StorageError: the server is unreachable or the role may not create a schema.
        """
        db = cls(location)
        s = location.schema
        try:
            with db._lock, db._mapped("create schema"):
                conn = db._c()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (location.lock_key("ddl"),))
                    found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                         (s,)).fetchone()
                    if found:
                        raise StoreExists(f"{location.display} already holds a schema named "
                                          f"{s!r}; a store is never created over one")
                    conn.execute(f"CREATE SCHEMA {s}")
                    for statement in ddl(s):
                        conn.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def open(cls, location: PgLocation, *, read_only: bool = False) -> PostgresBackend:
        """Connect and check the schema is a store of a version this library reads; an
        older version is migrated (unless ``read_only``).

        Raises:
            StoreNotFound: no such schema, or it is not a biotemplate store.
            StorageError: unreachable server, bad credentials, or a newer schema version.
        """
        db = cls(location, read_only=read_only)
        try:
            db._check_version()
        except BaseException:
            db.close()
            raise
        return db

    def _check_version(self) -> None:
        s = self._s
        found = self._query("open", "SELECT c.relname FROM pg_class c JOIN pg_namespace n"
                            " ON n.oid = c.relnamespace WHERE n.nspname = %s"
                            " AND c.relname = 'schema_version'", (s,))
        if not found:
            raise StoreNotFound(f"{self.location.display} holds no biotemplate store")
        version = self._query("open", f"SELECT version FROM {s}.schema_version")  # noqa: S608
        if len(version) != 1:
            raise StoreNotFound(f"{self.location.display} holds no biotemplate store")
        current = int(version[0][0])
        if current > SCHEMA_VERSION:
            raise StorageError(f"the store's schema is version {current}; this library "
                               f"reads up to {SCHEMA_VERSION}: upgrade biotemplate")
        if current < SCHEMA_VERSION and not self._read_only:
            self._migrate(current)

    def _migrate(self, current: int) -> None:
        """Run the migrations from ``current`` up, each in one transaction, serialised."""
        s = self._s
        with self._lock, self._mapped("migrate"):
            conn = self._c()
            while current < SCHEMA_VERSION:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                 (self.location.lock_key("ddl"),))
                    found = int(conn.execute(f"SELECT version FROM {s}.schema_version"  # noqa: S608
                                             ).fetchone()[0])  # type: ignore[index]
                    if found == current:
                        for statement in MIGRATIONS[current]:
                            conn.execute(statement)
                        conn.execute(f"UPDATE {s}.schema_version SET version = %s",  # noqa: S608
                                     (current + 1,))
                    current = max(found, current + 1)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- transactions and the store's lock ----------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; other threads of this instance wait until it ends.

        Raises:
            StorageError: nested, or BEGIN/COMMIT failed or the connection was lost (the
                transaction is rolled back by the server: nothing of it is kept).
        """
        with self._lock:
            if self._tx_depth:
                raise StorageError("nested transaction")
            with self._mapped("begin"):
                tx = self._c().transaction()
                tx.__enter__()
            self._tx_depth = 1
            try:
                yield
            except BaseException as exc:
                self._tx_depth = 0
                with self._mapped("rollback"):
                    try:
                        tx.__exit__(type(exc), exc, exc.__traceback__)
                    except _psycopg().Error:
                        pass  # the original error matters more; the server rolls back
                raise
            self._tx_depth = 0
            try:
                tx.__exit__(None, None, None)
            except _psycopg().Error as exc:
                if _lost(exc):  # the COMMIT was sent: it may have been applied
                    raise CommitUnknown("lost the connection to PostgreSQL during COMMIT: "
                                        "the call may have completed (the next call of "
                                        "any instance completes it if it did)") from None
                raise _translate(exc, "commit") from None

    @property
    def in_transaction(self) -> bool:
        return self._tx_depth > 0

    @contextmanager
    def global_lock(self, *, shared: bool = False) -> Iterator[None]:
        """The store's lock across instances: exclusive for a mutation (from before its
        first write to after its commit and key-state save), shared for a reader of the
        change feed. A session-level advisory lock on this instance's connection.

        Raises:
            StorageError: the connection failed.
        """
        key = self.location.lock_key("writer")
        take, give = (("pg_try_advisory_lock_shared", "pg_advisory_unlock_shared") if shared
                      else ("pg_try_advisory_lock", "pg_advisory_unlock"))
        # Polled, not waited for: waiting would hold this instance's connection (and its
        # searches' confirmations and audit entries) for as long as another instance's
        # mutation runs. Given up after LOCK_TIMEOUT_S with a clear error.
        deadline, pause = time.monotonic() + LOCK_TIMEOUT_S, 0.002
        while True:
            with self._lock:
                if self._locked is not None:
                    raise StorageError("the store's lock is already held by this instance")
                if self._query("lock", f"SELECT {take}(%s)", (key,))[0][0]:
                    conn = self._locked = self._conn
                    break
            if time.monotonic() > deadline:
                raise StorageError(f"the store's lock was not granted within "
                                   f"{LOCK_TIMEOUT_S:.0f} s (another instance's long "
                                   "mutation, or a session holding it)")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:  # not held across the body: other threads use the session meanwhile
            yield
        finally:
            with self._lock:
                self._locked = None
                if conn is not None and conn is self._conn and not self._broken():
                    try:
                        conn.execute(f"SELECT {give}(%s)", (key,))
                    except _psycopg().Error:  # never raised: the body's outcome stands;
                        conn.close()          # ending the session releases its locks

    # --- meta, rows ---------------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        found = self._query("get_meta", f"SELECT value FROM {self._s}.meta WHERE key = %s",  # noqa: S608
                            (key,))
        return bytes(found[0][0]) if found else None

    def put_meta(self, key: str, value: bytes) -> None:
        self._write("put_meta", f"INSERT INTO {self._s}.meta VALUES (%s, %s) ON CONFLICT (key)"  # noqa: S608
                    " DO UPDATE SET value = excluded.value", [(key, value)])

    def insert(self, rows: Sequence[RecordRow]) -> None:
        """Add rows (``seq`` assigned here); the trigger logs one 'add' change each.

        Raises:
            InvalidInput: a record id already exists, or a purpose tag holds a comma.
        """
        params = [_params(r) for r in rows]
        self._write("insert", f"INSERT INTO {self._s}.records (record_id, subject_ref, epoch,"  # noqa: S608
                    " expiry_us, purposes, model, held, blob) VALUES"
                    " (%s, %s, %s, %s, %s, %s, %s, %s)", params)

    def update(self, rows: Sequence[RecordRow]) -> None:
        """Reseal in place: expiry, epoch, held and blob change, ``seq`` stays; logged
        'reseal'.

        Raises:
            RecordNotFound: a row to reseal does not exist (nothing may vanish silently).
        """
        n = self._write("update", f"UPDATE {self._s}.records SET expiry_us = %s, epoch = %s,"  # noqa: S608
                        " held = %s, blob = %s WHERE record_id = %s",
                        [(r.expiry_us, r.epoch, r.held, r.blob, r.record_id) for r in rows])
        if n != len(rows):
            raise RecordNotFound("a record to reseal is gone")

    def delete(self, record_ids: Sequence[str]) -> int:
        if not self._tx_depth:
            raise StorageError("write outside a transaction")
        if not record_ids:
            return 0
        found = self._query("delete", f"DELETE FROM {self._s}.records WHERE record_id ="  # noqa: S608
                            " ANY(%s) RETURNING 1", (list(record_ids),))
        return len(found)

    def _select(self, what: str, where: str, args: Sequence[object], tail: str = "",
                columns: str = _COLUMNS) -> list[RecordRow]:
        sql = f"SELECT {columns} FROM {self._s}.records WHERE {where} ORDER BY seq{tail}"  # noqa: S608
        return [_row(r) for r in self._query(what, sql, args)]

    def get(self, record_id: str) -> RecordRow | None:
        found = self._select("get", "record_id = %s", (record_id,))
        return found[0] if found else None

    def headers(self, record_ids: Sequence[str]) -> list[RecordRow]:
        if not record_ids:
            return []
        return self._select("headers", "record_id = ANY(%s)", (list(record_ids),), columns=_TAG)

    def by_subject(self, subject_ref: bytes) -> list[RecordRow]:
        return self._select("by_subject", "subject_ref = %s", (subject_ref,))

    def expired(self, now_us: int) -> list[RecordRow]:
        return self._select("expired", "expiry_us <= %s", (now_us,), columns=_TAG)

    def below_epoch(self, epoch: int) -> list[RecordRow]:
        return self._select("below_epoch", "NOT held AND epoch < %s", (epoch,), columns=_TAG)

    def scan(self, batch_size: int = 4096) -> Iterator[list[RecordRow]]:
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        return self._scan(batch_size, _COLUMNS)

    def scan_headers(self, batch_size: int = 16384) -> Iterator[list[RecordRow]]:
        return self._scan(batch_size, _TAG)

    def _scan(self, batch_size: int, columns: str) -> Iterator[list[RecordRow]]:
        last = 0
        while True:
            batch = self._select("scan", "seq > %s", (last, batch_size), " LIMIT %s", columns)
            if batch:
                yield batch
            if len(batch) < batch_size:
                return
            last = batch[-1].seq

    def rows_by_ids(self, record_ids: Sequence[str]) -> list[RecordRow]:
        """Whole rows of these ids (absent ones left out): the feed reads new rows so."""
        if not record_ids:
            return []
        return self._select("rows", "record_id = ANY(%s)", (list(record_ids),))

    def external_version(self) -> None:
        return None  # other instances write all the time: confirm every candidate

    def last_change(self) -> int:
        found = self._query("last_change", f"SELECT COALESCE(MAX(seq), 0) FROM {self._s}.changes")  # noqa: S608
        return int(found[0][0])

    def changes_after(self, seq: int, limit: int = 2048) -> list[tuple[int, str, str]]:
        """(seq, record id, op) of the changes after ``seq``, oldest first; op is 'add',
        'reseal', 'del' or 'keys' (the key state was saved). Read under the shared
        :meth:`global_lock`, so none can still commit below the last one returned."""
        found = self._query("changes", f"SELECT seq, record_id, op FROM {self._s}.changes"  # noqa: S608
                            " WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit))
        return [(int(a), str(b), str(c)) for a, b, c in found]

    def subject_refs(self) -> set[bytes]:
        return {bytes(r[0]) for r in self._query(
            "subject_refs", f"SELECT DISTINCT subject_ref FROM {self._s}.records")}  # noqa: S608

    def count(self) -> int:
        return int(self._query("count", f"SELECT COUNT(*) FROM {self._s}.records")[0][0])  # noqa: S608

    # --- subject-key entries ------------------------------------------------------------

    def get_entry(self, bucket: int, subject_ref: bytes) -> bytes | None:
        found = self._query("get_entry", f"SELECT blob FROM {self._s}.subject_keys"  # noqa: S608
                            " WHERE bucket = %s AND subject_ref = %s", (bucket, subject_ref))
        return bytes(found[0][0]) if found else None

    def bucket_entries(self, bucket: int) -> list[tuple[bytes, bytes]]:
        found = self._query("bucket_entries", f"SELECT subject_ref, blob FROM {self._s}"  # noqa: S608
                            ".subject_keys WHERE bucket = %s ORDER BY subject_ref", (bucket,))
        return [(bytes(r), bytes(b)) for r, b in found]

    def put_entries(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        self._write("put_entries", f"INSERT INTO {self._s}.subject_keys VALUES (%s, %s, %s)"  # noqa: S608
                    " ON CONFLICT (bucket, subject_ref) DO UPDATE SET blob = excluded.blob",
                    entries)

    def delete_entries(self, keys: Sequence[tuple[int, bytes]]) -> int:
        if not self._tx_depth:
            raise StorageError("write outside a transaction")
        if not keys:
            return 0
        found = self._query("delete_entries", f"DELETE FROM {self._s}.subject_keys"  # noqa: S608
                            " WHERE (bucket, subject_ref) IN (SELECT * FROM"
                            " unnest(%s::integer[], %s::bytea[])) RETURNING 1",
                            ([b for b, _ in keys], [r for _, r in keys]))
        return len(found)

    def scan_entries(self, batch_size: int = 16384) -> Iterator[list[tuple[int, bytes, bytes]]]:
        last: tuple[int, bytes] = (-1, b"")
        while True:
            found = self._query("scan_entries", f"SELECT bucket, subject_ref, blob FROM {self._s}"  # noqa: S608
                                ".subject_keys WHERE (bucket, subject_ref) > (%s, %s)"
                                " ORDER BY bucket, subject_ref LIMIT %s", (*last, batch_size))
            batch = [(int(b), bytes(r), bytes(x)) for b, r, x in found]
            if batch:
                yield batch
            if len(batch) < batch_size:
                return
            last = batch[-1][:2]

    def entry_count(self) -> int:
        return int(self._query("entry_count", f"SELECT COUNT(*) FROM {self._s}.subject_keys")[0][0])  # noqa: S608

    # --- the key state ------------------------------------------------------------------

    def keyring_version(self) -> int:
        """The key state's version (0: none saved yet). One indexed read: instances ask
        it before each mutation to learn whether another instance changed the keys."""
        found = self._query("keyring", f"SELECT version FROM {self._s}.keyring WHERE id = 1")  # noqa: S608
        return int(found[0][0]) if found else 0

    def load_keyring(self) -> tuple[int, bytes] | None:
        """(version, sealed key state), or None if none was saved."""
        found = self._query("keyring", f"SELECT version, blob FROM {self._s}.keyring"  # noqa: S608
                            " WHERE id = 1")
        return (int(found[0][0]), bytes(found[0][1])) if found else None

    def save_keyring(self, blob: bytes, expected: int) -> int:
        """Replace the sealed key state if its version is still ``expected``; returns the
        new version. Its own transaction unless one is open (then it commits with it).

        Raises:
            StorageError: another instance saved the key state since ``expected`` was read
                (a stale instance must never write back old keys).
        """
        s = self._s
        sql = (f"INSERT INTO {s}.keyring VALUES (1, 1, %s) ON CONFLICT DO NOTHING RETURNING version"  # noqa: S608
               if expected == 0 else
               f"UPDATE {s}.keyring SET blob = %s, version = version + 1"  # noqa: S608
               " WHERE id = 1 AND version = %s RETURNING version")
        args: tuple[object, ...] = (blob,) if expected == 0 else (blob, expected)
        with self._lock, self._mapped("save keyring"):
            conn = self._c()
            if self._tx_depth:
                found = conn.execute(sql, args).fetchall()
            else:
                with conn.transaction():
                    found = conn.execute(sql, args).fetchall()
        if not found:
            raise StorageError("the key state was changed by another instance since this one "
                               "read it: refused (reopen, or retry the call)")
        return int(found[0][0])

    # --- audit entries ------------------------------------------------------------------

    def audit_append(self, build: Any, ref_seq: int | None, *,
                     durable: bool = True) -> tuple[int, bytes]:
        """Append one entry to the shared chain: lock the chain (a transaction-scoped
        advisory lock, so instances append one at a time), read its head, let ``build(seq,
        prev_hash)`` make (body, hash, signature), insert. Inside an open transaction the
        entry commits with it (a mutation's rows and entry are one commit); otherwise in a
        short transaction of its own. Returns (seq, hash)."""
        s = self._s
        with self._lock, self._mapped("audit append"):
            conn = self._c()

            def run() -> tuple[int, bytes]:
                # a row lock (needs UPDATE on audit_lock, which only the service role has),
                # not an advisory lock any role that can connect could take
                conn.execute(f"SELECT 1 FROM {s}.audit_lock WHERE id = 1 FOR UPDATE")  # noqa: S608
                head = conn.execute(f"SELECT seq, hash FROM {s}.audit_entries"  # noqa: S608
                                    " ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (int(head[0]) + 1, bytes(head[1])) if head else (1, bytes(32))
                body, digest, sig = build(seq, prev)
                conn.execute(f"INSERT INTO {s}.audit_entries VALUES (%s, %s, %s, %s, %s)",  # noqa: S608
                             (seq, ref_seq, body, digest, sig))
                return seq, digest

            if self._tx_depth:
                return run()
            with conn.transaction():
                if not durable:  # a search's entry: flushed by the WAL writer shortly
                    conn.execute("SET LOCAL synchronous_commit = off")
                return run()

    def flush_wal(self) -> None:
        """Make every commit so far durable: a transaction that takes an id commits
        synchronously, and its flush covers the asynchronous commits before it."""
        with self._lock, self._mapped("flush"):
            conn = self._c()
            with conn.transaction():
                conn.execute("SELECT pg_current_xact_id()")

    def audit_rows(self, where: str, args: Sequence[object]) -> list[Any]:
        """Rows (seq, ref_seq, body, hash, sig) of the audit trail; ``where`` is a fixed
        fragment of the audit module (values are bound)."""
        found = self._query("audit read", f"SELECT seq, ref_seq, body, hash, sig FROM {self._s}"  # noqa: S608
                            f".audit_entries {where}", args)
        return [(int(a), None if b is None else int(b), bytes(c), bytes(d), bytes(e))
                for a, b, c, d, e in found]

    def audit_meta(self) -> dict[str, bytes]:
        found = self._query("audit meta", f"SELECT key, value FROM {self._s}.audit_meta")  # noqa: S608
        return {str(k): bytes(v) for k, v in found}

    def put_audit_meta(self, values: dict[str, bytes]) -> None:
        with self._lock, self._mapped("audit meta"):
            conn = self._c()
            with conn.transaction():
                for key, value in values.items():
                    conn.execute(f"INSERT INTO {self._s}.audit_meta VALUES (%s, %s)"  # noqa: S608
                                 " ON CONFLICT DO NOTHING", (key, value))

    # --- operations ---------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Nothing to do per call: deleted tuples stay until VACUUM (see docs/scale-out.md
        on crypto-shredding and MVCC); autovacuum reclaims them."""

    def backup(self, dest: Path) -> None:
        raise StorageError("a PostgreSQL store is backed up with PostgreSQL's tools "
                           "(pg_dump --schema, or base backups): see docs/scale-out.md")

    def stats(self) -> dict[str, int]:
        found = self._query("stats", f"SELECT COUNT(*), COUNT(*) FILTER (WHERE held),"  # noqa: S608
                            f" COUNT(DISTINCT subject_ref) FROM {self._s}.records")
        rows, held, subjects = found[0]
        return {"rows": int(rows), "held_rows": int(held), "subjects": int(subjects)}

    def drop(self) -> None:
        """Drop the store's schema (tests, and operators retiring a store)."""
        with self._lock, self._mapped("drop schema"):
            self._c().execute(f"DROP SCHEMA IF EXISTS {self._s} CASCADE")


def grant_roles(url: str, *, service: str | None = None, auditor: str | None = None) -> None:
    """Run :func:`grant_statements` for the store at ``url`` (as its owner); the roles
    must exist. One transaction.

    Raises:
        StoreNotFound: no store at ``url``. StorageError: the grants failed.
    """
    db = PostgresBackend.open(parse_url(url))
    try:
        with db._lock, db._mapped("grant"):
            conn = db._c()
            with conn.transaction():
                for statement in grant_statements(db.location.schema, service=service,
                                                  auditor=auditor):
                    conn.execute(statement)
    finally:
        db.close()


if TYPE_CHECKING:
    _CONFORMS: type[Backend] = PostgresBackend
