"""SQLiteBackend: file lifecycle, pragmas, the Backend protocol, transactions, errors."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from biotemplate.backends import sqlite as sqlite_module
from biotemplate.backends.base import Backend, RecordRow
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.errors import (
    IntegrityError,
    InvalidInput,
    RecordNotFound,
    StorageError,
    StoreExists,
    StoreNotFound,
)


def make_row(
    i: int,
    *,
    subject: int = 0,
    epoch: int = 5,
    expiry_us: int = 1_000,
    held: bool = False,
    purposes: tuple[str, ...] = ("access", "audit"),
) -> RecordRow:
    return RecordRow(
        record_id=f"{i:032x}",
        subject_ref=subject.to_bytes(32, "big"),
        epoch=epoch,
        expiry_us=expiry_us,
        purposes=purposes,
        model="arcface-r100",
        held=held,
        blob=bytes([i % 256]) * 2048,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


@pytest.fixture
def backend(db_path: Path) -> Iterator[SQLiteBackend]:
    b = SQLiteBackend.create(db_path)
    yield b
    b.close()


def insert(b: SQLiteBackend, *rows: RecordRow) -> None:
    with b.transaction():
        b.insert(list(rows))


def strip_seq(row: RecordRow | None) -> RecordRow | None:
    if row is None:
        return None
    return RecordRow(
        row.record_id,
        row.subject_ref,
        row.epoch,
        row.expiry_us,
        row.purposes,
        row.model,
        row.held,
        row.blob,
    )


# --- create / open -------------------------------------------------------------------


def test_conforms_to_protocol(backend: SQLiteBackend) -> None:
    as_protocol: Backend = backend
    assert as_protocol.count() == 0


def test_create_refuses_existing_file(db_path: Path) -> None:
    db_path.write_bytes(b"")
    with pytest.raises(StoreExists):
        SQLiteBackend.create(db_path)
    assert db_path.read_bytes() == b""  # untouched


def test_create_refuses_existing_store(backend: SQLiteBackend, db_path: Path) -> None:
    with pytest.raises(StoreExists):
        SQLiteBackend.create(db_path)


def test_create_file_is_private(backend: SQLiteBackend, db_path: Path) -> None:
    assert db_path.stat().st_mode & 0o077 == 0


def test_create_in_missing_folder_is_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        SQLiteBackend.create(tmp_path / "nope" / "records.db")


def test_open_missing_raises_store_not_found(db_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        SQLiteBackend.open(db_path)
    assert not db_path.exists()  # open never creates


def test_open_reads_what_create_wrote(backend: SQLiteBackend, db_path: Path) -> None:
    insert(backend, make_row(1))
    with backend.transaction():
        backend.put_meta("salt", b"\x00\x01")
    backend.close()
    reopened = SQLiteBackend.open(db_path)
    try:
        assert reopened.count() == 1
        assert reopened.get_meta("salt") == b"\x00\x01"
        assert strip_seq(reopened.get(make_row(1).record_id)) == make_row(1)
    finally:
        reopened.close()


def test_close_is_idempotent_and_later_use_is_storage_error(backend: SQLiteBackend) -> None:
    backend.close()
    backend.close()
    with pytest.raises(StorageError):
        backend.count()


# --- pragmas ---------------------------------------------------------------------------


def pragma(b: SQLiteBackend, name: str) -> object:
    return b._conn.execute(f"PRAGMA {name}").fetchone()[0]


@pytest.mark.parametrize("reopen", [False, True])
def test_pragmas_in_effect(backend: SQLiteBackend, db_path: Path, reopen: bool) -> None:
    b = backend
    if reopen:
        backend.close()
        b = SQLiteBackend.open(db_path)
    try:
        assert pragma(b, "journal_mode") == "wal"
        assert pragma(b, "synchronous") == 2  # FULL
        assert pragma(b, "secure_delete") == 1
        assert pragma(b, "foreign_keys") == 1
        assert pragma(b, "page_size") == 16384
        assert pragma(b, "busy_timeout") == 5000
        assert pragma(b, "trusted_schema") == 0
        assert b._conn.isolation_level is None
    finally:
        b.close()


def test_stats(backend: SQLiteBackend) -> None:
    insert(
        backend, make_row(1, subject=1), make_row(2, subject=1, held=True), make_row(3, subject=2)
    )
    stats = backend.stats()
    assert stats["rows"] == 3
    assert stats["held_rows"] == 1
    assert stats["subjects"] == 2
    assert stats["page_size"] == 16384
    assert stats["file_bytes"] > 0


# --- reads and writes ------------------------------------------------------------------


def test_insert_get_assigns_increasing_seq(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1), make_row(2))
    first, second = backend.get(make_row(1).record_id), backend.get(make_row(2).record_id)
    assert first is not None and second is not None
    assert 0 < first.seq < second.seq
    assert strip_seq(first) == make_row(1)
    assert backend.get("f" * 32) is None


def test_purposes_round_trip_sorted_and_empty(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1, purposes=("b", "a")), make_row(2, purposes=()))
    one, two = backend.get(make_row(1).record_id), backend.get(make_row(2).record_id)
    assert one is not None and one.purposes == ("a", "b")
    assert two is not None and two.purposes == ()


def test_purpose_with_comma_refused(backend: SQLiteBackend) -> None:
    with pytest.raises(InvalidInput), backend.transaction():
        backend.insert([make_row(1, purposes=("a,b",))])
    assert backend.count() == 0


def test_by_subject_and_subject_refs(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1, subject=7), make_row(2, subject=8), make_row(3, subject=7))
    rows = backend.by_subject((7).to_bytes(32, "big"))
    assert [r.record_id for r in rows] == [make_row(1).record_id, make_row(3).record_id]
    assert backend.by_subject(b"\xff" * 32) == []
    assert backend.subject_refs() == {(7).to_bytes(32, "big"), (8).to_bytes(32, "big")}


def test_expired_is_inclusive_and_ignores_hold(backend: SQLiteBackend) -> None:
    insert(
        backend,
        make_row(1, expiry_us=100),
        make_row(2, expiry_us=200, held=True),
        make_row(3, expiry_us=201),
    )
    assert [r.record_id for r in backend.expired(200)] == [
        make_row(1).record_id,
        make_row(2).record_id,
    ]
    assert backend.expired(99) == []


def test_below_epoch_skips_held(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1, epoch=3), make_row(2, epoch=3, held=True), make_row(3, epoch=4))
    assert [r.record_id for r in backend.below_epoch(4)] == [make_row(1).record_id]
    assert len(backend.below_epoch(5)) == 2


@pytest.mark.parametrize("page", [1, 2, 3, 7, 1024])
def test_a_purge_selection_read_in_pages_is_the_whole_selection_in_seq_order(
        backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch, page: int) -> None:
    """A purge's selection takes the connection's lock per page (searches read the
    database's version in between); pages meet at ties of the key and in any seq order."""
    expiries = [50, 10, 50, 50, 10, 99, 50, 30, 10, 200, 50, 10]
    insert(backend, *(make_row(i, expiry_us=e, epoch=i % 3, held=i % 5 == 0)
                      for i, e in enumerate(expiries)))
    with backend.transaction():
        backend.delete([make_row(6).record_id])
    monkeypatch.setattr(sqlite_module, "_PAGE", page)
    taken = []
    real = backend._query

    def query(what: str, sql: str, args: tuple[object, ...] = ()) -> list[object]:
        found = real(what, sql, args)
        taken.append((what, len(found)))
        return found

    monkeypatch.setattr(backend, "_query", query)
    expected = [make_row(i).record_id for i, e in enumerate(expiries) if e <= 50 and i != 6]
    assert [r.record_id for r in backend.expired(50)] == expected
    sizes = [n for what, n in taken if what == "expired"]
    assert len(sizes) >= len(expected) // page + 1 and max(sizes) <= page  # a page a query
    assert all(len(r.blob) == 16 for r in backend.expired(50))  # the tag only
    expected = [make_row(i).record_id for i in range(12) if i % 3 < 2 and i % 5 and i != 6]
    assert [r.record_id for r in backend.below_epoch(2)] == expected
    assert backend.expired(0) == [] and backend.below_epoch(0) == []


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_scan_batches_in_seq_order(backend: SQLiteBackend, batch_size: int) -> None:
    insert(backend, *(make_row(i) for i in range(10)))
    with backend.transaction():
        backend.delete([make_row(4).record_id])  # a gap in seq
    batches = list(backend.scan(batch_size))
    assert all(0 < len(b) <= batch_size for b in batches)
    seqs = [r.seq for b in batches for r in b]
    assert seqs == sorted(seqs) and len(seqs) == 9
    assert len(batches) == -(-9 // batch_size)


def test_scan_empty_and_bad_batch_size(backend: SQLiteBackend) -> None:
    assert list(backend.scan()) == []
    with pytest.raises(InvalidInput):
        backend.scan(0)


def test_scan_uses_keyset_pagination(backend: SQLiteBackend) -> None:
    statements: list[str] = []
    backend._conn.set_trace_callback(statements.append)
    list(backend.scan(2))
    backend._conn.set_trace_callback(None)
    assert statements and all("seq > " in s and "LIMIT" in s for s in statements)


def test_delete_counts_only_existing(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1), make_row(2))
    with backend.transaction():
        n = backend.delete([make_row(1).record_id, "0" * 31 + "f", make_row(1).record_id])
    assert n == 1
    assert backend.count() == 1
    assert backend.get(make_row(1).record_id) is None


def test_update_reseals_in_place(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1))
    before = backend.get(make_row(1).record_id)
    assert before is not None
    resealed = RecordRow(
        before.record_id,
        before.subject_ref,
        9,
        before.expiry_us,
        before.purposes,
        before.model,
        True,
        b"new" * 700,
    )
    with backend.transaction():
        backend.update([resealed])
    after = backend.get(before.record_id)
    assert after is not None
    assert (after.epoch, after.held, after.blob, after.seq) == (9, True, b"new" * 700, before.seq)
    assert after.expiry_us == before.expiry_us


def test_update_missing_row_rolls_back(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1))
    changed = RecordRow(make_row(1).record_id, b"s" * 32, 9, 1, (), "m", False, b"x")
    with pytest.raises(RecordNotFound), backend.transaction():
        backend.update([changed, make_row(2)])
    row = backend.get(make_row(1).record_id)
    assert row is not None and row.epoch == 5


def test_meta_put_replace_get(backend: SQLiteBackend) -> None:
    assert backend.get_meta("k") is None
    with backend.transaction():
        backend.put_meta("k", b"1")
        backend.put_meta("k", b"2")
    assert backend.get_meta("k") == b"2"


# --- transactions ----------------------------------------------------------------------


def test_rollback_on_exception_leaves_nothing(backend: SQLiteBackend) -> None:
    with pytest.raises(KeyError), backend.transaction():
        backend.insert([make_row(1)])
        backend.put_meta("k", b"v")
        raise KeyError("boom")
    assert backend.count() == 0
    assert backend.get_meta("k") is None
    assert backend.last_change() == 0
    insert(backend, make_row(1))  # the backend is usable afterwards
    assert backend.count() == 1


def test_duplicate_id_rolls_back_whole_batch(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1))
    with pytest.raises(InvalidInput, match="record id already exists"), backend.transaction():
        backend.insert([make_row(2), make_row(3)])
        backend.insert([make_row(4), make_row(1), make_row(5)])
    assert backend.count() == 1
    assert backend.last_change() == 1


def test_duplicate_within_one_batch(backend: SQLiteBackend) -> None:
    with pytest.raises(InvalidInput), backend.transaction():
        backend.insert([make_row(1), make_row(1)])
    assert backend.count() == 0


def test_writes_outside_transaction_refused(backend: SQLiteBackend) -> None:
    insert(backend, make_row(1))
    with pytest.raises(StorageError):
        backend.insert([make_row(2)])
    with pytest.raises(StorageError):
        backend.update([make_row(1)])
    with pytest.raises(StorageError):
        backend.delete([make_row(1).record_id])
    with pytest.raises(StorageError):
        backend.put_meta("k", b"v")
    assert backend.count() == 1 and backend.get_meta("k") is None


def test_nested_transaction_refused(backend: SQLiteBackend) -> None:
    with backend.transaction():
        backend.insert([make_row(1)])
        with pytest.raises(StorageError, match="nested transaction"):
            with backend.transaction():
                pass
    assert backend.count() == 1  # the outer one still committed


def test_checkpoint_and_backup_refused_inside_transaction(
    backend: SQLiteBackend, tmp_path: Path
) -> None:
    with backend.transaction():
        with pytest.raises(StorageError):
            backend.checkpoint()
        with pytest.raises(StorageError):
            backend.backup(tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()


def test_transaction_blocks_other_threads(backend: SQLiteBackend) -> None:
    seen: list[int] = []
    with backend.transaction():
        backend.insert([make_row(1)])
        reader = threading.Thread(target=lambda: seen.append(backend.count()))
        reader.start()
        reader.join(0.05)
        assert reader.is_alive()  # waits for the lock, does not see uncommitted rows
    reader.join(5)
    assert seen == [1]


def test_busy_database_is_storage_error(backend: SQLiteBackend, db_path: Path) -> None:
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("PRAGMA busy_timeout=0")
        other.execute("BEGIN IMMEDIATE")
        backend._conn.execute("PRAGMA busy_timeout=0")
        with pytest.raises(StorageError, match="SQLITE_BUSY"), backend.transaction():
            pass
        other.execute("ROLLBACK")
    finally:
        other.close()
    insert(backend, make_row(1))


# --- change log ------------------------------------------------------------------------


def changes_since(backend: SQLiteBackend, seq: int) -> list[tuple[int, str, str]]:
    """The trigger-written change log, read the way an index snapshot's check relies on."""
    rows = backend._query("changes", "SELECT seq, record_id, op FROM changes WHERE seq > ?"
                          " ORDER BY seq", (seq,))
    return [(s, rid, op) for s, rid, op in rows]


def test_changes_log(backend: SQLiteBackend) -> None:
    assert backend.last_change() == 0
    insert(backend, make_row(1), make_row(2))
    with backend.transaction():
        backend.update([make_row(1, epoch=6)])
        backend.delete([make_row(2).record_id, "e" * 32])
    changes = changes_since(backend, 0)
    assert [(rid, op) for _, rid, op in changes] == [
        (make_row(1).record_id, "add"),
        (make_row(2).record_id, "add"),
        (make_row(1).record_id, "reseal"),
        (make_row(2).record_id, "del"),
    ]
    seqs = [s for s, _, _ in changes]
    assert seqs == sorted(seqs) and backend.last_change() == seqs[-1]
    assert changes_since(backend, seqs[1]) == changes[2:]
    assert changes_since(backend, seqs[-1]) == []


# --- checkpoint, backup ----------------------------------------------------------------


def test_checkpoint_truncates_wal(backend: SQLiteBackend, db_path: Path) -> None:
    insert(backend, *(make_row(i) for i in range(20)))
    backend.checkpoint()  # the rows now sit in the main file
    assert bytes([7]) * 2048 in db_path.read_bytes()
    with backend.transaction():
        backend.delete([make_row(7).record_id])  # one cell on a page that stays in use
    assert backend.stats()["wal_bytes"] > 0
    backend.checkpoint()
    assert backend.stats()["wal_bytes"] == 0
    # Without secure_delete the freed cell keeps its bytes (this fails with it OFF).
    assert bytes([7]) * 2048 not in db_path.read_bytes()
    assert bytes([8]) * 2048 in db_path.read_bytes()


def test_backup_copies_and_refuses_overwrite(backend: SQLiteBackend, tmp_path: Path) -> None:
    insert(backend, make_row(1), make_row(2))
    with backend.transaction():
        backend.put_meta("k", b"v")
    dest = tmp_path / "copy.db"
    backend.backup(dest)
    assert dest.stat().st_mode & 0o077 == 0
    copy = SQLiteBackend.open(dest)
    try:
        assert copy.count() == 2 and copy.get_meta("k") == b"v"
        assert pragma(copy, "page_size") == 16384
        assert pragma(copy, "journal_mode") == "wal"
        assert changes_since(copy, 0) == changes_since(backend, 0)
    finally:
        copy.close()
    before = dest.read_bytes()
    with pytest.raises(StoreExists):
        backend.backup(dest)
    assert dest.read_bytes() == before


# --- corruption ------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"this is not a database" * 50, bytes(range(256)) * 64])
def test_garbage_file_is_integrity_error(db_path: Path, garbage: bytes) -> None:
    db_path.write_bytes(garbage)
    with pytest.raises(IntegrityError, match="records database is corrupt"):
        SQLiteBackend.open(db_path)
    assert db_path.read_bytes() == garbage  # nothing was written


def test_newer_schema_version_is_storage_error(backend: SQLiteBackend, db_path: Path) -> None:
    backend._conn.execute("PRAGMA user_version = 99")
    backend.close()
    with pytest.raises(StorageError, match="schema version"):
        SQLiteBackend.open(db_path)


def test_out_of_range_integer_is_invalid_input(backend: SQLiteBackend) -> None:
    with pytest.raises(InvalidInput), backend.transaction():
        backend.insert([make_row(1, expiry_us=2**70)])
    assert backend.count() == 0


def test_foreign_sqlite_file_is_integrity_error(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(IntegrityError):
        SQLiteBackend.open(db_path)


def test_damaged_pages_are_integrity_error(backend: SQLiteBackend, db_path: Path) -> None:
    insert(backend, *(make_row(i) for i in range(20)))
    backend.close()
    data = bytearray(db_path.read_bytes())
    data[16384:] = b"\xff" * (len(data) - 16384)  # keep the header page, wreck the rest
    db_path.write_bytes(bytes(data))
    damaged = SQLiteBackend.open(db_path)
    try:
        with pytest.raises(IntegrityError) as caught:
            list(damaged.scan())
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    finally:
        damaged.close()
