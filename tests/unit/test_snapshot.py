"""Sealed index snapshots (issue 4, items 3-4; SECURITY.md §4): written on close and on demand,
loaded on open with the changes since applied, rejected (and rebuilt from the sealed rows)
when tampered with or stale, never holding a template in clear, and progress callbacks.

Which path ``open`` took is read from its audit entry (``index="snapshot"`` or
``"rebuild"``), never from timings. Small galleries (50 subjects x 2 samples, dim 64).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sqlite3
import struct
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import biotemplate as bt
from biotemplate import _files as files_module
from biotemplate import snapshot as snapshot_module
from biotemplate.keyring import Keyring
from biotemplate.synthetic import Gallery, make_gallery, probes, strangers
from biotemplate.validation import normalised


def read_snapshot(path: Any, keyring: Any) -> tuple[int, dict[str, Any]]:
    """``snapshot.opened`` with every array read out of the file (in order), for tests
    that keep the state."""
    def own(value: Any) -> Any:
        if isinstance(value, snapshot_module.Section):
            return value.read()
        if isinstance(value, dict):
            return {k: own(v) for k, v in value.items()}
        if isinstance(value, list):
            return [own(v) for v in value]
        return value

    with snapshot_module.opened(path, keyring) as (seq, state):
        return seq, own(state)


DIM = 64
MODEL = "test-model-v1"
SNAPSHOT = "index.snapshot"
WATCH: dict[str, Any] = {"purposes": ["watchlist"], "ttl": timedelta(days=30),
                         "source": "enrolment-desk-1"}
Results = list[list[tuple[str, str, float]]]


# --- helpers --------------------------------------------------------------------------


@pytest.fixture(params=["exact", "hnsw"])
def params(request: pytest.FixtureRequest) -> bt.IndexParams | None:
    """The default (exact search at this size) or the HNSW graph for every search."""
    return bt.IndexParams(exact_cutoff=0) if request.param == "hnsw" else None


class Stores:
    """Creates and reopens the store in ``store_dir``; closes whatever is left open."""

    def __init__(self, store_dir: Path, policy: bt.RetentionPolicy, keys: Any, clock: Any,
                 params: bt.IndexParams | None = None) -> None:
        self.dir, self.policy, self.keys, self.clock = store_dir, policy, keys, clock
        self.params = params
        self._open: list[bt.TemplateStore] = []

    @property
    def snapshot(self) -> Path:
        return self.dir / SNAPSHOT

    def create(self, **kw: Any) -> bt.TemplateStore:
        s = bt.TemplateStore.create(self.dir, dim=DIM, model=MODEL, policy=self.policy,
                                    key_provider=self.keys, clock=self.clock,
                                    index_params=self.params, **kw)
        self._open.append(s)
        return s

    def open(self, **kw: Any) -> bt.TemplateStore:
        s = bt.TemplateStore.open(self.dir, key_provider=self.keys, clock=self.clock,
                                  index_params=self.params, **kw)
        self._open.append(s)
        return s

    def close_all(self) -> None:
        for s in self._open:
            with contextlib.suppress(Exception):
                s.close()


@pytest.fixture
def stores(store_dir: Path, policy: bt.RetentionPolicy, keys: Any,
           clock: Any) -> Iterator[Stores]:
    st = Stores(store_dir, policy, keys, clock)
    yield st
    st.close_all()


@pytest.fixture
def pstores(store_dir: Path, policy: bt.RetentionPolicy, keys: Any, clock: Any,
            params: bt.IndexParams | None) -> Iterator[Stores]:
    """:func:`stores` for both index paths."""
    st = Stores(store_dir, policy, keys, clock, params)
    yield st
    st.close_all()


def enrol(store: bt.TemplateStore, gallery: Gallery, rows: Any = slice(None)) -> list[str]:
    idx = np.arange(len(gallery.subject_ids))[rows]
    return store.enroll_many(gallery.templates[idx],
                             subject_ids=[gallery.subject_ids[i] for i in idx],
                             actor="svc-enrol", **WATCH)


def probe_set(gallery: Gallery) -> np.ndarray:
    """Mated probes of 10 identities, 3 strangers and 3 enrolled templates verbatim."""
    return np.concatenate([probes(gallery, list(range(0, 50, 5))), strangers(3, DIM),
                           gallery.templates[[1, 40, 77]]])


def results(store: bt.TemplateStore, ps: np.ndarray, purpose: str = "watchlist",
            k: int = 20) -> Results:
    out = []
    for p in ps:
        res = store.search(p, purpose=purpose, k=k, actor="analyst-1", mode="investigation")
        out.append([(c.record_id, c.subject_id, c.score) for c in res.candidates])
    return out


def assert_same(got: Results, want: Results) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert [c[:2] for c in g] == [c[:2] for c in w], f"probe {i}"
        for (_, _, sg), (_, _, sw) in zip(g, w, strict=True):
            assert abs(sg - sw) <= 1e-6, f"probe {i}: score {sg} != {sw}"


def subjects_found(store: bt.TemplateStore, template: np.ndarray,
                   purpose: str = "watchlist") -> set[str]:
    return {c[1] for c in results(store, template[None, :], purpose)[0]}


def audit_head(store: bt.TemplateStore) -> int:
    return store.audit.checkpoint().seq  # signs the head; appends nothing


def audit_since(store: bt.TemplateStore, seq: int) -> list[bt.AuditEntry]:
    return [store.audit.get(i) for i in range(seq + 1, audit_head(store) + 1)]


def last_event(store: bt.TemplateStore, event: str) -> bt.AuditEntry:
    for seq in range(audit_head(store), 0, -1):
        entry = store.audit.get(seq)
        if entry.event == event:
            return entry
    raise AssertionError(f"no {event!r} entry in the audit trail")


def index_source(store: bt.TemplateStore) -> str:
    """How the last open built its index: "snapshot" or "rebuild" (from its audit entry)."""
    return str(last_event(store, "open").fields["index"])


def snapshot_rejections(store: bt.TemplateStore) -> int:
    return sum(1 for i in range(1, audit_head(store) + 1)
               if (e := store.audit.get(i)).event == "snapshot" and e.outcome != "ok")


def edit_row(store_dir: Path, record_id: str, sql: str, *args: Any) -> None:
    """Offline edit of one row of records.db (the store must be closed)."""
    conn = sqlite3.connect(store_dir / "records.db")
    try:
        with conn:
            assert conn.execute(sql, (*args, record_id)).rowcount == 1
    finally:
        conn.close()


def blob_of(store_dir: Path, record_id: str) -> bytes:
    conn = sqlite3.connect(store_dir / "records.db")
    try:
        return bytes(conn.execute("SELECT blob FROM records WHERE record_id = ?",
                                  (record_id,)).fetchone()[0])
    finally:
        conn.close()


def needles(template: np.ndarray) -> list[bytes]:
    """Byte patterns that would betray a template: the first 8 float32 values, as given
    and as the index stores them (L2-normalised), in both byte orders."""
    t = np.asarray(template, dtype=np.float32)
    out = []
    for v in (t, normalised(t[None, :])[0]):
        out += [v[:8].astype("<f4").tobytes(), v[:8].astype(">f4").tobytes()]
    return out


def holds_template(data: bytes, template: np.ndarray) -> bool:
    return any(n in data for n in needles(template))


def decrypted_snapshot(store_dir: Path, keys: Any) -> bytes:
    """Every byte string and array inside the snapshot, opened with the current keyring
    (what a thief holding the folder and the master key would get)."""
    keyring = Keyring.load(store_dir / "keyring", keys.master_key())
    _, state = read_snapshot(store_dir / SNAPSHOT, keyring)

    def walk(obj: Any) -> Iterator[bytes]:
        if isinstance(obj, dict):
            for key, value in obj.items():
                yield from walk(key)
                yield from walk(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                yield from walk(value)
        elif isinstance(obj, np.ndarray):
            yield obj.tobytes()
        elif isinstance(obj, bytes | bytearray | memoryview):
            yield bytes(obj)

    return b"\x00".join(walk(state))


# --- written on close and on demand ---------------------------------------------------


def test_close_writes_a_snapshot_that_open_loads(pstores: Stores, gallery: Gallery) -> None:
    s = pstores.create()
    enrol(s, gallery)
    ps = probe_set(gallery)
    want = results(s, ps)
    assert not pstores.snapshot.exists()  # nothing before close (or an explicit snapshot)
    s.close()
    assert pstores.snapshot.exists()

    s = pstores.open()
    opened = last_event(s, "open")
    assert opened.fields["index"] == "snapshot"
    assert opened.fields["records"] == 100
    assert s.stats().indexed == 100
    assert s.stats().integrity_failures == 0
    assert_same(results(s, ps), want)
    assert s.rebuild_index().records == 100  # the same store rebuilt from the sealed rows
    assert_same(results(s, ps), want)
    s.close()

    pstores.snapshot.unlink()  # and a store opened without any snapshot
    s = pstores.open()
    assert index_source(s) == "rebuild"
    assert_same(results(s, ps), want)


def test_snapshot_on_demand_returns_the_change_seq_it_covers(stores: Stores,
                                                             gallery: Gallery) -> None:
    s = stores.create()
    ids = enrol(s, gallery, slice(0, 60))
    seq1 = s.snapshot().change_seq
    assert type(seq1) is int and seq1 > 0
    assert stores.snapshot.exists()
    entry = last_event(s, "snapshot")
    assert entry.outcome == "ok" and entry.fields["seq"] == seq1
    assert s.snapshot().change_seq == seq1  # nothing changed in between
    enrol(s, gallery, slice(60, None))
    seq2 = s.snapshot().change_seq
    assert seq2 > seq1
    s.delete(ids[0], actor="svc")
    seq3 = s.snapshot().change_seq
    assert seq3 > seq2
    assert last_event(s, "snapshot").fields["seq"] == seq3
    want = results(s, probe_set(gallery))
    s.close()
    s = stores.open()
    assert index_source(s) == "snapshot"
    assert_same(results(s, probe_set(gallery)), want)


def test_snapshot_on_close_false_writes_none(stores: Stores, gallery: Gallery) -> None:
    s = stores.create(snapshot_on_close=False)
    enrol(s, gallery)
    s.close()
    assert not stores.snapshot.exists()
    s = stores.open(snapshot_on_close=False)
    assert index_source(s) == "rebuild"
    s.close()
    assert not stores.snapshot.exists()
    s = stores.open(snapshot_on_close=False)
    assert all(s.audit.get(i).event != "snapshot" for i in range(1, audit_head(s) + 1))


def test_changes_after_the_snapshot_are_applied_on_open(pstores: Stores, clock: Any,
                                                        gallery: Gallery) -> None:
    s = pstores.create(snapshot_on_close=False)
    ids = enrol(s, gallery)
    rare = s.enroll_many(gallery.templates[[20, 22]], subject_ids=["R-1", "R-2"],
                         purposes=["rare"], ttl=timedelta(days=1), actor="svc")
    s.snapshot()
    newcomers = make_gallery(10, 2, DIM, seed=11, prefix="N-")
    new_ids = enrol(s, newcomers)                      # enrolled after the snapshot
    s.delete(ids[6], actor="svc", reason="wrong capture")  # P-000003's first sample
    s.erase_subject("N-000002", actor="dpo")           # erased after the snapshot...
    s.delete(ids[8], actor="svc")                      # P-000004: then deleted,
    s.delete(new_ids[0], actor="svc")                  # deleted (a newcomer): a deletion
    s.snapshot()                                       # drops the snapshot, so a fresh one
    more = make_gallery(3, 1, DIM, seed=12, prefix="M-")
    more_ids = enrol(s, more)                          # then enrolled after it,
    assert s.place_hold("P-000005", actor="legal", reason="case 9").records == 2  # resealed,
    clock.advance(days=2)                              # and the rare records expired
    ps = np.concatenate([probe_set(gallery), probes(newcomers, list(range(10)))])
    want, want_rare = results(s, ps), results(s, gallery.templates[[20, 22]], "rare")
    assert want_rare == [[], []]
    s.close()

    s = pstores.open()
    assert index_source(s) == "snapshot"
    assert_same(results(s, ps), want)
    assert results(s, gallery.templates[[20, 22]], "rare") == [[], []]
    found = {rid for row in results(s, ps) for rid, _, _ in row}
    assert ids[6] not in found and ids[8] not in found and new_ids[0] not in found
    assert not set(rare) & found
    assert set(more_ids) <= {rid for row in results(s, more.templates) for rid, _, _ in row}
    assert "N-000005" in subjects_found(s, newcomers.templates[10])
    assert "N-000002" not in subjects_found(s, newcomers.templates[4])
    assert "P-000005" in subjects_found(s, gallery.templates[10])  # held, still live
    assert all(v.held for v in s.export_subject("P-000005", actor="legal"))
    assert s.stats().integrity_failures == 0
    s.rebuild_index()
    assert_same(results(s, ps), want)


def test_an_older_snapshot_of_the_same_generation_still_gives_correct_results(
        stores: Stores, gallery: Gallery, tmp_path: Path) -> None:
    """An authentic but older snapshot (same epoch, no key destroyed since) may be used:
    every row changed or gone since is re-read or dropped, so results equal a rebuild's.
    (Rows go without a key change only by a purge within the epoch that leaves each
    subject a record: a deletion rotates its bucket key, which kills every snapshot.)"""
    s = stores.create()
    enrol(s, gallery, slice(0, 80))
    s.enroll_many(gallery.templates[[0, 3]], subject_ids=[gallery.subject_ids[i] for i in (0, 3)],
                  purposes=["watchlist"], ttl=timedelta(hours=1), actor="svc-enrol",
                  source="enrolment-desk-1")
    s.snapshot()
    shutil.copy(stores.snapshot, tmp_path / "old.snapshot")
    enrol(s, gallery, slice(80, None))
    stores.clock.advance(hours=2)
    report = s.purge_expired()
    assert (report.purged, report.subject_keys_destroyed) == (2, 0)
    assert report.epoch_after == report.epoch_before
    assert s.place_hold(gallery.subject_ids[10], actor="legal", reason="case").records == 2
    want = results(s, probe_set(gallery))
    s.close()
    shutil.copy(tmp_path / "old.snapshot", stores.snapshot)
    s = stores.open()
    assert index_source(s) == "snapshot"
    assert_same(results(s, probe_set(gallery)), want)
    assert s.stats().indexed == 100 and s.stats().missing_rows == 0


# --- tampered, corrupt or foreign snapshots: rebuild, never crash, never wrong -----------


class Tamper:
    """A closed store with a valid snapshot and the results it must keep giving."""

    def __init__(self, stores: Stores, gallery: Gallery) -> None:
        self.stores = stores
        s = stores.create()
        enrol(s, gallery)
        self.ps = probe_set(gallery)
        self.want = results(s, self.ps)
        s.close()
        self.good = stores.snapshot.read_bytes()
        (self.header_len,) = struct.unpack(">I", self.good[4:8])
        self.body_at = 8 + self.header_len
        self.header = msgpack.unpackb(self.good[8:self.body_at], raw=False)

    def check(self, data: bytes | None, what: str) -> None:
        """Install ``data`` as the snapshot, open: rebuilt, same results, file removed."""
        if data is not None:
            self.stores.snapshot.write_bytes(data)
        s = self.stores.open(snapshot_on_close=False)
        try:
            assert index_source(s) == "rebuild", what
            assert not self.stores.snapshot.exists(), f"{what}: the bad file was kept"
            assert last_event(s, "snapshot").outcome != "ok", what
            assert s.stats().integrity_failures == 0, what
            assert_same(results(s, self.ps), self.want)
        finally:
            s.close()

    def with_header(self, header: Any) -> bytes:
        raw = msgpack.packb(header, use_bin_type=True)
        return self.good[:4] + struct.pack(">I", len(raw)) + raw + self.good[self.body_at:]


@pytest.fixture
def tamper(stores: Stores, gallery: Gallery) -> Tamper:
    return Tamper(stores, gallery)


def test_the_good_snapshot_loads(tamper: Tamper) -> None:
    """The control for the tamper tests below: untouched, the same file is used."""
    s = tamper.stores.open(snapshot_on_close=False)
    assert index_source(s) == "snapshot"
    assert_same(results(s, tamper.ps), tamper.want)


def test_any_flipped_header_byte_is_rejected(tamper: Tamper) -> None:
    """Magic, length field and msgpack header: every byte (every value of every byte is
    tried below the store, in the exhaustive reader test)."""
    for at in range(tamper.body_at):
        for mask in (0x01, 0xFF) if at < 8 else (0x01,):
            data = bytearray(tamper.good)
            data[at] ^= mask
            tamper.check(bytes(data), f"header byte {at} ^ {mask:#x}")


@pytest.mark.parametrize("where", ["version", "nonce", "first-ciphertext", "middle",
                                   "inside-tag", "last"])
def test_a_flipped_body_byte_is_rejected(tamper: Tamper, where: str) -> None:
    body = tamper.body_at
    at = {"version": body, "nonce": body + 7, "first-ciphertext": body + 25,
          "middle": (body + len(tamper.good)) // 2, "inside-tag": len(tamper.good) - 9,
          "last": len(tamper.good) - 1}[where]
    data = bytearray(tamper.good)
    data[at] ^= 0x01
    tamper.check(bytes(data), where)


def test_flipped_body_bytes_everywhere_are_rejected(tamper: Tamper) -> None:
    """A byte every ~1/20th of the body: wherever it lands, a rebuild, never a crash."""
    step = max(1, (len(tamper.good) - tamper.body_at) // 20)
    for at in range(tamper.body_at, len(tamper.good), step):
        data = bytearray(tamper.good)
        data[at] ^= 0x5A
        tamper.check(bytes(data), f"body byte {at}")


@pytest.mark.parametrize("keep", ["0", "3", "4", "7", "8", "header-only", "no-ciphertext",
                                  "no-tag", "half", "all-but-one"])
def test_a_truncated_snapshot_is_rejected(tamper: Tamper, keep: str) -> None:
    size = {"header-only": tamper.body_at, "no-ciphertext": tamper.body_at + 25,
            "no-tag": len(tamper.good) - 16, "half": len(tamper.good) // 2,
            "all-but-one": len(tamper.good) - 1}.get(keep)
    tamper.check(tamper.good[: int(keep) if size is None else size], f"truncated to {keep}")


GARBAGE: dict[str, Callable[[Tamper], bytes]] = {
    "random-small": lambda t: os.urandom(64),
    "random-same-size": lambda t: os.urandom(len(t.good)),
    "zeros": lambda t: bytes(len(t.good)),
    "text": lambda t: b"this is not an index snapshot\n" * 100,
    "magic-only": lambda t: b"BTSN",
    "huge-header-length": lambda t: b"BTSN\xff\xff\xff\xff" + t.good[8:],
    "zero-header-length": lambda t: b"BTSN\x00\x00\x00\x00" + t.good[8:],
    "random-body": lambda t: t.good[: t.body_at] + os.urandom(len(t.good) - t.body_at),
    "appended-byte": lambda t: t.good + b"\x00",
    "doubled": lambda t: t.good + t.good,
    "other-magic": lambda t: b"BTKR" + t.good[4:],
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_is_rejected(tamper: Tamper, kind: str) -> None:
    tamper.check(GARBAGE[kind](tamper), kind)


CRAFTED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "seq-changed": lambda h: {**h, "seq": h["seq"] + 1},
    "seq-negative": lambda h: {**h, "seq": -1},
    "seq-huge": lambda h: {**h, "seq": 2**64 - 1},
    "seq-string": lambda h: {**h, "seq": "many"},
    "seq-nan": lambda h: {**h, "seq": math.nan},
    "seq-inf": lambda h: {**h, "seq": math.inf},
    "epoch-inf": lambda h: {**h, "epoch": -math.inf},
    "seq-float": lambda h: {**h, "seq": float(h["seq"])},
    "epoch-next": lambda h: {**h, "epoch": h["epoch"] + 1},
    "erasures-next": lambda h: {**h, "erasures": h["erasures"] + 1},
    "version-1": lambda h: {**h, "v": 1},
    "version-2": lambda h: {**h, "v": 2},
    "version-4": lambda h: {**h, "v": 4},
    "size-smaller": lambda h: {**h, "size": h["size"] - 1},
    "size-huge": lambda h: {**h, "size": 2**62},
    "salt-short": lambda h: {**h, "salt": h["salt"][:16]},
    "salt-other": lambda h: {**h, "salt": bytes(32)},
    "missing-seq": lambda h: {k: v for k, v in h.items() if k != "seq"},
    "many-keys": lambda h: {**h, **{f"k{i}": i for i in range(40)}},
    "header-list": lambda h: list(h.values()),
    "header-nil": lambda h: None,
    "header-int": lambda h: 7,
    "header-bytes": lambda h: b"\x00" * 64,
    "header-nested": lambda h: {**h, "seq": [[[[h["seq"]]]]]},
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_a_crafted_header_is_rejected(tamper: Tamper, kind: str) -> None:
    """Headers re-encoded by someone who can write the folder (the header is only
    authenticated once the body is opened: parsing it must fail safely first)."""
    tamper.check(tamper.with_header(CRAFTED[kind](dict(tamper.header))), kind)


def test_a_body_spliced_from_another_snapshot_of_the_same_store_is_rejected(
        tamper: Tamper, gallery: Gallery) -> None:
    s = tamper.stores.open(snapshot_on_close=False)
    assert index_source(s) == "snapshot"
    s.delete(s.search(gallery.templates[0], purpose="watchlist", k=1,
                      actor="a").candidates[0].record_id, actor="svc")
    tamper.want = results(s, tamper.ps)
    s.snapshot()
    s.close()
    newer = tamper.stores.snapshot.read_bytes()
    (n,) = struct.unpack(">I", newer[4:8])
    # the old header over the new body, and the new header over the old body
    tamper.check(tamper.good[: tamper.body_at] + newer[8 + n:], "old header, new body")
    tamper.check(newer[: 8 + n] + tamper.good[tamper.body_at:], "new header, old body")


def test_a_snapshot_of_another_store_is_rejected(tamper: Tamper, tmp_path: Path,
                                                 policy: bt.RetentionPolicy, keys: Any,
                                                 clock: Any, gallery: Gallery) -> None:
    """Same master key, same gallery, other store: its snapshot does not open here."""
    other = bt.TemplateStore.create(tmp_path / "other", dim=DIM, model=MODEL, policy=policy,
                                    key_provider=keys, clock=clock)
    enrol(other, gallery)
    other.close()
    tamper.check((tmp_path / "other" / SNAPSHOT).read_bytes(), "another store's snapshot")


def test_a_directory_in_place_of_the_snapshot_does_not_break_open(tamper: Tamper) -> None:
    tamper.stores.snapshot.unlink()
    tamper.stores.snapshot.mkdir()
    s = tamper.stores.open(snapshot_on_close=False)
    assert index_source(s) == "rebuild"
    assert_same(results(s, tamper.ps), tamper.want)


class _NoSpace:
    """Stands in for the ``tempfile`` module of ``biotemplate._files``, which every file
    replacement goes through: the disk is full (only the snapshot writer runs in these
    blocks; records and audit keep their space)."""

    @staticmethod
    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")


def test_close_still_closes_when_the_snapshot_cannot_be_written(
        stores: Stores, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot is an optimisation: a full disk must not keep close() from auditing the
    close and releasing the store; the next open rebuilds."""
    s = stores.create()
    enrol(s, gallery)
    want = results(s, probe_set(gallery))
    with monkeypatch.context() as m:
        m.setattr(files_module, "tempfile", _NoSpace)
        s.close()
    with pytest.raises(bt.InvalidInput):  # closed
        s.search(gallery.templates[0], purpose="watchlist", actor="a")
    assert not stores.snapshot.exists()
    s = stores.open()
    assert index_source(s) == "rebuild"
    assert_same(results(s, probe_set(gallery)), want)
    assert last_event(s, "close").outcome == "ok"
    report = s.audit.verify()
    assert report.ok, report.problems


def test_a_failed_snapshot_raises_a_storage_error_and_keeps_the_store_usable(
        stores: Stores, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    s = stores.create()
    enrol(s, gallery)
    want = results(s, probe_set(gallery))
    with monkeypatch.context() as m:
        m.setattr(files_module, "tempfile", _NoSpace)
        with pytest.raises(bt.StorageError):  # a BiotemplateError, not a bare OSError
            s.snapshot()
    assert not stores.snapshot.exists()
    assert_same(results(s, probe_set(gallery)), want)
    assert s.snapshot().change_seq > 0


class _InMemory:
    """A path whose bytes are in memory (``snapshot.read`` only opens it for reading)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_bytes(self) -> bytes:
        return self.data

    def open(self, mode: str = "rb") -> io.BytesIO:
        assert mode == "rb"
        return io.BytesIO(self.data)


def test_every_header_byte_value_is_rejected_by_the_reader(
        tmp_path: Path, policy: bt.RetentionPolicy, keys: Any, clock: Any,
        gallery: Gallery) -> None:
    """Exhaustive, below the store (a two-record snapshot, read from memory, to stay
    fast): each header byte set to each of its 255 other values. ``snapshot.read`` may
    only ever raise IntegrityError, the store's signal to rebuild."""
    tiny = bt.TemplateStore.create(tmp_path / "tiny", dim=DIM, model=MODEL, policy=policy,
                                   key_provider=keys, clock=clock)
    enrol(tiny, gallery, slice(0, 2))
    seq = tiny.snapshot().change_seq
    tiny.close()
    path = tmp_path / "tiny" / SNAPSHOT
    good = path.read_bytes()
    keyring = Keyring.load(tmp_path / "tiny" / "keyring", keys.master_key())
    assert read_snapshot(path, keyring)[0] == seq  # the control
    (n,) = struct.unpack(">I", good[4:8])
    for at in range(8 + n):
        for value in range(256):
            if value == good[at]:
                continue
            data = bytearray(good)
            data[at] = value
            with pytest.raises(bt.IntegrityError):
                read_snapshot(_InMemory(bytes(data)), keyring)  # type: ignore[arg-type]


# --- stale snapshots: erasure, purge ------------------------------------------------------


def test_a_snapshot_taken_before_an_erasure_is_unusable_after_it(
        stores: Stores, gallery: Gallery, tmp_path: Path) -> None:
    s = stores.create()
    enrol(s, gallery)
    target = gallery.templates[14]  # P-000007
    assert "P-000007" in subjects_found(s, target)
    s.snapshot()
    shutil.copy(stores.snapshot, tmp_path / "before-erasure.snapshot")
    receipt = s.erase_subject("P-000007", actor="dpo", reason="GDPR Art. 17 request 55")
    assert receipt.records_erased == 2
    assert not stores.snapshot.exists()  # its key is gone: the file is removed at once
    want = results(s, probe_set(gallery))
    s.close()  # writes a fresh snapshot...
    shutil.copy(tmp_path / "before-erasure.snapshot", stores.snapshot)  # ...put the old back

    s = stores.open()
    assert index_source(s) == "rebuild"
    assert not stores.snapshot.exists()
    assert "P-000007" not in subjects_found(s, target)
    assert "P-000007" not in subjects_found(s, probes(gallery, [7])[0])
    assert s.export_subject("P-000007", actor="dpo") == []
    assert_same(results(s, probe_set(gallery)), want)
    s.close()

    s = stores.open()  # and the snapshot written after the erasure is fine to use
    assert index_source(s) == "snapshot"
    assert "P-000007" not in subjects_found(s, target)


def test_a_snapshot_taken_before_a_subjects_last_record_was_deleted_is_unusable(
        stores: Stores, gallery: Gallery, tmp_path: Path, keys: Any) -> None:
    """Deleting a subject's last record destroys its key, like an erasure: a snapshot
    from before must not keep a readable copy of its template."""
    s = stores.create()
    ids = enrol(s, gallery)
    s.snapshot()
    shutil.copy(stores.snapshot, tmp_path / "before-delete.snapshot")
    s.delete(ids[14], actor="svc")
    s.delete(ids[15], actor="svc")  # P-000007's last record: its key is shredded
    s.close()
    shutil.copy(tmp_path / "before-delete.snapshot", stores.snapshot)
    with pytest.raises(bt.IntegrityError):
        decrypted_snapshot(stores.dir, keys)
    s = stores.open()
    assert index_source(s) == "rebuild"
    assert "P-000007" not in subjects_found(s, gallery.templates[14])


def test_a_snapshot_taken_before_a_purge_that_advanced_the_epoch_is_unusable(
        stores: Stores, clock: Any, gallery: Gallery, tmp_path: Path) -> None:
    s = stores.create()
    enrol(s, gallery)
    rare = s.enroll_many(gallery.templates[[2, 3]], subject_ids=["R-1", "R-1"],
                         purposes=["rare"], ttl=timedelta(days=1), actor="svc")
    s.snapshot()
    shutil.copy(stores.snapshot, tmp_path / "before-purge.snapshot")
    clock.advance(days=3)
    report = s.purge_expired()
    assert report.purged == 2 and report.epoch_after > report.epoch_before
    assert not stores.snapshot.exists()
    want = results(s, probe_set(gallery))
    s.close()
    shutil.copy(tmp_path / "before-purge.snapshot", stores.snapshot)

    s = stores.open()
    assert index_source(s) == "rebuild"
    assert not stores.snapshot.exists()
    assert_same(results(s, probe_set(gallery)), want)
    assert results(s, gallery.templates[[2, 3]], "rare") == [[], []]
    assert not {rid for row in results(s, probe_set(gallery)) for rid, _, _ in row} & set(rare)


# --- rows edited offline after the snapshot -------------------------------------------------


def _flip(blob: bytes, at: int) -> bytes:
    data = bytearray(blob)
    data[at] ^= 0x01
    return bytes(data)


ROW_EDITS: dict[str, Callable[[Path, str], None]] = {
    "blob-last-byte": lambda d, rid: edit_row(
        d, rid, "UPDATE records SET blob = ? WHERE record_id = ?", _flip(blob_of(d, rid), -1)),
    "purposes": lambda d, rid: edit_row(
        d, rid, "UPDATE records SET purposes = ? WHERE record_id = ?", "rare,watchlist"),
    "expiry": lambda d, rid: edit_row(
        d, rid, "UPDATE records SET expiry_us = expiry_us + ? WHERE record_id = ?",
        86_400_000_000),
}


@pytest.mark.parametrize("edit", sorted(ROW_EDITS))
def test_a_row_edited_offline_after_the_snapshot_is_excluded_and_counted(
        pstores: Stores, gallery: Gallery, edit: str) -> None:
    s = pstores.create()
    ids = enrol(s, gallery)
    s.close()  # snapshot written
    ROW_EDITS[edit](pstores.dir, ids[0])  # P-000000's first sample

    s = pstores.open()
    assert index_source(s) == "snapshot"
    assert s.stats().integrity_failures == 1
    assert ids[0] in last_event(s, "integrity").fields["record_ids"]
    for purpose in ("watchlist", "rare"):
        found = {rid for row in results(s, gallery.templates[[0, 1]], purpose)
                 for rid, _, _ in row}
        assert ids[0] not in found, f"tampered row served for {purpose}"
    assert ids[1] in {rid for rid, _, _ in results(s, gallery.templates[[1]])[0]}
    assert s.stats().indexed == 99
    s.rebuild_index()  # a rebuild agrees
    assert s.stats().integrity_failures == 1 and s.stats().indexed == 99
    s.close()

    s = pstores.open()  # and the count survives the next snapshot round trip
    assert index_source(s) == "snapshot"
    assert s.stats().integrity_failures == 1
    assert ids[0] not in {rid for rid, _, _ in results(s, gallery.templates[[0]])[0]}


def test_a_forgery_that_keeps_header_and_tag_is_caught_at_the_next_decrypt(
        pstores: Stores, gallery: Gallery) -> None:
    """The documented limit (SECURITY.md, "Snapshots trust unchanged rows"): a ciphertext
    byte edited away from the tag is not seen at open (search keeps serving the authentic
    vector the snapshot holds) but is caught when the row is next decrypted."""
    s = pstores.create()
    ids = enrol(s, gallery)
    s.close()
    blob = blob_of(pstores.dir, ids[0])
    edit_row(pstores.dir, ids[0], "UPDATE records SET blob = ? WHERE record_id = ?",
             _flip(blob, len(blob) // 2))

    s = pstores.open()
    assert index_source(s) == "snapshot"
    assert ids[0] in {rid for rid, _, _ in results(s, gallery.templates[[0]])[0]}
    with pytest.raises(bt.IntegrityError):
        s.export_subject("P-000000", actor="dpo")
    s.rebuild_index()
    assert s.stats().integrity_failures == 1
    assert ids[0] not in {rid for rid, _, _ in results(s, gallery.templates[[0]])[0]}


# --- what the file holds ------------------------------------------------------------------------


def test_the_snapshot_file_is_0600_and_holds_no_plaintext(stores: Stores,
                                                          gallery: Gallery) -> None:
    s = stores.create()
    enrol(s, gallery)
    s.snapshot()
    assert stores.snapshot.stat().st_mode & 0o777 == 0o600
    data = stores.snapshot.read_bytes()
    for i, template in enumerate(gallery.templates):
        assert not holds_template(data, template), f"template {i} in clear"
    for sid in set(gallery.subject_ids):
        assert sid.encode() not in data
    s.close()
    assert stores.snapshot.stat().st_mode & 0o777 == 0o600
    assert not any(p.name.startswith(".index.snapshot.") for p in stores.dir.iterdir())


def test_sections_are_read_in_file_order_only(stores: Stores, gallery: Gallery,
                                              keys: Any) -> None:
    """A section's bytes are gone once a later one was read (the reader streams): asking
    for them then is an error, and so is a buffer of the wrong size."""
    s = stores.create()
    enrol(s, gallery)
    s.snapshot()
    keyring = Keyring.load(stores.dir / "keyring", keys.master_key())
    with pytest.raises(bt.IntegrityError):
        with snapshot_module.opened(stores.dir / SNAPSHOT, keyring) as (_, state):
            labels, expiry = state["records"]["labels"], state["records"]["expiry"]
            assert isinstance(labels, snapshot_module.Section)
            with pytest.raises(bt.IntegrityError):
                labels.read_into(memoryview(bytearray(labels.nbytes + 1)))
            assert expiry.read().shape == labels.shape
            labels.read()
    with snapshot_module.opened(stores.dir / SNAPSHOT, keyring) as (_, state):
        pass  # nothing read: the whole body is still authenticated at the end
    s.close()


def test_the_template_search_technique_finds_a_template(stores: Stores, gallery: Gallery,
                                                        keys: Any) -> None:
    """The control for the two tests around it: opened, the snapshot does hold the
    live templates, found by the same byte search."""
    s = stores.create()
    enrol(s, gallery)
    s.snapshot()
    clear = decrypted_snapshot(stores.dir, keys)
    assert all(holds_template(clear, t) for t in gallery.templates)


def test_a_snapshot_holds_no_erased_deleted_or_expired_template(
        stores: Stores, clock: Any, gallery: Gallery, keys: Any) -> None:
    """Opened with the current keys, a snapshot holds only live templates (§4: compacted
    before every snapshot; the docstring of ``snapshot()``: expired vectors overwritten)."""
    s = stores.create()
    ids = enrol(s, gallery, slice(0, 90))
    s.enroll_many(gallery.templates[90:], subject_ids=gallery.subject_ids[90:],
                  purposes=["rare"], ttl=timedelta(days=1), actor="svc")
    s.erase_subject("P-000001", actor="dpo")  # rows 2, 3
    s.delete(ids[4], actor="svc")             # row 4 (P-000002 keeps row 5)
    clock.advance(days=2)                     # rows 90-99 expire; no search, no purge
    s.snapshot()
    clear = decrypted_snapshot(stores.dir, keys)
    gone = {2: "erased", 3: "erased", 4: "deleted"} | {i: "expired" for i in range(90, 100)}
    leaked = {i: why for i, why in gone.items() if holds_template(clear, gallery.templates[i])}
    assert not leaked, f"templates still in the snapshot: {leaked}"
    assert holds_template(clear, gallery.templates[5])


# --- progress callbacks ----------------------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        assert self.calls, "progress was never called"
        assert all(type(d) is int and type(t) is int for d, t in self.calls)
        assert {t for _, t in self.calls} == {total}
        done = [d for d, _ in self.calls]
        assert done == sorted(done) and 0 < done[0] and done[-1] == total


def test_progress_of_enroll_many_rebuild_and_open(stores: Stores, gallery: Gallery) -> None:
    s = stores.create(snapshot_on_close=False)
    ticks = Ticks()
    s.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="svc",
                  progress=ticks, **WATCH)
    ticks.check(100)
    ticks = Ticks()
    assert s.rebuild_index(progress=ticks).records == 100
    ticks.check(100)
    s.close()
    ticks = Ticks()
    s = stores.open(progress=ticks)  # no snapshot: the rebuild path
    assert index_source(s) == "rebuild"
    ticks.check(100)


def _progress_at_scale(stores: Stores, n: int) -> None:
    many = make_gallery(n, 1, DIM, seed=9)
    s = stores.create(snapshot_on_close=False)
    enrol_ticks, rebuild_ticks, open_ticks = Ticks(), Ticks(), Ticks()
    s.enroll_many(many.templates, subject_ids=many.subject_ids, actor="svc",
                  progress=enrol_ticks, **WATCH)
    enrol_ticks.check(n)
    if n > 10_000:  # the index adds in chunks of 10,000 rows
        assert len(enrol_ticks.calls) > 1
    assert s.rebuild_index(progress=rebuild_ticks).records == n
    rebuild_ticks.check(n)
    assert len(rebuild_ticks.calls) > 1  # several batches, each reported
    s.close()
    s = stores.open(progress=open_ticks)
    assert index_source(s) == "rebuild"
    open_ticks.check(n)
    assert len(open_ticks.calls) > 1


def test_progress_over_several_batches(stores: Stores) -> None:
    _progress_at_scale(stores, 4_500)


@pytest.mark.slow
def test_progress_over_several_enrolment_chunks(stores: Stores) -> None:
    _progress_at_scale(stores, 20_001)


# --- the open's fast path: no pass over the rows when none was written since ----------


class _NoScan:
    """Stands in for SQLiteBackend.scan_headers/get: fails the test if the rows are read."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise AssertionError("the rows were read on a clean open")


def test_a_clean_open_from_the_snapshot_reads_no_row(
        stores: Stores, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    from biotemplate.backends.sqlite import SQLiteBackend

    s = stores.create()
    enrol(s, gallery)
    want = results(s, probe_set(gallery))
    s.close()
    guard = _NoScan()
    monkeypatch.setattr(SQLiteBackend, "scan_headers", guard)
    monkeypatch.setattr(SQLiteBackend, "scan", guard)
    s = stores.open()
    assert index_source(s) == "snapshot" and guard.calls == 0
    monkeypatch.undo()  # searches start the confirmation baseline's pass over the headers
    assert_same(results(s, probe_set(gallery)), want)


@pytest.mark.parametrize("edit", ["delete", "insert-copy"])
def test_rows_deleted_or_added_with_sqlite_after_the_snapshot_are_noticed(
        stores: Stores, gallery: Gallery, edit: str) -> None:
    """Writes that bypass the store but go through SQLite are logged by the triggers, so
    the open checks the rows: a row deleted offline is not served from the snapshot, a
    row copied in under a new id fails authentication and is counted."""
    s = stores.create()
    ids = enrol(s, gallery)
    s.close()
    conn = sqlite3.connect(stores.dir / "records.db")
    with conn:
        if edit == "delete":
            conn.execute("DELETE FROM records WHERE record_id = ?", (ids[0],))
        else:
            conn.execute("INSERT INTO records (record_id, subject_ref, epoch, expiry_us,"
                         " purposes, model, held, blob) SELECT ?, subject_ref, epoch,"
                         " expiry_us, purposes, model, held, blob FROM records"
                         " WHERE record_id = ?", ("f" * 32, ids[0]))
    conn.close()
    s = stores.open()
    assert index_source(s) == "snapshot"
    found = {rid for rid, _, _ in results(s, gallery.templates[[0]])[0]}
    if edit == "delete":
        assert ids[0] not in found and s.stats().indexed == len(ids) - 1
    else:
        assert ids[0] in found and "f" * 32 not in found
        assert s.stats().integrity_failures == 1


def test_a_database_without_the_change_triggers_gets_them_on_open(
        stores: Stores, gallery: Gallery) -> None:
    """A records.db written before the triggers existed: the open adds them, and writes
    made with SQLite afterwards are noticed."""
    s = stores.create()
    ids = enrol(s, gallery)
    s.close()
    conn = sqlite3.connect(stores.dir / "records.db")
    with conn:
        for op in ("add", "reseal", "del"):
            conn.execute(f"DROP TRIGGER records_{op}")
    conn.close()
    stores.open().close()
    conn = sqlite3.connect(stores.dir / "records.db")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    with conn:
        conn.execute("DELETE FROM records WHERE record_id = ?", (ids[1],))
    conn.close()
    assert names == {"records_add", "records_reseal", "records_del"}
    s = stores.open()
    assert index_source(s) == "snapshot"
    assert ids[1] not in {rid for rid, _, _ in results(s, gallery.templates[[1]])[0]}


def test_a_snapshot_of_the_old_format_is_rebuilt(stores: Stores, gallery: Gallery) -> None:
    """Version 1 snapshots (one XChaCha20-Poly1305 message) are not read: rebuilt."""
    s = stores.create()
    enrol(s, gallery)
    want = results(s, probe_set(gallery))
    s.close()
    data = stores.snapshot.read_bytes()
    (n,) = struct.unpack(">I", data[4:8])
    header = msgpack.unpackb(data[8 : 8 + n])
    old = msgpack.packb({k: header[k] for k in ("seq", "epoch", "erasures")} | {"v": 1})
    stores.snapshot.write_bytes(data[:4] + struct.pack(">I", len(old)) + old + data[8 + n:])
    s = stores.open()
    assert index_source(s) == "rebuild"
    assert_same(results(s, probe_set(gallery)), want)


def test_a_deletion_drops_the_snapshot_before_it_returns(stores: Stores,
                                                         gallery: Gallery) -> None:
    """The snapshot on disk holds every indexed template: a deleted record's must not
    outlive the call (the next open rebuilds instead)."""
    s = stores.create(snapshot_on_close=False)
    ids = enrol(s, gallery)
    s.snapshot()
    assert stores.snapshot.exists()
    s.delete(ids[0], actor="svc", reason="wrong capture")
    assert not stores.snapshot.exists()
    s.close()
    s = stores.open()
    assert index_source(s) == "rebuild"
    assert ids[0] not in {rid for row in results(s, probe_set(gallery)) for rid, _, _ in row}
