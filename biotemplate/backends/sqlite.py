"""The embedded records backend: one SQLite file behind one lock-guarded connection.

Durability and erasure choices, and why:

* ``journal_mode=WAL``: readers never block the writer; a crash mid-write leaves the last
  committed state. ``synchronous=FULL``: every COMMIT is fsynced before it returns, since
  an acknowledged enrolment or erasure is a promise a power cut must not undo.
* ``secure_delete=ON``, set rather than trusting the build default: freed cells and pages
  are zeroed, so an erased record's ciphertext does not survive in the main file. Old page
  images can still sit in the log, hence :meth:`SQLiteBackend.checkpoint` (TRUNCATE),
  which the store calls after deletes and purges.
* ``page_size=16384``, set before the first table: sealed rows are ~2 KiB, and larger
  pages waste less space and read faster. ``trusted_schema=OFF``: an edited file's schema
  must not run functions on our behalf. Files are created 0600.
* Copies only through SQLite's backup API (:meth:`SQLiteBackend.backup`): copying the file
  under a live writer can capture a torn database.

A read-only open (``open(path, read_only=True)``, for auditors beside a running writer)
connects with ``mode=ro`` and ``query_only``, and writes nothing to the database: no
schema upgrade, no checkpoint on close. SQLite's WAL needs the ``-wal`` and ``-shm`` files
to read: while a writer holds the database they exist and the reader shares them; when
none does, SQLite creates them empty (with the database's permissions) and leaves them
for the next writer, which checkpoints and removes them when it closes.

The connection is in autocommit mode and ``transaction()`` issues ``BEGIN IMMEDIATE``, so
a writer takes the lock up front instead of failing halfway. A re-entrant lock, held by a
transaction from BEGIN to COMMIT, serialises threads, so none reads uncommitted rows.
Every ``sqlite3`` exception is translated (corruption to ``IntegrityError``, the rest to
``StorageError``); messages name the operation and SQLite's error code, never row data.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biotemplate import _files
from biotemplate.backends.base import RecordRow, purposes_column, purposes_of
from biotemplate.errors import (
    BiotemplateError,
    IntegrityError,
    InvalidInput,
    RecordNotFound,
    StorageError,
    StoreExists,
    StoreNotFound,
)

if TYPE_CHECKING:
    from biotemplate.backends.base import Backend

__all__ = ["SQLiteBackend"]

SCHEMA_VERSION = 2  # 2: the subject_keys table (a version 1 file gets it on open)
PAGE_SIZE = 16384
BUSY_TIMEOUT_MS = 5000
_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
_COLUMNS = "seq, record_id, subject_ref, epoch, expiry_us, purposes, model, held, blob"
_HEADERS = _COLUMNS.replace("blob", "substr(CAST(blob AS BLOB), -16)")  # blob: its tag
_VERSION_POLL = 0.002  # seconds between looks at a write transaction's version
_PAGE = 1024  # rows a purge's selection reads per hold of the connection (~10 ms)
_INSERT = (
    "INSERT INTO records (record_id, subject_ref, epoch, expiry_us, purposes, model, held, blob)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# Every write to ``records`` is logged by SQLite itself, in the same transaction: the
# store's own writes and anyone else's made through SQLite (a CLI, a script), so an index
# snapshot notices any row written after it without reading the rows.
_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS records_add AFTER INSERT ON records"
    " BEGIN INSERT INTO changes (record_id, op) VALUES (NEW.record_id, 'add'); END",
    "CREATE TRIGGER IF NOT EXISTS records_reseal AFTER UPDATE ON records"
    " BEGIN INSERT INTO changes (record_id, op) VALUES (NEW.record_id, 'reseal'); END",
    "CREATE TRIGGER IF NOT EXISTS records_del AFTER DELETE ON records"
    " BEGIN INSERT INTO changes (record_id, op) VALUES (OLD.record_id, 'del'); END",
)
# Version 2: per-subject keys, sealed under their bucket's key (``subject_keys.py``). The
# primary key leads with the bucket and the table has no rowid, so the entries of one
# bucket sit together: a rotation reseals a few contiguous pages.
_V2 = (
    "CREATE TABLE IF NOT EXISTS subject_keys (bucket INTEGER NOT NULL,"
    " subject_ref BLOB NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (bucket, subject_ref))"
    " WITHOUT ROWID",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_UPSERT_META = (
    "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " record_id TEXT NOT NULL UNIQUE, subject_ref BLOB NOT NULL, epoch INTEGER NOT NULL,"
    " expiry_us INTEGER NOT NULL, purposes TEXT NOT NULL, model TEXT NOT NULL,"
    " held INTEGER NOT NULL, blob BLOB NOT NULL)",
    "CREATE INDEX records_subject ON records (subject_ref)",
    "CREATE INDEX records_expiry ON records (expiry_us)",
    "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " record_id TEXT NOT NULL, op TEXT NOT NULL)",
    *_TRIGGERS,
    *_V2,
)
_PRAGMAS = ("synchronous=FULL", "secure_delete=ON", "foreign_keys=ON", "trusted_schema=OFF")


def _translate(exc: sqlite3.Error, what: str) -> BiotemplateError:
    """Map a sqlite3 exception to ours; the message never carries data values."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    if isinstance(exc, sqlite3.DatabaseError) and (
        "malformed" in text or "not a database" in text or (code or 0) & 0xFF in _CORRUPT_CODES
    ):
        return IntegrityError("records database is corrupt")
    return StorageError(
        f"{what} failed ({getattr(exc, 'sqlite_errorname', None) or type(exc).__name__})"
    )


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Translate lower-layer exceptions raised in the block, so no sqlite3 one leaks."""
    try:
        yield
    except sqlite3.Error as exc:
        raise _translate(exc, what) from None
    except OverflowError:
        raise InvalidInput("integer out of range for the records database") from None


def _new_file(path: Path, what: str) -> None:
    """Create an empty 0600 file; never overwrite (a store or a backup)."""
    try:
        _files.create_exclusive(path)
    except FileExistsError:
        raise StoreExists(f"{what} already exists: {path}") from None
    except OSError as exc:
        raise StorageError(f"cannot create {what} ({exc.strerror})") from None


def _connect(path: Path, mode: str = "rw") -> sqlite3.Connection:
    """Open an existing file only (``mode=rw`` or ``ro``): SQLite must never create one
    implicitly."""
    return _files.sqlite_connect(path, mode, timeout=BUSY_TIMEOUT_MS / 1000)


def _configure(conn: sqlite3.Connection) -> None:
    if str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower() != "wal":
        raise StorageError("write-ahead logging is unavailable for the records database")
    for pragma in (*_PRAGMAS, f"busy_timeout={BUSY_TIMEOUT_MS}"):
        conn.execute(f"PRAGMA {pragma}")


def _start(path: Path, *, new: bool, read_only: bool = False) -> sqlite3.Connection:
    """Connect; a new file gets page size and schema, an old one is checked before writing
    (a read-only connection is checked and then only configured to read)."""
    conn: sqlite3.Connection | None = None
    try:
        with _mapped("open"):
            conn = _connect(path, "ro" if read_only else "rw")
            if new:
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL and any table
            else:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:  # an empty or foreign SQLite file where ours should be
                    raise IntegrityError("records database is corrupt")
                if version not in (1, SCHEMA_VERSION):
                    raise StorageError("unsupported records database schema version")
            if read_only:
                for pragma in ("query_only=ON", "trusted_schema=OFF",
                               f"busy_timeout={BUSY_TIMEOUT_MS}"):
                    conn.execute(f"PRAGMA {pragma}")
                return conn
            _configure(conn)
            conn.execute("BEGIN IMMEDIATE")
            # a file from before the triggers existed gets them here (IF NOT EXISTS), one of
            # version 1 the subject_keys table, in the same transaction
            for statement in _SCHEMA if new else (*_TRIGGERS, *_V2):
                conn.execute(statement)
            conn.execute("COMMIT")
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return conn


def _row(r: Any) -> RecordRow:
    seq, record_id, subject_ref, epoch, expiry_us, purposes, model, held, blob = r
    return RecordRow(record_id, subject_ref, epoch, expiry_us, purposes_of(purposes), model,
                     bool(held), blob, seq)


def _params(r: RecordRow) -> tuple[object, ...]:
    return (r.record_id, r.subject_ref, r.epoch, r.expiry_us, purposes_column(r.purposes),
            r.model, int(r.held), r.blob)


class SQLiteBackend:
    """The :class:`~biotemplate.backends.base.Backend` over one SQLite file.

    Build it with :meth:`create` or :meth:`open`, which configure the connection. Every
    method raises ``StorageError`` when the database fails and ``IntegrityError`` when it
    is corrupt; writes (``insert``, ``update``, ``delete``, ``put_meta``) raise
    ``StorageError`` outside ``transaction()``, a guard against forgetting one.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path
        self._lock = threading.RLock()
        self._in_tx = False
        self._tx_version: int | None = None  # data_version during this connection's write

    @classmethod
    def create(cls, path: Path) -> SQLiteBackend:
        """Create an empty records database; a failure leaves no file, so a retry works.

        Raises:
            StoreExists: the file already exists (it is never overwritten).
            StorageError: the file could not be created or initialised.
        """
        path = Path(path)
        _new_file(path, "records database")
        try:
            return cls(_start(path, new=True), path)
        except BaseException:
            _files.remove_sqlite(path)
            raise

    @classmethod
    def open(cls, path: Path, *, read_only: bool = False) -> SQLiteBackend:
        """Open an existing records database, checking it before anything is written.
        ``read_only``: never write to it (``mode=ro``); writes raise ``StorageError``.

        Raises:
            StoreNotFound: there is no file at ``path``.
            IntegrityError: the file is corrupt, or not a biotemplate records database.
            StorageError: the file could not be opened, or has an unknown schema version.
        """
        path = Path(path)
        if not path.is_file():
            raise StoreNotFound(f"no records database at {path}")
        return cls(_start(path, new=False, read_only=read_only), path)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; other threads wait on the lock until it ends.

        Raises:
            StorageError: nested in another transaction, or BEGIN/COMMIT failed (a failed
                COMMIT is rolled back).
        """
        with self._lock:
            if self._in_tx:
                raise StorageError("nested transaction")
            with _mapped("begin"):
                self._conn.execute("BEGIN IMMEDIATE")
                # No other connection can commit while this one holds the write lock, so
                # the version stays this until its COMMIT has finished (its fsync
                # included): searches read it without waiting for the lock (a purge's
                # transaction and commit must not stall them; issue 13). It is cleared
                # the moment COMMIT returns: a commit by another connection squeezed into
                # that instant is seen by the search after the next one.
                self._tx_version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            self._in_tx = True
            try:
                yield
                with _mapped("commit"):
                    self._conn.execute("COMMIT")
                self._tx_version = None
            except BaseException:
                self._tx_version = None
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original exception matters more; close rolls back too
                raise
            finally:
                self._in_tx = False

    def _write(self, sql: str, params: Sequence[tuple[object, ...]]) -> int:
        """Run ``sql`` once per tuple, only inside a transaction; returns rows changed."""
        if not self._in_tx:
            raise StorageError("write outside a transaction")
        return self._conn.executemany(sql, params).rowcount

    def _query(self, what: str, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock, _mapped(what):
            return self._conn.execute(sql, args).fetchall()

    def get_meta(self, key: str) -> bytes | None:
        """Store-level metadata (salts, wrapped keys, settings) by key, or None."""
        found = self._query("get_meta", "SELECT value FROM meta WHERE key = ?", (key,))
        return found[0][0] if found else None

    def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace one metadata value."""
        with self._lock, _mapped("put_meta"):
            self._write(_UPSERT_META, [(key, value)])

    def insert(self, rows: Sequence[RecordRow]) -> None:
        """Add rows (``seq`` assigned here); the trigger logs one 'add' change each.

        Raises:
            InvalidInput: a record id already exists, or a purpose tag holds a comma.
        """
        params = [_params(r) for r in rows]
        with self._lock, _mapped("insert"):
            try:
                self._write(_INSERT, params)
            except sqlite3.IntegrityError as exc:
                if "records.record_id" in str(exc):
                    raise InvalidInput("record id already exists") from None
                raise

    def update(self, rows: Sequence[RecordRow]) -> None:
        """Reseal in place: expiry, epoch, held and blob change, ``seq`` stays; logged
        'reseal'.

        Raises:
            RecordNotFound: a row to reseal does not exist (nothing may vanish silently).
        """
        sql = ("UPDATE records SET expiry_us = ?, epoch = ?, held = ?, blob = ?"
               " WHERE record_id = ?")
        with self._lock, _mapped("update"):
            for r in rows:
                if self._write(sql, [(r.expiry_us, r.epoch, int(r.held), r.blob,
                                      r.record_id)]) != 1:
                    raise RecordNotFound("cannot reseal a record that does not exist")

    def delete(self, record_ids: Sequence[str]) -> int:
        """Delete rows by id (logged 'del' by the trigger); returns how many existed."""
        deleted = 0
        with self._lock, _mapped("delete"):
            for record_id in record_ids:
                deleted += self._write("DELETE FROM records WHERE record_id = ?", [(record_id,)])
        return deleted

    def get_entry(self, bucket: int, subject_ref: bytes) -> bytes | None:
        """One subject-key entry's sealed blob, or None."""
        found = self._query("get_entry", "SELECT blob FROM subject_keys WHERE bucket = ?"
                            " AND subject_ref = ?", (bucket, subject_ref))
        return bytes(found[0][0]) if found else None

    def bucket_entries(self, bucket: int) -> list[tuple[bytes, bytes]]:
        """(subject ref, blob) of every entry of one bucket (contiguous pages)."""
        found = self._query("bucket_entries", "SELECT subject_ref, blob FROM subject_keys"
                            " WHERE bucket = ?", (bucket,))
        return [(bytes(ref), bytes(blob)) for ref, blob in found]

    def put_entries(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Insert or replace (bucket, subject ref, blob) entries, inside a transaction."""
        with self._lock, _mapped("put_entries"):
            self._write("INSERT OR REPLACE INTO subject_keys (bucket, subject_ref, blob)"
                        " VALUES (?, ?, ?)", entries)

    def delete_entries(self, keys: Sequence[tuple[int, bytes]]) -> int:
        """Delete entries by (bucket, subject ref); returns how many existed."""
        deleted = 0
        with self._lock, _mapped("delete_entries"):
            for key in keys:
                deleted += self._write("DELETE FROM subject_keys WHERE bucket = ?"
                                       " AND subject_ref = ?", [key])
        return deleted

    def scan_entries(self, batch_size: int = 16384) -> Iterator[list[tuple[int, bytes, bytes]]]:
        """Every (bucket, subject ref, blob) entry in key order, ``batch_size`` at a time."""
        sql = ("SELECT bucket, subject_ref, blob FROM subject_keys WHERE (bucket, subject_ref)"
               " > (?, ?) ORDER BY bucket, subject_ref LIMIT ?")
        last: tuple[int, bytes] = (-1, b"")
        while True:
            found = self._query("scan_entries", sql, (*last, batch_size))
            batch = [(int(b), bytes(ref), bytes(blob)) for b, ref, blob in found]
            if batch:
                yield batch
            if len(batch) < batch_size:
                return
            last = (batch[-1][0], batch[-1][1])

    def entry_count(self) -> int:
        """How many subject-key entries are stored."""
        return int(self._query("entry_count", "SELECT COUNT(*) FROM subject_keys")[0][0])

    def external_version(self) -> int:
        """SQLite's ``data_version``: moves when another connection commits (an edit
        with the triggers dropped, another tool), not on this connection's commits.
        During this connection's write transaction, the value read at its BEGIN: no
        other connection can commit before it ends, and the caller need not wait."""
        while True:
            during = self._tx_version
            if during is not None:
                return during
            # Poll instead of queueing on the lock: a writer that takes it for a whole
            # transaction (a purge: ~1 s) sets the version within a poll, and the lock is
            # not fair (a writer issuing query after query would win it every time).
            if self._lock.acquire(timeout=_VERSION_POLL):
                try:
                    with _mapped("data_version"):
                        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
                finally:
                    self._lock.release()

    def last_change(self) -> int:
        """The newest change sequence number; 0 when nothing was ever written."""
        return int(self._query("last_change", "SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    def _select(
        self, what: str, where: str, args: tuple[object, ...], tail: str = "",
        columns: str = _COLUMNS,
    ) -> list[RecordRow]:
        # Only fixed fragments from this module are formatted in; values are always bound.
        sql = f"SELECT {columns} FROM records WHERE {where} ORDER BY seq{tail}"  # noqa: S608
        return [_row(r) for r in self._query(what, sql, args)]

    def scan_headers(self, batch_size: int = 16384) -> Iterator[list[RecordRow]]:
        """Every row with ``blob`` cut to its last 16 bytes (the AEAD tag), in seq order.

        Cheap enough to run on every open: it lets a loaded index snapshot check that no
        row changed behind its back without decrypting anything.
        """
        columns = _HEADERS
        batch = self._select("scan", "seq > ?", (0, batch_size), " LIMIT ?", columns)
        while batch:
            yield batch
            if len(batch) < batch_size:
                return
            batch = self._select("scan", "seq > ?", (batch[-1].seq, batch_size), " LIMIT ?",
                                 columns)

    def headers(self, record_ids: Sequence[str]) -> list[RecordRow]:
        """The rows of these ids (absent ones left out) with ``blob`` cut to its AEAD tag,
        in one query: a search confirms its candidates against their rows with it."""
        if not record_ids:
            return []
        marks = ",".join("?" * len(record_ids))  # placeholders only; values are bound
        return self._select("headers", f"record_id IN ({marks})", tuple(record_ids),
                            columns=_HEADERS)

    def get(self, record_id: str) -> RecordRow | None:
        """One row by id, or None."""
        found = self._select("get", "record_id = ?", (record_id,))
        return found[0] if found else None

    def by_subject(self, subject_ref: bytes) -> list[RecordRow]:
        """Every row of one subject (indexed), in ``seq`` order."""
        return self._select("by_subject", "subject_ref = ?", (subject_ref,))

    def expired(self, now_us: int) -> list[RecordRow]:
        """Rows whose expiry is at or before ``now_us`` (indexed), held or not, with
        ``blob`` cut to its tag: a purge deletes them, and reading 10% of a store's
        ciphertext would hold the connection (and searches) for ~100 ms."""
        return self._paged("expired", "expiry_us <= ?", (now_us,), "expiry_us")

    def below_epoch(self, epoch: int) -> list[RecordRow]:
        """Rows not held whose epoch is below ``epoch`` (their key is destroyed), with
        ``blob`` cut to its tag, as ``expired``."""
        return self._paged("below_epoch", "held = 0 AND epoch < ?", (epoch,), "seq")

    def _paged(self, what: str, where: str, args: tuple[object, ...],
               key: str) -> list[RecordRow]:
        """The headers of the rows ``where`` selects, in ``seq`` order, read ``_PAGE`` at a
        time, taking the connection's lock per page: a purge reads 10 % of a store, ~100 ms
        in one query at 100k, during which no search could read ``data_version``.

        Keyset pages, each one index seek: by ``seq``, or by (``key``, ``seq``) on
        ``key``'s index, where a page that ends inside a run of equal keys (an enrolment
        batch shares its expiry) is followed by the rest of that run (``key = ? AND
        seq > ?``) before the next key: a row-value comparison would seek by ``key``
        alone and re-read the run for every page.
        """
        # Only fixed fragments from this module are formatted in; values are always bound.
        head = f"SELECT {_HEADERS}, {key} FROM records WHERE ({where}) AND "  # noqa: S608
        by_seq = head + "seq > ? ORDER BY seq LIMIT ?"
        in_run = head + f"{key} = ? AND seq > ? ORDER BY seq LIMIT ?"
        after = head + f"{key} > ? ORDER BY {key}, seq LIMIT ?"
        rows: list[RecordRow] = []
        last_key: int | None = None  # inside a run of this key, after ``last_seq``
        last_seq, floor = 0, -(1 << 63)
        while True:
            if key == "seq":
                page = self._query(what, by_seq, (*args, last_seq, _PAGE))
            elif last_key is not None:
                page = self._query(what, in_run, (*args, last_key, last_seq, _PAGE))
            else:
                page = self._query(what, after, (*args, floor, _PAGE))
            rows.extend(_row(r[:-1]) for r in page)
            if page:
                last_seq = page[-1][0]
            if len(page) == _PAGE:
                last_key = None if key == "seq" else page[-1][-1]
                continue
            if key == "seq" or last_key is None:
                return sorted(rows, key=lambda r: r.seq)
            floor, last_key = last_key, None  # the run is done: the next key on

    def scan(self, batch_size: int = 4096) -> Iterator[list[RecordRow]]:
        """Every row in ``seq`` order, ``batch_size`` at a time, never all in memory.

        Keyset pagination (``seq > last``) makes each batch one index seek, and the lock is
        taken per batch, so a slow consumer does not block writers in between.

        Raises:
            InvalidInput: ``batch_size`` is below 1 (at the call, not on iteration).
        """
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        return self._scan(batch_size)

    def _scan(self, batch_size: int) -> Iterator[list[RecordRow]]:
        batch = self._select("scan", "seq > ?", (0, batch_size), " LIMIT ?")
        while batch:
            yield batch
            if len(batch) < batch_size:
                return
            batch = self._select("scan", "seq > ?", (batch[-1].seq, batch_size), " LIMIT ?")

    def subject_refs(self) -> set[bytes]:
        """The distinct subject refs that still have a row."""
        return {
            r[0] for r in self._query("subject_refs", "SELECT DISTINCT subject_ref FROM records")
        }

    def count(self) -> int:
        """How many rows are stored (expired ones too, until purged)."""
        return int(self._query("count", "SELECT COUNT(*) FROM records")[0][0])

    def stats(self) -> dict[str, int]:
        """Sizes for operators: rows, held rows, subjects, page size, file and log bytes."""
        sql = "SELECT COUNT(*), COALESCE(SUM(held), 0), COUNT(DISTINCT subject_ref) FROM records"
        with self._lock, _mapped("stats"):
            rows, held, subjects = self._conn.execute(sql).fetchone()
            page_size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        file_bytes = _files.size_of(self._path)
        wal_bytes = _files.size_of(Path(f"{self._path}-wal"))
        return {
            "rows": rows,
            "held_rows": held,
            "subjects": subjects,
            "page_size": page_size,
            "file_bytes": file_bytes,
            "wal_bytes": wal_bytes,
        }

    def checkpoint(self) -> None:
        """Copy the log into the main file and truncate it to zero bytes.

        Raises:
            StorageError: inside a transaction, or readers kept it from completing.
        """
        with self._lock, _mapped("checkpoint"):
            if self._in_tx:
                raise StorageError("checkpoint inside a transaction")
            if self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                raise StorageError("checkpoint incomplete (database busy)")

    def backup(self, dest: Path) -> None:
        """Copy the database to a new 0600 file through SQLite's online backup API.

        Raises:
            StoreExists: ``dest`` exists (it is never overwritten).
            StorageError: inside a transaction, or the copy failed (nothing is left behind).
        """
        dest = Path(dest)
        with self._lock:
            if self._in_tx:
                raise StorageError("backup inside a transaction")
            try:
                with _mapped("backup"):
                    _files.sqlite_backup(self._conn, dest)
            except FileExistsError:
                raise StoreExists(f"backup target already exists: {dest}") from None
            except OSError as exc:
                raise StorageError(f"cannot write the backup ({exc.strerror})") from None

    def close(self) -> None:
        """Close the connection (idempotent); SQLite checkpoints and removes the log."""
        with self._lock, _mapped("close"):
            self._conn.close()


if TYPE_CHECKING:
    _CONFORMS: type[Backend] = SQLiteBackend
