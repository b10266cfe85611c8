"""Subject keys in records.db (``subject_keys.py``; docs/architecture.md, "Subject keys").

Each subject's key and the ids of its live records are sealed, as an entry, under the key
of its bucket; the keyring holds only the bucket keys. What these tests hold the design to:

- enrolling a new subject writes nothing to the keyring file;
- a deletion or erasure rotates the bucket: an older records.db copy's entry does not open
  with the current key state, and the other subjects of the bucket keep their keys;
- the entries authenticate the set of rows: a deleted row copied back is never live again,
  and rows that vanish behind the store's back are reported and never cost a key;
- a store of the old format (subject keys in the keyring) is moved on open, and a crash at
  any step of the move re-runs or completes it.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import pytest
from copies import backup_records

import biotemplate as bt
from biotemplate import sealing
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.codec import RecordCodec
from biotemplate.keyring import BUCKETS, Keyring
from biotemplate.keys import key_text
from biotemplate.subject_keys import Entry, SubjectKeys, open_entry
from biotemplate.synthetic import Gallery

DIM = 64
MODEL = "test-model-v1"
BOTH = {"purposes": ["watchlist", "rare"], "ttl": timedelta(days=20), "source": "case-file"}


# --- helpers ----------------------------------------------------------------------------


def ring_of(store_dir: Path, keys: Any) -> Keyring:
    return Keyring.load(store_dir / "keyring", keys.master_key())


def sql(store_dir: Path, statement: str, args: tuple[Any, ...] = (), *,
        drop_triggers: bool = False) -> list[Any]:
    """Edit records.db as someone bypassing the store would (optionally unlogged)."""
    con = sqlite3.connect(store_dir / "records.db", isolation_level=None)
    try:
        if drop_triggers:
            for name in ("records_add", "records_reseal", "records_del"):
                con.execute(f"DROP TRIGGER IF EXISTS {name}")
        return con.execute(statement, args).fetchall()
    finally:
        con.close()


def saved_row(store_dir: Path, record_id: str) -> tuple[Any, ...]:
    (row,) = sql(store_dir, "SELECT record_id, subject_ref, epoch, expiry_us, purposes, model,"
                 " held, blob FROM records WHERE record_id = ?", (record_id,))
    return tuple(row)


def put_back(store_dir: Path, row: tuple[Any, ...], *, drop_triggers: bool = False) -> None:
    sql(store_dir, "INSERT INTO records (record_id, subject_ref, epoch, expiry_us, purposes,"
        " model, held, blob) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row, drop_triggers=drop_triggers)


def entries_of(store_dir: Path, ring: Keyring) -> dict[bytes, Entry | None]:
    """Every entry in records.db, opened with ``ring`` (None: it does not open)."""
    out: dict[bytes, Entry | None] = {}
    for bucket, ref, blob in sql(store_dir, "SELECT bucket, subject_ref, blob FROM subject_keys"):
        try:
            out[bytes(ref)] = open_entry(ring, bucket, bytes(ref), bytes(blob))
        except bt.IntegrityError:
            out[bytes(ref)] = None
    return out


def enrol(store: bt.TemplateStore, gallery: Gallery) -> list[str]:
    return store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="svc",
                             **BOTH)


def candidates(store: bt.TemplateStore, template: Any) -> set[str]:
    res = store.search(template, purpose="watchlist", k=20, actor="t", mode="investigation")
    return {c.record_id for c in res.candidates}


def integrity_entries(store: bt.TemplateStore) -> list[bt.AuditEntry]:
    n = store.audit.verify().entries
    return [e for e in (store.audit.get(i) for i in range(1, n + 1)) if e.event == "integrity"]


def same_bucket(ring: Keyring, victim: str, n: int) -> list[str]:
    """``n`` subject ids whose bucket is the victim's (searched: 1 in 1,024 matches)."""
    bucket = ring.bucket_of(ring.subject_ref(victim))
    found: list[str] = []
    i = 0
    while len(found) < n:
        sid = f"N-{i}"
        if ring.bucket_of(ring.subject_ref(sid)) == bucket:
            found.append(sid)
        i += 1
    return found


# --- key updates stay cheap: enrolment leaves the keyring alone --------------------------


def test_enrolling_new_subjects_writes_nothing_to_the_keyring(
        store: bt.TemplateStore, store_dir: Path, keys: Any, gallery: Gallery) -> None:
    enrol(store, gallery)
    path = store_dir / "keyring"
    before, st = path.read_bytes(), path.stat()
    store.enroll(gallery.templates[0], subject_id="NEW-1", actor="svc", **BOTH)
    store.enroll_many(gallery.templates[:5], subject_ids=[f"NEW-{i}" for i in range(2, 7)],
                      actor="svc", **BOTH)
    store.enroll(gallery.templates[1], subject_id=gallery.subject_ids[1], actor="svc", **BOTH)
    after = path.stat()
    assert path.read_bytes() == before
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (st.st_mtime_ns, st.st_ino,
                                                                st.st_size)
    assert not list(store_dir.glob(".keyring.*"))
    assert store.stats().subjects == 50 + 6
    entries = entries_of(store_dir, ring_of(store_dir, keys))
    assert len(entries) == 56 and all(e is not None for e in entries.values())
    assert len(store.export_subject("NEW-4", actor="t")) == 1


def test_the_keyring_holds_bucket_keys_not_subject_keys(
        store: bt.TemplateStore, store_dir: Path, keys: Any, gallery: Gallery) -> None:
    enrol(store, gallery)
    ring = ring_of(store_dir, keys)
    assert len(ring.buckets) == BUCKETS and not ring.legacy_subjects and not ring.pending
    size = (store_dir / "keyring").stat().st_size
    assert 32 * BUCKETS < size < 32 * BUCKETS + 1024  # 32 KiB of bucket keys, then little
    entries = entries_of(store_dir, ring)
    for sid in set(gallery.subject_ids):
        entry = entries[ring.subject_ref(sid)]
        assert entry is not None and len(entry.ids) == 2


# --- rotation ---------------------------------------------------------------------------


def test_an_erasure_rotates_its_bucket_and_keeps_the_neighbours(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    ring = ring_of(store_dir, keys)
    neighbours = same_bucket(ring, "V-1", 2)
    for i, sid in enumerate(["V-1", *neighbours]):
        store.enroll(gallery.templates[2 * i], subject_id=sid, actor="svc", **BOTH)
    bucket = ring.bucket_of(ring.subject_ref("V-1"))
    before = ring_of(store_dir, keys)
    receipt = store.erase_subject("V-1", actor="dpo")
    assert receipt.key_destroyed and receipt.records_erased == 1
    after = ring_of(store_dir, keys)
    assert after.buckets[bucket] != before.buckets[bucket]  # the old key is gone
    assert [k for i, k in enumerate(after.buckets) if i != bucket] == \
        [k for i, k in enumerate(before.buckets) if i != bucket]
    assert (after.erasures, after.generation) == (before.erasures + 1, before.generation + 1)
    assert not after.pending
    entries = entries_of(store_dir, after)
    assert after.subject_ref("V-1") not in entries
    for i, sid in enumerate(neighbours, start=1):  # resealed under the new key, same key
        entry = entries[after.subject_ref(sid)]
        assert entry is not None and len(entry.ids) == 1
        assert store.verify(gallery.templates[2 * i], subject_id=sid, purpose="rare",
                            actor="t").match
    store.close()
    (store_dir / "index.snapshot").unlink()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:  # rebuilt
        assert s.stats().integrity_failures == 0
        assert len(s.export_subject(neighbours[0], actor="t")) == 1


def test_deleting_records_rotates_and_the_last_one_takes_the_key(
        store: bt.TemplateStore, store_dir: Path, keys: Any, gallery: Gallery) -> None:
    ids = enrol(store, gallery)
    subject = gallery.subject_ids[6]
    ref, before = ring_of(store_dir, keys).subject_ref(subject), ring_of(store_dir, keys)
    bucket = before.bucket_of(ref)
    first = store.delete(ids[6], actor="dpo")
    assert not first.subject_key_destroyed
    middle = ring_of(store_dir, keys)
    assert middle.buckets[bucket] != before.buckets[bucket]
    entry = entries_of(store_dir, middle)[ref]
    assert entry is not None and entry.ids == (bytes.fromhex(ids[7]),)
    assert store.delete(ids[7], actor="dpo").subject_key_destroyed
    after = ring_of(store_dir, keys)
    assert after.buckets[bucket] != middle.buckets[bucket]
    assert ref not in entries_of(store_dir, after) and store.stats().subjects == 49


def test_an_older_records_db_copy_cannot_open_an_erased_subjects_entry(
        store: bt.TemplateStore, store_dir: Path, keys: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    """The copy + the current key state: the erased subject's entry is still in the copy,
    sealed under a bucket key that no longer exists (TemplateStore.open refuses such a
    copy anyway, tests/unit/test_rollback.py; this is what reading it directly gets)."""
    enrol(store, gallery)
    copy = backup_records(store_dir, tmp_path / "before.db")
    old_ring = ring_of(store_dir, keys)
    victim = gallery.subject_ids[6]
    store.erase_subject(victim, actor="dpo", reason="Art. 17")
    store.close()
    ring = ring_of(store_dir, keys)
    ref = ring.subject_ref(victim)
    bucket = ring.bucket_of(ref)
    db = SQLiteBackend.open(copy)
    try:
        blob = db.get_entry(bucket, ref)
        assert blob is not None  # the copy still holds the entry ...
        assert open_entry(old_ring, bucket, ref, blob).ids  # ... the old key opened it ...
        with pytest.raises(bt.IntegrityError):
            open_entry(ring, bucket, ref, blob)  # ... and that key is gone
        copy_keys = SubjectKeys(db, ring)
        with pytest.raises(bt.IntegrityError):
            copy_keys.entry(ref)
        codec = RecordCodec(ring, model=MODEL, dim=DIM, entries=copy_keys.entry)
        rows = db.by_subject(ref)
        assert len(rows) == 2
        for row in rows:
            with pytest.raises(bt.IntegrityError):
                codec.open(row)
        # subjects of other buckets still open from the copy: only the bucket died
        other = ring.subject_ref(gallery.subject_ids[0])
        if ring.bucket_of(other) != bucket:
            assert codec.open(db.by_subject(other)[0]).subject_id == gallery.subject_ids[0]
    finally:
        db.close()


def test_a_keyring_one_erasure_old_is_refused_and_loses_nothing(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    """The keyring put back from just before an erasure has no pending key (that was saved
    after the copy), so it is an older keyring, not a crash: open refuses it rather than
    complete the erasure and lose the neighbours' entries the commit resealed under the
    missing key. With the current keyring back, the erased subject stays erased and the
    neighbours are intact."""
    ring = ring_of(store_dir, keys)
    neighbours = same_bucket(ring, "V-1", 2)
    for i, sid in enumerate(["V-1", *neighbours]):
        store.enroll(gallery.templates[2 * i], subject_id=sid, actor="svc", **BOTH)
    store.close()
    shutil.copy(store_dir / "keyring", tmp_path / "old-keyring")
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        s.erase_subject("V-1", actor="dpo")
    shutil.copy(store_dir / "keyring", tmp_path / "current-keyring")
    shutil.copy(tmp_path / "old-keyring", store_dir / "keyring")
    with pytest.raises(bt.IntegrityError, match="lacks the keys that change committed"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    shutil.copy(tmp_path / "current-keyring", store_dir / "keyring")
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.export_subject("V-1", actor="t") == []
        assert all(len(s.export_subject(n, actor="t")) == 1 for n in neighbours)
        assert s.stats().integrity_failures == 0
    bucket = ring.bucket_of(ring.subject_ref("V-1"))
    assert ring_of(store_dir, keys).buckets[bucket] != ring.buckets[bucket]


def test_a_reader_meeting_a_committed_rotation_opens_under_the_pending_key(
        tmp_path: Path) -> None:
    """Between the commit that resealed a bucket and the keyring update that makes its
    pending key current, another thread may read an entry of that bucket: it opens under
    the pending key. Once the key is current the old one opens nothing."""
    db = SQLiteBackend.create(tmp_path / "records.db")
    ring = Keyring.new(sealing.random_id(16), 86_400_000_000, 1_767_225_600_000_000)
    a = (5).to_bytes(4, "big") + sealing.random_id(28)
    b = (5 + BUCKETS).to_bytes(4, "big") + sealing.random_id(28)  # the same bucket, 5
    assert ring.bucket_of(a) == ring.bucket_of(b) == 5
    ids = {a: sealing.random_id(16), b: sealing.random_id(16)}
    keys = SubjectKeys(db, ring)
    assert keys.ensure([a, b]) == {a, b}
    with db.transaction():
        keys.add({ref: [rid] for ref, rid in ids.items()})
    keys.settle(True)
    old = ring.buckets[5]
    ring.pending = {5: sealing.random_key()}
    with db.transaction():
        assert keys.remove({a: None}, rotate=5) == [a]
    keys.settle(True)
    reader = SubjectKeys(db, ring)  # another thread's first read: nothing cached
    entry = reader.entry(b)
    assert entry is not None and entry.ids == (ids[b],) and reader.entry(a) is None
    ring.buckets[5] = ring.pending.pop(5)
    assert SubjectKeys(db, ring).entry(b) == entry
    blob = db.get_entry(5, b)
    assert blob is not None
    with pytest.raises(bt.IntegrityError):
        open_entry(ring, 5, b, blob, key=old)
    db.close()


def test_entries_are_bound_to_their_subject_and_bucket(tmp_path: Path) -> None:
    db = SQLiteBackend.create(tmp_path / "records.db")
    ring = Keyring.new(sealing.random_id(16), 86_400_000_000, 1_767_225_600_000_000)
    a, b = sealing.random_id(32), sealing.random_id(32)
    keys = SubjectKeys(db, ring)
    keys.ensure([a, b])
    with db.transaction():
        keys.add({a: [sealing.random_id(16)], b: [sealing.random_id(16)]})
    keys.settle(True)
    ba, bb = ring.bucket_of(a), ring.bucket_of(b)
    blob_a, blob_b = db.get_entry(ba, a), db.get_entry(bb, b)
    assert blob_a is not None and blob_b is not None
    with pytest.raises(bt.IntegrityError):  # b's entry presented as a's
        open_entry(ring, ba, a, blob_b, key=ring.buckets[bb])
    with pytest.raises(bt.IntegrityError):  # a's entry moved to another bucket
        open_entry(ring, (ba + 1) % BUCKETS, a, blob_a, key=ring.buckets[ba])
    flipped = bytearray(blob_a)
    flipped[-1] ^= 1
    with pytest.raises(bt.IntegrityError):
        open_entry(ring, ba, a, bytes(flipped))
    db.close()


# --- the set of rows is authenticated ---------------------------------------------------


@pytest.mark.parametrize("triggers", ["kept", "dropped"])
def test_a_deleted_row_copied_back_is_never_live_again(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        triggers: str) -> None:
    """The subject keeps its other record, so its key lives on: only its entry, which no
    longer lists the deleted record, says the copied-back row is dead."""
    ids = enrol(store, gallery)
    subject, victim, other = gallery.subject_ids[6], ids[6], ids[7]
    probe = gallery.templates[6]  # the victim's own template: it would score 1.0
    saved = saved_row(store_dir, victim)
    assert not store.delete(victim, actor="dpo", reason="wrong capture").subject_key_destroyed
    put_back(store_dir, saved, drop_triggers=triggers == "dropped")

    def never_live(s: bt.TemplateStore) -> None:
        found = candidates(s, probe)
        assert victim not in found and other in found
        v = s.verify(probe, subject_id=subject, purpose="rare", actor="t")
        assert v.record_id == other and v.score < 0.999
        assert [r.record_id for r in s.export_subject(subject, actor="t")] == [other]
        assert s.stats().integrity_failures == 1 and s.stats().records == 100  # rows

    never_live(store)  # while open: verify and export refuse it, and count it
    store.rebuild_index()
    never_live(store)
    assert victim in integrity_entries(store)[-1].fields["record_ids"]
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:  # snapshot
        never_live(s)
    (store_dir / "index.snapshot").unlink()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:  # rebuild
        never_live(s)
        assert victim in integrity_entries(s)[-1].fields["record_ids"]


def test_an_entry_put_back_from_before_a_deletion_does_not_open(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    """Row and entry both put back from before the deletion: the old entry was sealed
    under the bucket key the deletion rotated away, so it does not open. The subject's
    records are refused (a denial of service on that subject), never the deleted one
    served."""
    ids = enrol(store, gallery)
    subject, victim = gallery.subject_ids[6], ids[6]
    ring = ring_of(store_dir, keys)
    ref, bucket = ring.subject_ref(subject), ring.bucket_of(ring.subject_ref(subject))
    saved = saved_row(store_dir, victim)
    (old_entry,) = sql(store_dir, "SELECT blob FROM subject_keys WHERE subject_ref = ?", (ref,))
    store.delete(victim, actor="dpo")
    store.close()
    put_back(store_dir, saved, drop_triggers=True)
    sql(store_dir, "UPDATE subject_keys SET blob = ? WHERE bucket = ? AND subject_ref = ?",
        (old_entry[0], bucket, ref))
    (store_dir / "index.snapshot").unlink()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert victim not in candidates(s, gallery.templates[6])
        assert s.stats().integrity_failures == 2  # both rows of the subject
        with pytest.raises(bt.IntegrityError):
            s.export_subject(subject, actor="t")


def test_rows_deleted_behind_the_stores_back_are_reported_and_cost_no_key(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    """Z has a record that expires in 2 h and one that lives 20 days. The live row is
    deleted with plain SQL (triggers dropped: nothing logs it). A rebuild reports it
    missing; the purge that takes Z's expired record decides from Z's entry, which still
    lists the vanished one, so Z keeps its key, and the row, once restored, is Z's again."""
    enrol(store, gallery)
    short = store.enroll(gallery.templates[0], subject_id="Z", purposes=["rare"],
                         ttl=timedelta(hours=2), actor="svc")
    live = store.enroll(gallery.templates[1], subject_id="Z", actor="svc", **BOTH)
    saved = saved_row(store_dir, live)
    sql(store_dir, "DELETE FROM records WHERE record_id = ?", (live,), drop_triggers=True)
    store.rebuild_index()
    stats = store.stats()
    assert (stats.missing_rows, stats.integrity_failures, stats.subjects) == (1, 0, 51)
    reported = integrity_entries(store)[-1]
    assert reported.fields["missing"] == 1 and reported.fields["missing_ids"] == [live]
    clock.advance(hours=3)
    report = store.purge_expired()
    assert report.purged == 1 and report.subject_keys_destroyed == 0
    ring = ring_of(store_dir, keys)
    entry = entries_of(store_dir, ring)[ring.subject_ref("Z")]
    assert entry is not None and entry.ids == (bytes.fromhex(live),)  # short went, live kept
    assert store.stats().subjects == 51
    put_back(store_dir, saved, drop_triggers=True)  # restored from a backup
    store.rebuild_index()
    assert store.stats().missing_rows == 0
    assert [r.record_id for r in store.export_subject("Z", actor="t")] == [live]
    assert short not in {r.record_id for r in store.export_subject("Z", actor="t")}


def test_missing_rows_are_reported_at_open_and_an_erasure_clears_them(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    ids = enrol(store, gallery)
    store.close()
    sql(store_dir, "DELETE FROM records WHERE record_id = ?", (ids[10],), drop_triggers=True)
    (store_dir / "index.snapshot").unlink()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().missing_rows == 1
        assert integrity_entries(s)[-1].fields["missing_ids"] == [ids[10]]
        receipt = s.erase_subject(gallery.subject_ids[10], actor="dpo")
        assert receipt.records_erased == 1 and receipt.key_destroyed
        assert s.stats().missing_rows == 0
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().missing_rows == 0  # from the snapshot: nothing is listed any more


def test_a_row_deleted_with_logged_sql_after_a_snapshot_is_reported_missing(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    ids = enrol(store, gallery)
    store.close()  # writes the snapshot
    sql(store_dir, "DELETE FROM records WHERE record_id = ?", (ids[20],))  # logged
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        opened = s.audit.get(s.audit.verify().entries)
        assert opened.fields["index"] == "snapshot"
        assert s.stats().missing_rows == 1 and s.stats().subjects == 50


# --- a store from before bucket keys ------------------------------------------------------


def to_v1(store_dir: Path, keys: Any) -> dict[bytes, bytes]:
    """Rewrite a closed store in the format of before bucket keys: the subject keys in the
    keyring (body field "subjects"), no bucket keys; records.db schema 1 (no subject_keys
    table) and a state row without the mark. Returns ref -> subject key."""
    ring = ring_of(store_dir, keys)
    subjects: dict[bytes, bytes] = {}
    for ref, entry in entries_of(store_dir, ring).items():
        assert entry is not None
        subjects[ref] = entry.key
    (blob,) = sql(store_dir, "SELECT value FROM meta WHERE key = 'state'")[0]
    state = msgpack.unpackb(sealing.open_bound(ring.meta_key, "meta", ring.store_id,
                                               [b"state"], blob), raw=False)
    state.pop("subject_keys")
    state["intent"].pop("rotate", None)
    old = sealing.seal_bound(ring.meta_key, "meta", ring.store_id, [b"state"],
                             msgpack.packb(state, use_bin_type=True))
    sql(store_dir, "UPDATE meta SET value = ? WHERE key = 'state'", (old,))
    sql(store_dir, "DROP TABLE subject_keys")
    sql(store_dir, "PRAGMA user_version = 1")
    ring.legacy_subjects, ring.buckets, ring.pending = subjects, [], {}
    ring.save(store_dir / "keyring", keys.master_key())
    return subjects


@pytest.fixture
def v1_store(store: bt.TemplateStore, store_dir: Path, keys: Any,
             gallery: Gallery) -> dict[bytes, bytes]:
    ids = enrol(store, gallery)
    store.delete(ids[3], actor="dpo")
    store.erase_subject(gallery.subject_ids[8], actor="dpo")
    store.close()
    (store_dir / "index.snapshot").unlink()
    return to_v1(store_dir, keys)


def check_moved(store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
                subjects: dict[bytes, bytes]) -> None:
    """Open (which moves the keys, or completes the move), then check what is on disk."""
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        stats = s.stats()
        assert (stats.records, stats.subjects) == (97, 49)
        assert (stats.integrity_failures, stats.shredded_rows, stats.missing_rows) == (0, 0, 0)
        assert len(s.export_subject(gallery.subject_ids[0], actor="t")) == 2
        assert len(s.export_subject(gallery.subject_ids[3], actor="t")) == 1
        assert s.export_subject(gallery.subject_ids[8], actor="t") == []
        assert s.audit.verify().ok
    ring = ring_of(store_dir, keys)
    assert len(ring.buckets) == BUCKETS and not ring.legacy_subjects
    entries = entries_of(store_dir, ring)
    assert {ref: e.key for ref, e in entries.items() if e is not None} == subjects
    assert sql(store_dir, "PRAGMA user_version") == [(2,)]


def test_a_store_from_before_bucket_keys_is_moved_on_open(
        v1_store: dict[bytes, bytes], store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    assert len(v1_store) == 49
    def moves(s: bt.TemplateStore) -> list[bt.AuditEntry]:
        entries = (s.audit.get(i) for i in range(1, s.audit.verify().entries + 1))
        return [e for e in entries if e.event == "migrate"]

    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert [e.fields["subject_keys"] for e in moves(s)] == [49]
        assert s.stats().subjects == 49
        s.erase_subject(gallery.subject_ids[0], actor="dpo")  # and it works as a v2 store
    v1_store.pop(ring_of(store_dir, keys).subject_ref(gallery.subject_ids[0]))
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().subjects == 48 and len(moves(s)) == 1  # moved once


def test_a_read_only_open_moves_nothing(v1_store: dict[bytes, bytes], store_dir: Path,
                                       keys: Any, clock: Any, gallery: Gallery) -> None:
    """A reader writes nothing and decrypts nothing, so it leaves the move to the next
    writer; it still reports the store."""
    before = {p.name: p.read_bytes() for p in store_dir.iterdir() if p.is_file()}
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock,
                               read_only=True) as ro:
        assert (ro.stats().records, ro.stats().subjects) == (97, 49)
    assert ring_of(store_dir, keys).legacy_subjects == v1_store
    assert sql(store_dir, "PRAGMA user_version") == [(1,)]
    for name in ("keyring", "records.db", "audit.db"):
        assert (store_dir / name).read_bytes() == before[name], name
    check_moved(store_dir, keys, clock, gallery, v1_store)


@pytest.mark.parametrize("step", ["bucket-keys-saved", "entries-committed", "keyring-saved"])
def test_the_move_is_crash_safe_at_every_step(
        v1_store: dict[bytes, bytes], store_dir: Path, keys: Any, clock: Any,
        gallery: Gallery, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """The move saves the bucket keys (1), commits the entries (2), saves the keyring
    without the subject keys (3): each is atomic. Killed at any of them (here: the step
    fails), the next open re-runs or completes the move."""
    from biotemplate.subject_keys import SubjectKeys as Keys

    saves = {"n": 0}
    real_save = Keyring.save

    def failing_save(self: Keyring, *args: Any, **kwargs: Any) -> None:
        saves["n"] += 1
        if (step, saves["n"]) in (("bucket-keys-saved", 1), ("keyring-saved", 2)):
            raise bt.StorageError("killed")
        real_save(self, *args, **kwargs)

    def failing_import(self: Keys, subjects: Any) -> int:
        raise bt.StorageError("killed")

    monkeypatch.setattr(Keyring, "save", failing_save)
    if step == "entries-committed":
        monkeypatch.setattr(Keys, "import_legacy", failing_import)
    with pytest.raises(bt.StorageError):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    monkeypatch.undo()
    ring = ring_of(store_dir, keys)
    assert ring.legacy_subjects == v1_store  # nothing lost, whatever step died
    assert bool(ring.buckets) == (step != "bucket-keys-saved")
    found = len(sql(store_dir, "SELECT 1 FROM subject_keys"))
    assert found == (49 if step == "keyring-saved" else 0)
    check_moved(store_dir, keys, clock, gallery, v1_store)


def test_an_old_keyring_or_records_db_put_back_after_the_move_is_refused(
        v1_store: dict[bytes, bytes], store_dir: Path, keys: Any, clock: Any,
        tmp_path: Path) -> None:
    shutil.copy(store_dir / "keyring", tmp_path / "v1.keyring")
    old_db = backup_records(store_dir, tmp_path / "v1.db")
    bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock).close()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("keyring", "records.db", "audit.db"):
        shutil.copy(store_dir / name, moved / name)
    shutil.copy(tmp_path / "v1.keyring", store_dir / "keyring")
    with pytest.raises(bt.IntegrityError, match=r"keyring is older than records\.db"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    shutil.copy(moved / "keyring", store_dir / "keyring")
    for suffix in ("-wal", "-shm"):
        Path(f"{store_dir / 'records.db'}{suffix}").unlink(missing_ok=True)
    shutil.copy(old_db, store_dir / "records.db")
    for _ in range(2):  # the refused open must not leave a file that passes the next time
        with pytest.raises(bt.IntegrityError, match=r"records\.db is older than the keyring"):
            bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)


OLD_COMMIT = "936662e"  # the last commit with the subject keys in the keyring
OLD_SCRIPT = """
import sys
from datetime import UTC, datetime, timedelta
import numpy as np
import biotemplate as bt
assert "bucket_of" not in dir(bt.keyring.Keyring), "not the old code"
folder, key_file = sys.argv[1], sys.argv[2]
policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"w": {
    "max_retention": "30d", "modes": ["identification", "investigation", "verification"],
    "match_threshold": 0.5}}})
now = datetime(2026, 1, 1, tzinfo=UTC)
rng = np.random.default_rng(7)
with bt.TemplateStore.create(folder, dim=16, model="m", policy=policy, clock=lambda: now,
                             key_provider=bt.FileKeyProvider(key_file)) as s:
    ids = s.enroll_many(rng.standard_normal((20, 16)), subject_ids=[f"S-{i % 10}" for i in
                        range(20)], purposes=["w"], ttl=timedelta(days=10), actor="old")
    s.delete(ids[0], actor="old")
    s.erase_subject("S-1", actor="old")
"""


def test_a_store_written_by_the_old_code_opens(tmp_path: Path, clock: Any) -> None:
    """The real thing: a store created by the code of before bucket keys (taken from git
    history; skipped where that commit is not available) opens and is moved. The same
    master key in each version's key file format (hex then; typed base64 now)."""
    root = Path(__file__).resolve().parents[2]
    old = tmp_path / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", OLD_COMMIT, "biotemplate"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this checkout")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    folder = tmp_path / "store"
    master = sealing.random_key()
    (tmp_path / "old.key").write_text(master.hex() + "\n")
    (tmp_path / "new.key").write_text(key_text(master) + "\n")
    for name in ("old.key", "new.key"):
        (tmp_path / name).chmod(0o600)
    keys = bt.FileKeyProvider(tmp_path / "new.key")
    subprocess.run([sys.executable, "-c", OLD_SCRIPT, str(folder), str(tmp_path / "old.key")],
                   cwd=old, env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True)
    old_ring = ring_of(folder, keys)
    assert len(old_ring.legacy_subjects) == 9 and not old_ring.buckets
    with bt.TemplateStore.open(folder, key_provider=keys, clock=clock) as s:
        stats = s.stats()
        assert (stats.records, stats.subjects, stats.integrity_failures) == (17, 9, 0)
        assert len(s.export_subject("S-0", actor="t")) == 1  # one deleted by the old code
        assert len(s.export_subject("S-2", actor="t")) == 2
        assert s.export_subject("S-1", actor="t") == []
        assert s.erase_subject("S-2", actor="dpo").key_destroyed
        assert s.audit.verify().ok
    ring = ring_of(folder, keys)
    assert not ring.legacy_subjects and len(ring.buckets) == BUCKETS
