"""``TemplateStore.open(..., read_only=True)``: for auditors and reports, beside a writer.

It takes no writer lock, writes nothing (no audit entry, keyring save, snapshot or
database checkpoint), builds no index and decrypts no template. It offers ``stats()`` and
the audit trail (verify, checkpoint, get) and refuses everything else with
``ReadOnlyStore``. The writer here is a real second process (``holder.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from holder import Holder

import biotemplate as bt
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.codec import RecordCodec
from biotemplate.gallery import Gallery
from biotemplate.synthetic import make_gallery

DIM = 64
WATCH = {"purposes": ["watchlist"], "ttl": timedelta(days=30), "source": "case-file"}
# what a reader must leave as it found it (-shm, SQLite's shared-memory index, is not data)
FILES = ("records.db", "records.db-wal", "audit.db", "audit.db-wal", "keyring",
         "index.snapshot", "lock")
T = make_gallery(2, 1, DIM, seed=5).templates
RID = "0" * 32

REFUSED: dict[str, Callable[[bt.TemplateStore, Path], object]] = {
    "enroll": lambda s, _: s.enroll(T[0], subject_id="S-1", actor="a", **WATCH),
    "enroll_many": lambda s, _: s.enroll_many(T, subject_ids=["S-1", "S-2"], actor="a",
                                              **WATCH),
    "search": lambda s, _: s.search(T[0], purpose="watchlist", actor="a"),
    "search_many": lambda s, _: s.search_many(T, purpose="watchlist", actor="a"),
    "verify": lambda s, _: s.verify(T[0], subject_id="S-1", purpose="rare", actor="a"),
    "confirm_match": lambda s, _: s.confirm_match(2, RID, reviewer="r"),
    "export_subject": lambda s, _: s.export_subject("S-1", actor="a"),
    "erase_subject": lambda s, _: s.erase_subject("S-1", actor="a"),
    "delete": lambda s, _: s.delete(RID, actor="a"),
    "purge_expired": lambda s, _: s.purge_expired(),
    "place_hold": lambda s, _: s.place_hold("S-1", actor="a", reason="r"),
    "release_hold": lambda s, _: s.release_hold("S-1", actor="a", reason="r"),
    "set_policy": lambda s, _: s.set_policy(s.policy, actor="a"),
    "backup": lambda s, tmp: s.backup(tmp / "backup", actor="a"),
    "snapshot": lambda s, _: s.snapshot(),
    "rebuild_index": lambda s, _: s.rebuild_index(),
}


def files(folder: Path) -> dict[str, tuple[bytes, int] | None]:
    """Bytes and mtime of every file a reader must not touch (None: absent)."""
    return {name: (p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None
            for name in FILES for p in [folder / name]}


@pytest.fixture
def filled(store: bt.TemplateStore, store_dir: Path, gallery: Any) -> Path:
    """A closed store of 100 records (a snapshot written on close)."""
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="svc", **WATCH)
    store.close()
    return store_dir


@pytest.fixture
def reader(filled: Path, keys: Any, clock: Any) -> Iterator[bt.TemplateStore]:
    ro = bt.TemplateStore.open(filled, key_provider=keys, clock=clock, read_only=True)
    yield ro
    ro.close()


# --- beside a writer process -------------------------------------------------------------


def test_a_reader_beside_a_writer_process(filled: Path, keys: Any, clock: Any,
                                          tmp_path: Path) -> None:
    holder = Holder(filled, keys.path)
    try:
        assert holder.ask("enroll 4") == "OK 104"
        before = files(filled)
        assert before["records.db-wal"] and before["audit.db-wal"]  # the writer's logs
        ro = bt.TemplateStore.open(filled, key_provider=keys, clock=clock, read_only=True)
        stats = ro.stats()
        assert (stats.records, stats.indexed, stats.subjects) == (104, 0, 54)
        assert ro.audit.verify().ok
        first = ro.audit.checkpoint()
        for call in REFUSED.values():
            with pytest.raises(bt.ReadOnlyStore):
                call(ro, tmp_path)
        assert files(filled) == before  # nothing written, not even to the logs

        assert holder.ask("enroll 2") == "OK 106"  # the writer commits more meanwhile
        assert ro.stats().records == 106
        later = ro.audit.checkpoint()  # signed from the file's head now
        assert later.seq > first.seq and later.public_key == ro.audit.public_key
        assert ro.audit.verify(later).ok and ro.audit.verify(first).ok
        during = files(filled)
        ro.close()
        assert files(filled) == during  # closing writes nothing either
        assert bt.verify_audit(filled, later).ok
    finally:
        holder.close()
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock) as writer:
        assert writer.audit.verify(later).ok  # a reader's checkpoint holds for the writer


def test_a_reader_after_a_killed_writer_sees_what_it_committed(filled: Path, keys: Any,
                                                              clock: Any) -> None:
    holder = Holder(filled, keys.path)
    assert holder.ask("enroll 3") == "OK 103"
    holder.kill()  # its -wal and -shm stay, never checkpointed
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock, read_only=True) as ro:
        assert ro.stats().records == 103
        assert ro.audit.verify().ok
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock) as writer:
        assert writer.stats().records == 103


def test_a_reader_beside_a_writer_handle_in_this_process(store: bt.TemplateStore,
                                                         store_dir: Path, keys: Any,
                                                         clock: Any, gallery: Any) -> None:
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock,
                               read_only=True) as ro:  # no lock: the writer holds it
        store.enroll_many(gallery.templates[:10], subject_ids=gallery.subject_ids[:10],
                          actor="svc", **WATCH)
        assert ro.stats().records == 10
        cp = ro.audit.checkpoint()
        assert cp.seq == store.audit.checkpoint().seq
        assert store.audit.verify(cp).ok
        with pytest.raises(bt.StoreLocked):
            bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)


# --- what a reader offers, and what it refuses --------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_template_subject_or_writing_call_is_refused(
        reader: bt.TemplateStore, filled: Path, tmp_path: Path, name: str) -> None:
    before, entries = files(filled), reader.audit.verify().entries
    with pytest.raises(bt.ReadOnlyStore, match="read_only=True"):
        REFUSED[name](reader, tmp_path)
    assert reader.audit.verify().entries == entries  # not even the refusal is audited
    assert files(filled) == before
    assert not (tmp_path / "backup").exists()


def test_a_reader_offers_stats_and_the_audit_trail(reader: bt.TemplateStore) -> None:
    stats = reader.stats()
    assert (stats.records, stats.indexed, stats.subjects, stats.purposes) == (100, 0, 50, {})
    report = reader.audit.verify()
    assert report.ok and report.entries >= 4
    assert reader.audit.get(1).event == "create"
    assert reader.audit.verify(reader.audit.checkpoint()).ok
    assert "watchlist" in reader.policy.purposes


def test_a_reader_decrypts_nothing(filled: Path, keys: Any, clock: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a read-only handle decrypted something")

    monkeypatch.setattr(RecordCodec, "open", forbidden)
    monkeypatch.setattr(Gallery, "load_snapshot", forbidden)
    monkeypatch.setattr(Gallery, "rebuild", forbidden)
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock, read_only=True) as ro:
        assert ro.stats().records == 100
        assert ro.audit.verify().ok


def test_a_reader_alone_writes_nothing(filled: Path, keys: Any, clock: Any) -> None:
    before = files(filled)
    stale = filled / ".keyring.tmp-left-by-a-kill"  # a writer's open would sweep it
    stale.write_bytes(b"x")
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock, read_only=True) as ro:
        ro.stats()
        ro.audit.verify()
        ro.audit.checkpoint()
    after = files(filled)
    for name in ("records.db", "audit.db", "keyring", "index.snapshot", "lock"):
        assert after[name] == before[name], name
    for log in ("records.db-wal", "audit.db-wal"):  # with no writer, SQLite's WAL reader
        found = after[log]  # creates the -wal (and -shm) it needs: empty
        assert found is None or found[0] == b"", log
    assert stale.exists()
    with bt.TemplateStore.open(filled, key_provider=keys, clock=clock) as writer:
        assert writer.stats().records == 100
    assert not stale.exists()
    assert not [p.name for p in filled.iterdir() if p.name.endswith(("-wal", "-shm"))]


def test_a_closed_reader(reader: bt.TemplateStore) -> None:
    reader.close()
    reader.close()
    with pytest.raises(bt.InvalidInput, match="closed"):
        reader.stats()
    with pytest.raises(bt.InvalidInput, match="closed"):
        reader.search(np.ones(DIM, dtype=np.float32), purpose="watchlist", actor="a")


def test_a_reader_needs_a_store_and_its_key(filled: Path, keys: Any, tmp_path: Path) -> None:
    with pytest.raises(bt.InvalidInput, match="read_only"):
        bt.TemplateStore.open(filled, key_provider=keys, read_only="yes")  # type: ignore[arg-type]
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "missing", key_provider=keys, read_only=True)
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(filled, read_only=True,
                              key_provider=bt.FileKeyProvider.generate(tmp_path / "other.key"))


def test_a_read_only_records_database_refuses_writes(filled: Path) -> None:
    before = (filled / "records.db").read_bytes()
    db = SQLiteBackend.open(filled / "records.db", read_only=True)
    try:
        assert db.count() == 100
        with pytest.raises(bt.StorageError), db.transaction():
            db.put_meta("x", b"y")
    finally:
        db.close()
    assert (filled / "records.db").read_bytes() == before
