"""Tamper suite: an attacker with write access to the store folder (SECURITY.md §3, §6).

A small store (10 records of 3 subjects) is built once and closed; every test works on a
copy and edits ``records.db``, ``keyring``, ``audit.db`` or ``index.snapshot`` directly,
then opens the store and checks that the edit is detected (``IntegrityError``, or the row
excluded and counted), that no call ever returns a record with wrong data, and that the
untouched records keep serving.

The base store is opened with ``snapshot_on_close=False``, so every open rebuilds the index
from the sealed rows (every row is authenticated at open). The snapshot path, where rows
whose header and AEAD tag are unchanged are trusted until next decrypted (a documented
limit, SECURITY.md "Snapshots trust unchanged rows"), has its own tests at the end.

Detection figures are printed as ``DETECTION: ...`` lines (run with ``-s`` to see them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.backends.base import RecordRow
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.codec import RecordCodec, Shredded
from biotemplate.keyring import Keyring
from biotemplate.subject_keys import SubjectKeys

DIM = 16
MODEL = "tamper-model-v1"
ACTOR = "tamper-tester"
START = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
POLICY: dict[str, Any] = {
    "epoch": "1h",
    "purposes": {
        "a": {"max_retention": "2d", "default_retention": "1d",
              "modes": ["identification", "investigation", "verification"],
              "match_threshold": 0.5},
        "b": {"max_retention": "10d", "modes": ["identification", "investigation"],
              "match_threshold": 0.5},
    },
}
# (subject, purposes, ttl): 10 records of 3 subjects; T-1's second record expires in 2h.
LAYOUT: list[tuple[str, tuple[str, ...], timedelta]] = [
    ("T-0", ("a",), timedelta(days=1)),
    ("T-0", ("a",), timedelta(days=1)),
    ("T-0", ("b",), timedelta(days=1)),
    ("T-0", ("a", "b"), timedelta(days=1)),
    ("T-1", ("a",), timedelta(days=1)),
    ("T-1", ("a",), timedelta(hours=2)),
    ("T-1", ("b",), timedelta(days=1)),
    ("T-2", ("a", "b"), timedelta(days=1)),
    ("T-2", ("a",), timedelta(days=1)),
    ("T-2", ("b",), timedelta(days=1)),
]
SUBJECTS = ("T-0", "T-1", "T-2")
TMP_ROOT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # fsyncs are not under test
KEYRING_HEAD = 4 + 1 + 16  # magic, version, store id
KEYRING_CHECK = 1 + 24 + 16  # version, nonce, tag of an empty plaintext
TAG = 16


class Clock:
    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Rec:
    rid: str
    subject: str
    purposes: tuple[str, ...]
    template: np.ndarray


@dataclass(frozen=True)
class Base:
    folder: Path
    keys: bt.FileKeyProvider
    recs: tuple[Rec, ...]

    def rec(self, rid: str) -> Rec:
        found = [r for r in self.recs if r.rid == rid]
        assert found, f"{rid!r} was never enrolled"
        return found[0]

    def of(self, subject: str) -> list[Rec]:
        return [r for r in self.recs if r.subject == subject]


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture(scope="module")
def base() -> Iterator[Base]:
    root = Path(tempfile.mkdtemp(prefix="bt-tamper-base-", dir=TMP_ROOT))
    keys = bt.FileKeyProvider.generate(root / "master.key")
    centres = np.linalg.qr(np.random.default_rng(7).standard_normal((DIM, DIM)))[0].T
    rng = np.random.default_rng(8)
    store = bt.TemplateStore.create(root / "store", dim=DIM, model=MODEL,
                                    policy=bt.RetentionPolicy.from_dict(POLICY),
                                    key_provider=keys, clock=Clock(), snapshot_on_close=False)
    recs = []
    for subject, purposes, ttl in LAYOUT:
        t = _unit(centres[SUBJECTS.index(subject)] + 0.1 * rng.standard_normal(DIM))
        rid = store.enroll(t, subject_id=subject, purposes=list(purposes), ttl=ttl,
                           actor=ACTOR, metadata={"n": len(recs)})
        recs.append(Rec(rid, subject, purposes, t))
    store.close()
    yield Base(root / "store", keys, tuple(recs))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def work(base: Base) -> Iterator[Path]:
    """A fresh copy of the base store folder."""
    root = Path(tempfile.mkdtemp(prefix="bt-tamper-", dir=TMP_ROOT))
    shutil.copytree(base.folder, root / "store")
    yield root / "store"
    shutil.rmtree(root, ignore_errors=True)


# --- direct file access (what the attacker does) -----------------------------------------


def db(folder: Path, name: str = "records.db") -> sqlite3.Connection:
    return sqlite3.connect(folder / name, isolation_level=None)


def sql(folder: Path, statement: str, params: tuple[Any, ...] = (),
        name: str = "records.db") -> list[Any]:
    con = db(folder, name)
    try:
        return con.execute(statement, params).fetchall()
    finally:
        con.close()


def get_row(folder: Path, rid: str) -> dict[str, Any]:
    con = db(folder)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM records WHERE record_id = ?", (rid,)).fetchone()
        return dict(row)
    finally:
        con.close()


def set_cols(folder: Path, rid: str, **cols: Any) -> None:
    assigns = ", ".join(f"{c} = ?" for c in cols)
    sql(folder, f"UPDATE records SET {assigns} WHERE record_id = ?", (*cols.values(), rid))


def insert_row(folder: Path, row: dict[str, Any]) -> None:
    cols = [c for c in row if c != "seq"]
    sql(folder, f"INSERT INTO records ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        tuple(row[c] for c in cols))


def flip(data: bytes, i: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[i] ^= mask
    return bytes(out)


def open_store(base: Base, folder: Path, clock: Clock | None = None,
               snapshot_on_close: bool = False) -> bt.TemplateStore:
    return bt.TemplateStore.open(folder, key_provider=base.keys, clock=clock or Clock(),
                                 snapshot_on_close=snapshot_on_close)


# --- what must hold after any tampering --------------------------------------------------


def search(store: bt.TemplateStore, probe: np.ndarray, purpose: str) -> bt.SearchResult:
    return store.search(probe, purpose=purpose, k=20, mode="investigation", actor=ACTOR,
                        reason="tamper test")


def assert_no_wrong_result(base: Base, store: bt.TemplateStore, res: bt.SearchResult,
                           excluded: set[str]) -> None:
    for c in res.candidates:
        assert c.record_id not in excluded, "a tampered record was served"
        rec = base.rec(c.record_id)  # fails on an id that was never enrolled
        assert c.subject_id == rec.subject


def assert_serving(base: Base, store: bt.TemplateStore, excluded: set[str]) -> None:
    """Tampered rows are never served; every other live record is found at rank 1 by its
    own template, with its own subject and a score of ~1."""
    for rec in base.recs:
        for purpose in rec.purposes:
            res = search(store, rec.template, purpose)
            assert_no_wrong_result(base, store, res, excluded)
            if rec.rid in excluded:
                assert rec.rid not in {c.record_id for c in res.candidates}
                continue
            top = res.candidates[0]
            assert (top.record_id, top.subject_id) == (rec.rid, rec.subject)
            assert top.score == pytest.approx(1.0, abs=1e-5)


def assert_export_ok(base: Base, store: bt.TemplateStore, subject: str,
                     excluded: set[str]) -> None:
    views = store.export_subject(subject, actor=ACTOR, reason="tamper test")
    expected = {r.rid for r in base.of(subject)} - excluded
    assert {v.record_id for v in views} == expected
    for v in views:
        assert v.subject_id == subject
        np.testing.assert_array_equal(v.template, base.rec(v.record_id).template)


def assert_export_raises(store: bt.TemplateStore, subject: str) -> None:
    with pytest.raises(bt.IntegrityError):
        store.export_subject(subject, actor=ACTOR, reason="tamper test")


def check_detected(base: Base, folder: Path, bad: set[str], *, shredded: bool = False,
                   export_raises: tuple[str, ...] = ()) -> None:
    """Open the tampered store: ``bad`` rows are excluded and counted (as integrity
    failures, or as shredded rows when their named key does not exist), never served."""
    with open_store(base, folder) as store:
        stats = store.stats()
        if shredded:
            assert (stats.shredded_rows, stats.integrity_failures) == (len(bad), 0)
        else:
            assert (stats.integrity_failures, stats.shredded_rows) == (len(bad), 0)
        assert_serving(base, store, bad)
        for subject in SUBJECTS:
            if subject in export_raises:
                assert_export_raises(store, subject)
            else:
                assert_export_ok(base, store, subject, bad)
        assert store.audit.verify().ok


# --- sealed blobs ------------------------------------------------------------------------


def test_every_bit_and_byte_flip_of_a_blob_is_detected_by_the_codec(base: Base) -> None:
    keyring = Keyring.load(base.folder / "keyring", base.keys.master_key())
    backend = SQLiteBackend.open(base.folder / "records.db")
    try:
        rows = [backend.get(r.rid) for r in base.recs]
        subject_keys = SubjectKeys(backend, keyring)
        subject_keys.preload()  # every subject's key and record ids, from records.db
    finally:
        backend.close()
    codec = RecordCodec(keyring, model=MODEL, dim=DIM, entries=subject_keys.entry)
    total = detected = 0
    for row in rows:
        assert row is not None
        assert codec.open(row).subject_id == base.rec(row.record_id).subject  # intact opens
        for i in range(len(row.blob)):
            for mask in (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF):
                tampered = RecordRow(row.record_id, row.subject_ref, row.epoch, row.expiry_us,
                                     row.purposes, row.model, row.held,
                                     flip(row.blob, i, mask), row.seq)
                total += 1
                try:
                    codec.open(tampered)
                except Shredded:  # a KeyUnavailable: would misreport tampering as shredding
                    pytest.fail(f"flip at byte {i} read as shredded")
                except bt.IntegrityError:
                    detected += 1
    print(f"\nDETECTION: codec-level blob flips (9 per byte, 10 rows, "
          f"{len(rows[0].blob)}-byte blobs): {detected}/{total} detected")
    assert detected == total


def test_every_byte_flip_of_a_blob_is_detected_through_the_store(base: Base,
                                                                 work: Path) -> None:
    """Each byte of one sealed blob flipped in records.db in turn, the store reopened
    (index rebuilt from the rows): the record is excluded and counted, its subject's export
    and verification raise IntegrityError, every other record keeps serving."""
    victim = base.recs[0]
    original = get_row(work, victim.rid)["blob"]
    flips = 0
    for i in range(len(original)):
        set_cols(work, victim.rid, blob=flip(original, i))
        with open_store(base, work) as store:
            stats = store.stats()
            assert (stats.integrity_failures, stats.shredded_rows) == (1, 0), i
            res = search(store, victim.template, "a")
            assert_no_wrong_result(base, store, res, {victim.rid})
            assert_export_raises(store, victim.subject)
            with pytest.raises(bt.IntegrityError):
                store.verify(victim.template, subject_id=victim.subject, purpose="a",
                             actor=ACTOR)
            if i % 16 == 0:  # the full check, at ~10 positions spread over the blob
                assert_serving(base, store, {victim.rid})
                for subject in ("T-1", "T-2"):
                    assert_export_ok(base, store, subject, set())
        flips += 1
    set_cols(work, victim.rid, blob=original)
    with open_store(base, work) as store:
        assert store.stats().integrity_failures == 0
        assert_serving(base, store, set())
        assert store.audit.verify().ok
    print(f"\nDETECTION: store-level single-byte flips of one blob: {flips}/{len(original)} "
          "detected (excluded, counted, export/verify raise IntegrityError)")


@pytest.mark.parametrize("change", [
    "drop_last_byte", "drop_tag", "keep_41_bytes", "keep_40_bytes", "keep_1_byte", "empty",
    "extend_1_byte", "extend_16_bytes", "version_0", "version_2",
])
def test_truncated_extended_or_reversioned_blob(base: Base, work: Path, change: str) -> None:
    victim = base.recs[4]
    blob = get_row(work, victim.rid)["blob"]
    new = {
        "drop_last_byte": blob[:-1], "drop_tag": blob[:-TAG], "keep_41_bytes": blob[:41],
        "keep_40_bytes": blob[:40], "keep_1_byte": blob[:1], "empty": b"",
        "extend_1_byte": blob + b"\x00", "extend_16_bytes": blob + bytes(16),
        "version_0": b"\x00" + blob[1:], "version_2": b"\x02" + blob[1:],
    }[change]
    set_cols(work, victim.rid, blob=new)
    check_detected(base, work, {victim.rid}, export_raises=(victim.subject,))


def test_full_store_flips_at_spread_positions_keep_others_serving(base: Base,
                                                                 work: Path) -> None:
    """20 positions across a blob of another subject (version, nonce, body, tag), each
    with the full check: counted, not served, export raises, all others serve."""
    victim = base.recs[8]
    original = get_row(work, victim.rid)["blob"]
    positions = sorted({round(x) for x in np.linspace(0, len(original) - 1, 20)})
    for i in positions:
        set_cols(work, victim.rid, blob=flip(original, i, 0x01))
        check_detected(base, work, {victim.rid}, export_raises=(victim.subject,))
    print(f"\nDETECTION: full-store bit flips with reopen: {len(positions)}/{len(positions)} "
          "detected")


# --- header fields -----------------------------------------------------------------------


def _other_ref(work: Path, base: Base, subject: str) -> bytes:
    return bytes(get_row(work, base.of(subject)[0].rid)["subject_ref"])


# (name, victim index, edit(work, base, row) -> new columns, outcome, exports that raise)
HEADER_EDITS: list[tuple[str, int, Callable[[Path, Base, dict[str, Any]], dict[str, Any]],
                         str, tuple[str, ...]]] = [
    ("purposes_add", 0, lambda w, b, r: {"purposes": "a,b"}, "integrity", ("T-0",)),
    ("purposes_remove", 3, lambda w, b, r: {"purposes": "a"}, "integrity", ("T-0",)),
    ("purposes_swap", 2, lambda w, b, r: {"purposes": "a"}, "integrity", ("T-0",)),
    ("purposes_empty", 0, lambda w, b, r: {"purposes": ""}, "integrity", ("T-0",)),
    ("expiry_plus_1d", 0, lambda w, b, r: {"expiry_us": r["expiry_us"] + 86_400_000_000},
     "integrity", ("T-0",)),
    ("expiry_minus_1us", 0, lambda w, b, r: {"expiry_us": r["expiry_us"] - 1},
     "integrity", ("T-0",)),
    ("epoch_plus_1", 0, lambda w, b, r: {"epoch": r["epoch"] + 1}, "integrity", ("T-0",)),
    ("epoch_minus_1", 0, lambda w, b, r: {"epoch": r["epoch"] - 1}, "integrity", ("T-0",)),
    ("expiry_and_epoch_plus_1d", 0,
     lambda w, b, r: {"expiry_us": r["expiry_us"] + 86_400_000_000, "epoch": r["epoch"] + 24},
     "integrity", ("T-0",)),
    ("subject_ref_of_another_subject", 0,
     lambda w, b, r: {"subject_ref": _other_ref(w, b, "T-1")}, "integrity", ("T-1",)),
    ("model", 0, lambda w, b, r: {"model": "other-model-v2"}, "integrity", ("T-0",)),
    ("model_empty", 0, lambda w, b, r: {"model": ""}, "integrity", ("T-0",)),
    ("record_id_fresh", 0, lambda w, b, r: {"record_id": os.urandom(16).hex()},
     "integrity", ("T-0",)),
    ("record_id_not_hex", 0, lambda w, b, r: {"record_id": "zz" * 16}, "integrity", ("T-0",)),
    ("record_id_reversed", 1, lambda w, b, r: {"record_id": b.recs[1].rid[::-1]},
     "integrity", ("T-0",)),
    # The epoch is a function of the expiry: any other value is a forgery on its face.
    ("epoch_below_ratchet", 0, lambda w, b, r: {"epoch": r["epoch"] - 1000}, "integrity",
     ("T-0",)),
    # Fields that name key material which does not exist: the row reads as shredded
    # (excluded, counted in stats().shredded_rows), exactly like a row from an old copy
    # whose key was destroyed. Documented, not an IntegrityError.
    ("held_0_to_1_without_hold_key", 0, lambda w, b, r: {"held": 1}, "shredded", ()),
    ("subject_ref_unknown", 0, lambda w, b, r: {"subject_ref": os.urandom(32)}, "shredded",
     ()),
]


@pytest.mark.parametrize(("name", "victim", "edit", "outcome", "raises"), HEADER_EDITS,
                         ids=[e[0] for e in HEADER_EDITS])
def test_header_field_edit(base: Base, work: Path, name: str, victim: int,
                           edit: Callable[[Path, Base, dict[str, Any]], dict[str, Any]],
                           outcome: str, raises: tuple[str, ...]) -> None:
    rec = base.recs[victim]
    row = get_row(work, rec.rid)
    set_cols(work, rec.rid, **edit(work, base, row))
    check_detected(base, work, {rec.rid}, shredded=outcome == "shredded",
                   export_raises=raises)


@pytest.mark.parametrize("case", ["uppercase", "embedded_space"])
def test_record_id_spelling_edit_is_detected(base: Base, work: Path, case: str) -> None:
    """The id column is bound as bytes.fromhex(id): another spelling of the same bytes
    must not pass as the record (it would be served and exported under an id that enroll
    never returned, and that delete() does not know)."""
    rec = base.recs[0]
    spelled = rec.rid.upper() if case == "uppercase" else rec.rid[:16] + " " + rec.rid[16:]
    set_cols(work, rec.rid, record_id=spelled)
    with open_store(base, work) as store:
        ids = {c.record_id for c in search(store, rec.template, "a").candidates}
        try:
            views = store.export_subject(rec.subject, actor=ACTOR)
        except bt.IntegrityError:
            views = []
        served = {v.record_id for v in views} | ids
        stats = store.stats()
    assert spelled not in served, f"row with record_id {spelled!r} was served"
    assert stats.integrity_failures == 1


def test_held_flag_edits_with_a_hold_key_present(base: Base, work: Path) -> None:
    """Under an active hold the hold key exists: flipping held either way is an
    IntegrityError (the row opens under the wrong scope key)."""
    with open_store(base, work) as store:
        assert store.place_hold("T-0", actor=ACTOR, reason="litigation").records == 4
    victim = base.recs[0]
    set_cols(work, victim.rid, held=0)  # claims its epoch key
    check_detected(base, work, {victim.rid}, export_raises=("T-0",))
    set_cols(work, victim.rid, held=1)
    with open_store(base, work) as store:
        assert store.stats().integrity_failures == 0
        assert_export_ok(base, store, "T-0", set())
    # Another subject's row claiming the T-0 hold key: its own hold key does not exist.
    set_cols(work, base.recs[4].rid, held=1, subject_ref=get_row(work, victim.rid)["subject_ref"])
    check_detected(base, work, {base.recs[4].rid}, export_raises=("T-0",))


# --- swaps and replays -------------------------------------------------------------------


@pytest.mark.parametrize("pair", [(0, 1), (0, 4), (3, 7)], ids=["same_subject",
                                                               "different_subjects",
                                                               "different_subjects_ab"])
def test_swapped_blobs(base: Base, work: Path, pair: tuple[int, int]) -> None:
    a, b = (base.recs[i] for i in pair)
    blob_a, blob_b = get_row(work, a.rid)["blob"], get_row(work, b.rid)["blob"]
    set_cols(work, a.rid, blob=blob_b)
    set_cols(work, b.rid, blob=blob_a)
    check_detected(base, work, {a.rid, b.rid}, export_raises=tuple({a.subject, b.subject}))


def test_whole_row_copied_under_another_subject_header(base: Base, work: Path) -> None:
    """A complete authentic row of T-2 presented with T-0's subject_ref fails."""
    src, dst = base.recs[7], base.recs[0]
    set_cols(work, src.rid, subject_ref=get_row(work, dst.rid)["subject_ref"])
    check_detected(base, work, {src.rid}, export_raises=("T-0",))


def test_replay_after_erasure_is_shredded(base: Base, work: Path) -> None:
    saved = [get_row(work, r.rid) for r in base.of("T-1")]
    with open_store(base, work) as store:
        receipt = store.erase_subject("T-1", actor=ACTOR, reason="Art. 17 request")
        assert (receipt.records_erased, receipt.key_destroyed) == (3, True)
    for row in saved:
        insert_row(work, row)
    with open_store(base, work) as store:
        stats = store.stats()
        assert (stats.shredded_rows, stats.integrity_failures) == (3, 0)
        assert stats.records == 10
        for rec in base.of("T-1"):
            for purpose in rec.purposes:
                res = search(store, rec.template, purpose)
                assert "T-1" not in {c.subject_id for c in res.candidates}
                assert_no_wrong_result(base, store, res, {r.rid for r in base.of("T-1")})
        assert store.export_subject("T-1", actor=ACTOR) == []
        with pytest.raises(bt.RecordNotFound):
            store.verify(base.of("T-1")[0].template, subject_id="T-1", purpose="a",
                         actor=ACTOR)
        assert_serving(base, store, {r.rid for r in base.of("T-1")})
        assert store.audit.verify().ok
    print("\nDETECTION: replay of 3 rows after erasure: 3/3 unreadable (shredded)")


def _purge_past_short_record(base: Base, work: Path) -> tuple[Rec, dict[str, Any], Clock]:
    short = base.recs[5]  # T-1, expires START + 2h
    saved = get_row(work, short.rid)
    clock = Clock(START + timedelta(hours=4, minutes=15))
    with open_store(base, work, clock) as store:
        report = store.purge_expired()
        assert report.purged == 1
        assert report.epoch_after > saved["epoch"]
    return short, saved, clock


@pytest.mark.parametrize("variant", ["as_was", "expiry_and_epoch_moved_to_live",
                                     "claims_hold", "as_was_after_second_purge"])
def test_replay_after_purge_advanced_the_epoch(base: Base, work: Path, variant: str) -> None:
    short, saved, clock = _purge_past_short_record(base, work)
    row = dict(saved)
    shredded = True
    if variant == "expiry_and_epoch_moved_to_live":
        row["expiry_us"] += 86_400_000_000
        row["epoch"] += 24
        shredded = False  # the epoch key exists now, so the row is authenticated and fails
    elif variant == "claims_hold":
        row["held"] = 1
    elif variant == "as_was_after_second_purge":
        clock.now += timedelta(hours=3)
        with open_store(base, work, clock) as store:
            store.purge_expired()
    insert_row(work, row)
    with open_store(base, work, clock) as store:
        stats = store.stats()
        if shredded:
            assert (stats.shredded_rows, stats.integrity_failures) == (1, 0)
        else:
            assert (stats.integrity_failures, stats.shredded_rows) == (1, 0)
        for purpose in short.purposes:
            res = search(store, short.template, purpose)
            assert short.rid not in {c.record_id for c in res.candidates}
            assert_no_wrong_result(base, store, res, {short.rid})
        if shredded:
            assert short.rid not in {v.record_id for v in store.export_subject("T-1",
                                                                               actor=ACTOR)}
        else:
            assert_export_raises(store, "T-1")
        assert store.audit.verify().ok


def test_replayed_pre_hold_row_does_not_escape_the_hold(base: Base, work: Path) -> None:
    """place_hold reseals the subject's rows under its hold key (held=1). Putting back a
    row's pre-hold version (authentic blob, held=0) must not take the record out of the
    hold: it must be detected, or the record must still survive purges and stay
    exportable while the subject is held (README.md, legal hold; SECURITY.md: a tamperer
    replaying old blobs does not get a changed result)."""
    victim = base.recs[0]
    before = get_row(work, victim.rid)
    with open_store(base, work) as store:
        assert store.place_hold("T-0", actor=ACTOR, reason="litigation").records == 4
    assert get_row(work, victim.rid)["held"] == 1
    set_cols(work, victim.rid, blob=before["blob"], held=0)  # the pre-hold row, replayed
    clock = Clock(START + timedelta(days=3))  # every T-0 record has expired
    with open_store(base, work, clock) as store:
        detected = store.stats().integrity_failures > 0
        store.purge_expired()
        try:
            exported = {v.record_id for v in store.export_subject("T-0", actor=ACTOR)}
        except bt.IntegrityError:
            detected = True
            exported = set()
    assert detected or victim.rid in exported, (
        "a replayed pre-hold row was accepted and purged while its subject is under hold")


def test_replayed_older_policy_is_detected(base: Base, work: Path) -> None:
    """The sealed policy row's associated data is only b"meta:policy:" + store id, so an
    older authentic policy blob can be put back after set_policy. The store must not open
    silently under the superseded (here: looser) policy."""
    old_blob = sql(work, "SELECT value FROM meta WHERE key = 'policy'")[0][0]
    stricter = {**POLICY, "purposes": {**POLICY["purposes"], "b": {
        **POLICY["purposes"]["b"], "modes": ["identification"], "match_threshold": 0.9}}}
    with open_store(base, work) as store:
        store.set_policy(bt.RetentionPolicy.from_dict(stricter), actor=ACTOR,
                         reason="investigation mode withdrawn for b")
    sql(work, "UPDATE meta SET value = ? WHERE key = 'policy'", (old_blob,))
    try:
        store = open_store(base, work)
    except bt.IntegrityError:
        return
    with store:
        in_force = store.policy
    assert in_force == bt.RetentionPolicy.from_dict(stricter), (
        "an older sealed policy was replayed and is silently in force")


# --- keyring -----------------------------------------------------------------------------


def _classify(data: bytes, base: Base) -> type[BaseException] | None:
    try:
        Keyring.from_bytes(data, base.keys.master_key())
    except (bt.KeyUnavailable, bt.IntegrityError) as exc:
        return type(exc)
    return None


def test_keyring_every_byte_flip(base: Base) -> None:
    """Every byte of the keyring file flipped: header (magic, version) and body flips are
    IntegrityError; store-id and key-check flips make the key check fail, so they read as
    KeyUnavailable (the check cannot tell a wrong key from a damaged check/header)."""
    data = (base.folder / "keyring").read_bytes()
    regions = {"magic+version": range(0, 5), "store_id": range(5, KEYRING_HEAD),
               "check": range(KEYRING_HEAD, KEYRING_HEAD + KEYRING_CHECK),
               "body": range(KEYRING_HEAD + KEYRING_CHECK, len(data))}
    summary = []
    for region, positions in regions.items():
        seen: dict[str, int] = {}
        for i in positions:
            for mask in (0x01, 0x80, 0xFF):
                kind = _classify(flip(data, i, mask), base)
                assert kind is not None, f"flip at keyring byte {i} ({region}) accepted"
                seen[kind.__name__] = seen.get(kind.__name__, 0) + 1
        summary.append(f"{region} {dict(sorted(seen.items()))}")
        if region in ("magic+version", "body"):
            assert set(seen) == {"IntegrityError"}, region
        else:
            assert set(seen) <= {"KeyUnavailable", "IntegrityError"}, region
    print(f"\nDETECTION: keyring flips ({len(data)} bytes x 3 masks): " + "; ".join(summary))


@pytest.mark.parametrize("where", ["body_first", "body_middle", "body_last"])
def test_keyring_body_flip_fails_open(base: Base, work: Path, where: str) -> None:
    path = work / "keyring"
    data = path.read_bytes()
    body = KEYRING_HEAD + KEYRING_CHECK
    i = {"body_first": body, "body_middle": (body + len(data)) // 2,
         "body_last": len(data) - 1}[where]
    path.write_bytes(flip(data, i))
    with pytest.raises(bt.IntegrityError):
        open_store(base, work)


@pytest.mark.parametrize("offset", [0, 20, KEYRING_CHECK - 1])
def test_keyring_check_flip_fails_open_as_key_unavailable(base: Base, work: Path,
                                                         offset: int) -> None:
    """Documented: a damaged key check reads as a wrong master key (KeyUnavailable)."""
    path = work / "keyring"
    path.write_bytes(flip(path.read_bytes(), KEYRING_HEAD + offset))
    with pytest.raises(bt.KeyUnavailable):
        open_store(base, work)


@pytest.mark.parametrize("length", [0, 4, KEYRING_HEAD, KEYRING_HEAD + KEYRING_CHECK,
                                    KEYRING_HEAD + KEYRING_CHECK + 41, -1, -TAG, "plus_1"])
def test_keyring_truncated_or_extended_fails_open(base: Base, work: Path,
                                                  length: int | str) -> None:
    path = work / "keyring"
    data = path.read_bytes()
    path.write_bytes(data + b"\x00" if length == "plus_1" else data[:length])
    with pytest.raises(bt.IntegrityError):
        open_store(base, work)


def test_wrong_master_key_is_key_unavailable(base: Base, work: Path) -> None:
    other = bt.FileKeyProvider.generate(work.parent / "other.key")
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(work, key_provider=other, clock=Clock())


def test_keyring_of_another_store_fails_open(base: Base, work: Path) -> None:
    """Same master key, another store's keyring dropped in: IntegrityError, not a store
    silently opened with the wrong keys."""
    other = work.parent / "other"
    bt.TemplateStore.create(other, dim=DIM, model=MODEL,
                            policy=bt.RetentionPolicy.from_dict(POLICY), key_provider=base.keys,
                            clock=Clock(), snapshot_on_close=False).close()
    shutil.copy(other / "keyring", work / "keyring")
    with pytest.raises(bt.IntegrityError):
        open_store(base, work)


# --- sealed meta rows (config, policy) ---------------------------------------------------


@pytest.mark.parametrize("edit", ["flip_policy", "flip_config", "swap_policy_config",
                                  "delete_policy", "delete_config", "truncate_policy",
                                  "change_store_id"])
def test_meta_edit_fails_open(base: Base, work: Path, edit: str) -> None:
    meta = dict(sql(work, "SELECT key, value FROM meta"))
    if edit == "flip_policy":
        sql(work, "UPDATE meta SET value = ? WHERE key = 'policy'",
            (flip(meta["policy"], len(meta["policy"]) // 2),))
    elif edit == "flip_config":
        sql(work, "UPDATE meta SET value = ? WHERE key = 'config'",
            (flip(meta["config"], 30),))
    elif edit == "swap_policy_config":
        sql(work, "UPDATE meta SET value = ? WHERE key = 'policy'", (meta["config"],))
        sql(work, "UPDATE meta SET value = ? WHERE key = 'config'", (meta["policy"],))
    elif edit.startswith("delete_"):
        sql(work, "DELETE FROM meta WHERE key = ?", (edit.removeprefix("delete_"),))
    elif edit == "truncate_policy":
        sql(work, "UPDATE meta SET value = ? WHERE key = 'policy'", (meta["policy"][:-1],))
    else:
        sql(work, "UPDATE meta SET value = ? WHERE key = 'store_id'",
            (flip(meta["store_id"], 0),))
    with pytest.raises(bt.IntegrityError):
        open_store(base, work)


# --- audit trail -------------------------------------------------------------------------


def _audit_rows(work: Path) -> list[tuple[int, bytes, bytes]]:
    return sql(work, "SELECT seq, body, hash FROM entries ORDER BY seq", name="audit.db")


def _drop_audit_triggers(work: Path) -> None:
    for trigger in ("entries_no_update", "entries_no_delete"):
        sql(work, f"DROP TRIGGER {trigger}", name="audit.db")


@pytest.mark.parametrize("how", ["flip_body", "flip_body_and_rehash", "delete_entry",
                                 "swap_bodies"])
def test_audit_entry_edit_is_reported(base: Base, work: Path, how: str) -> None:
    rows = _audit_rows(work)
    seq, body, _ = rows[len(rows) // 2]
    _drop_audit_triggers(work)  # append-only triggers stop honest mistakes, not attackers
    if how == "flip_body":
        sql(work, "UPDATE entries SET body = ? WHERE seq = ?", (flip(body, len(body) - 3), seq),
            name="audit.db")
    elif how == "flip_body_and_rehash":
        new = flip(body, len(body) - 3)
        digest = hashlib.sha256(b"biotemplate-audit-v1\x00" + new).digest()
        sql(work, "UPDATE entries SET body = ?, hash = ? WHERE seq = ?", (new, digest, seq),
            name="audit.db")
    elif how == "delete_entry":
        sql(work, "DELETE FROM entries WHERE seq = ?", (seq,), name="audit.db")
    else:
        seq2, body2, _ = rows[len(rows) // 2 + 1]
        sql(work, "UPDATE entries SET body = ? WHERE seq = ?", (body2, seq), name="audit.db")
        sql(work, "UPDATE entries SET body = ? WHERE seq = ?", (body, seq2), name="audit.db")
    with open_store(base, work) as store:  # open checks only the last entry
        report = store.audit.verify()
        assert report.ok is False
        assert report.problems
        assert_serving(base, store, set())  # the records themselves are untouched


def test_audit_last_entry_edit_fails_open(base: Base, work: Path) -> None:
    seq, body, _ = _audit_rows(work)[-1]
    _drop_audit_triggers(work)
    sql(work, "UPDATE entries SET body = ? WHERE seq = ?", (flip(body, 10), seq),
        name="audit.db")
    with pytest.raises(bt.IntegrityError):
        open_store(base, work)


# --- the snapshot path (documented limit: unchanged header + tag are trusted) -----------


def _with_snapshot(base: Base, work: Path) -> None:
    open_store(base, work, snapshot_on_close=True).close()
    assert (work / "index.snapshot").exists()


@pytest.mark.parametrize("where", ["version", "nonce", "ciphertext", "tag_first", "tag_last"])
def test_blob_flip_with_snapshot_never_serves_wrong_data(base: Base, work: Path,
                                                         where: str) -> None:
    """With a valid snapshot, a flip outside the AEAD tag is not seen at open (the row's
    fingerprint covers header + tag only): search may keep serving the *authentic* vector
    from the sealed snapshot. Export and verify decrypt the row and raise; a rebuild
    excludes and counts it. A flip inside the tag is caught at open."""
    _with_snapshot(base, work)
    victim = base.recs[0]
    blob = get_row(work, victim.rid)["blob"]
    i = {"version": 0, "nonce": 10, "ciphertext": 40, "tag_first": len(blob) - TAG,
         "tag_last": len(blob) - 1}[where]
    set_cols(work, victim.rid, blob=flip(blob, i))
    with open_store(base, work, snapshot_on_close=True) as store:
        at_open = store.stats().integrity_failures
        if where.startswith("tag"):
            assert at_open == 1
        served = {c.record_id for c in search(store, victim.template, "a").candidates}
        if victim.rid in served:  # only ever with its authentic subject and template
            res = search(store, victim.template, "a")
            assert (res.candidates[0].record_id, res.candidates[0].subject_id) == (
                victim.rid, victim.subject)
            assert res.candidates[0].score == pytest.approx(1.0, abs=1e-5)
        assert_export_raises(store, victim.subject)
        with pytest.raises(bt.IntegrityError):
            store.verify(victim.template, subject_id=victim.subject, purpose="a", actor=ACTOR)
        store.rebuild_index()
        assert store.stats().integrity_failures == 1
        assert_serving(base, store, {victim.rid})
    print(f"\nDETECTION: snapshot path, flip in {where}: "
          f"{'detected at open' if at_open else 'detected on decrypt/rebuild only'}")


@pytest.mark.parametrize("edit", ["purposes", "expiry", "subject_ref"])
def test_header_edit_with_snapshot_is_caught_at_open(base: Base, work: Path, edit: str) -> None:
    _with_snapshot(base, work)
    victim = base.recs[0]
    row = get_row(work, victim.rid)
    cols = {"purposes": {"purposes": "a,b"},
            "expiry": {"expiry_us": row["expiry_us"] + 86_400_000_000},
            "subject_ref": {"subject_ref": get_row(work, base.recs[4].rid)["subject_ref"]},
            }[edit]
    set_cols(work, victim.rid, **cols)
    with open_store(base, work) as store:
        assert store.stats().integrity_failures == 1
        assert_serving(base, store, {victim.rid})


@pytest.mark.parametrize("where", [0, 6, 20, "middle", "last"])
def test_tampered_snapshot_file_falls_back_to_rebuild(base: Base, work: Path,
                                                      where: int | str) -> None:
    _with_snapshot(base, work)
    path = work / "index.snapshot"
    data = path.read_bytes()
    i = len(data) // 2 if where == "middle" else len(data) - 1 if where == "last" else where
    path.write_bytes(flip(data, int(i)))
    with open_store(base, work) as store:
        stats = store.stats()
        assert (stats.integrity_failures, stats.shredded_rows) == (0, 0)
        assert_serving(base, store, set())
        assert store.audit.verify().ok
