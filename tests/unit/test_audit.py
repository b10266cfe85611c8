"""Unit tests of the audit trail: chain, signatures, checkpoints, durability, fail-closed."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from biotemplate.audit import AuditTrail, Checkpoint, verify_audit
from biotemplate.errors import (
    AuditError,
    IntegrityError,
    InvalidInput,
    RecordNotFound,
    StoreExists,
    StoreNotFound,
)

STORE = b"\x01" * 16
SEED = bytes(range(32))
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def keypair(seed: bytes = SEED) -> tuple[Callable[[bytes], bytes], Callable[[bytes, bytes], bool]]:
    sk = SigningKey(seed)

    def sign(message: bytes) -> bytes:
        return sk.sign(message).signature

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            sk.verify_key.verify(message, signature)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True

    return sign, verify


class Clock:
    """A fixed time that tests move by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def make(path: Path, *, create: bool = True, clock: Callable[[], datetime] | None = None,
         signer: Callable[[bytes], bytes] | None = None, store: bytes = STORE) -> AuditTrail:
    sign, verify = keypair()
    factory = AuditTrail.create if create else AuditTrail.open
    return factory(path, store_id=store, signer=signer or sign, verifier=verify,
                   clock=clock or Clock())


@pytest.fixture
def trail(path: Path) -> Iterator[AuditTrail]:
    t = make(path)
    yield t
    t.close()


def fill(trail: AuditTrail, n: int) -> None:
    for i in range(n):
        trail.append("enroll", actor="svc", record_ids=[f"r{i}"], purpose="watchlist")


def tamper(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    """What an attacker with write access does: drop the guards, then edit."""
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER IF EXISTS entries_no_update;"
                       "DROP TRIGGER IF EXISTS entries_no_delete;")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def row(path: Path, seq: int) -> tuple[bytes, bytes, bytes]:
    conn = sqlite3.connect(path)
    body, digest, sig = conn.execute("SELECT body, hash, sig FROM entries WHERE seq = ?",
                                     (seq,)).fetchone()
    conn.close()
    return body, digest, sig


# --- basic use ----------------------------------------------------------------------------


def test_create_writes_a_genesis_entry(trail: AuditTrail) -> None:
    genesis = trail.last()
    assert genesis is not None
    assert (genesis.seq, genesis.event, genesis.actor, genesis.outcome) == (1, "create", None, "ok")
    assert genesis.ts_start == genesis.ts_end == T0
    assert genesis.ts_start.utcoffset() == timedelta(0)
    assert dict(genesis.fields) == {}


def test_create_refuses_an_existing_file_and_open_a_missing_one(path: Path,
                                                                trail: AuditTrail) -> None:
    with pytest.raises(StoreExists):
        make(path)
    with pytest.raises(StoreNotFound):
        make(path.with_name("other.db"), create=False)


def test_append_get_last_find(path: Path) -> None:
    clock = Clock()
    trail = make(path, clock=clock)
    clock.now = T0 + timedelta(seconds=5)
    seq = trail.append("search", actor="analyst-17", durable=False, started=T0,
                       purpose="watchlist", probe_digest=b"\xaa" * 32, mode="identification",
                       threshold=0.55, count=2, record_ids=("r1", "r2"), reason="case 118")
    c1 = trail.append("confirm", actor="officer-2", ref_seq=seq, reviewer="officer-2",
                      record_id="r1")
    c2 = trail.append("confirm", actor="officer-3", ref_seq=seq, reviewer="officer-3",
                      record_id="r1")
    trail.append("export", actor="dpo", ref_seq=seq)

    entry = trail.get(seq)
    assert (entry.seq, entry.event, entry.actor) == (2, "search", "analyst-17")
    assert (entry.ts_start, entry.ts_end) == (T0, T0 + timedelta(seconds=5))
    assert entry.fields["probe_digest"] == b"\xaa" * 32
    assert entry.fields["record_ids"] == ["r1", "r2"]  # tuples come back as lists
    assert entry.fields["threshold"] == 0.55
    with pytest.raises(TypeError):
        entry.fields["count"] = 3  # type: ignore[index]

    confirms = trail.find("confirm", seq)
    assert [e.seq for e in confirms] == [c1, c2]
    assert {e.fields["reviewer"] for e in confirms} == {"officer-2", "officer-3"}
    assert trail.find("confirm", 1) == []
    last = trail.last()
    assert last is not None and last.event == "export"
    with pytest.raises(RecordNotFound):
        trail.get(99)
    trail.close()


def test_ref_seq_must_be_an_int(trail: AuditTrail) -> None:
    for bad in ("2", 1.0, True, 1 << 63, [1]):
        with pytest.raises(InvalidInput):
            trail.append("confirm", actor="x", ref_seq=bad)
    assert trail.verify().entries == 1
    # a refused confirmation of a search that does not exist is still audited
    seq = trail.append("confirm", actor="x", outcome="refused", ref_seq=10**9)
    assert [e.seq for e in trail.find("confirm", 10**9)] == [seq]
    assert trail.verify().ok is True


@pytest.mark.parametrize("kwargs", [
    {"event": "Search"}, {"event": ""}, {"event": "a b"}, {"outcome": "maybe"},
    {"actor": 7}, {"actor": "x" * 300},
])
def test_bad_arguments_are_refused(trail: AuditTrail, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"event": "search", "actor": "a", **kwargs}
    event = args.pop("event")
    with pytest.raises(InvalidInput):
        trail.append(event, **args)  # type: ignore[arg-type]
    assert trail.verify().entries == 1


def test_field_order_does_not_change_the_body(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a.db"), make(tmp_path / "b.db")
    a.append("search", actor="x", purpose="p", count=1, extra={"z": 1, "a": 2})
    b.append("search", actor="x", extra={"a": 2, "z": 1}, count=1, purpose="p")
    a.close()
    b.close()
    assert row(tmp_path / "a.db", 2) == row(tmp_path / "b.db", 2)


# --- verification and tampering -----------------------------------------------------------


def test_verify_a_clean_chain(trail: AuditTrail) -> None:
    fill(trail, 10)
    report = trail.verify()
    assert report.ok is True and report.problems == ()
    assert type(report.entries) is int and report.entries == 11


def test_the_table_refuses_updates_and_deletes(path: Path, trail: AuditTrail) -> None:
    conn = sqlite3.connect(path)
    for sql in ("UPDATE entries SET sig = x'00' WHERE seq = 1", "DELETE FROM entries"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    conn.close()


def flip(data: bytes, i: int = -1) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def swap_bodies(path: Path, a: int, b: int) -> None:
    body_a, body_b = row(path, a)[0], row(path, b)[0]
    tamper(path, "UPDATE entries SET body = ? WHERE seq = ?", (body_b, a))
    tamper(path, "UPDATE entries SET body = ? WHERE seq = ?", (body_a, b))


TAMPERING: list[tuple[str, Callable[[Path], None], str]] = [
    ("body byte", lambda p: tamper(p, "UPDATE entries SET body = ? WHERE seq = 4",
                                   (flip(row(p, 4)[0]),)), "seq 4: hash mismatch"),
    ("swap bodies", lambda p: swap_bodies(p, 4, 5), "seq 4: body seq mismatch"),
    ("delete middle", lambda p: tamper(p, "DELETE FROM entries WHERE seq = 4"),
     "gap after seq 3"),
    ("hash", lambda p: tamper(p, "UPDATE entries SET hash = ? WHERE seq = 4",
                              (flip(row(p, 4)[1]),)), "seq 4: hash mismatch"),
    ("signature", lambda p: tamper(p, "UPDATE entries SET sig = ? WHERE seq = 4",
                                   (flip(row(p, 4)[2]),)), "seq 4: signature invalid"),
    ("ref_seq column", lambda p: tamper(p, "UPDATE entries SET ref_seq = 2 WHERE seq = 4"),
     "seq 4: ref_seq column mismatch"),
    ("body not a blob", lambda p: tamper(p, "UPDATE entries SET body = 'x' WHERE seq = 4"),
     "seq 4: body unreadable"),
]


@pytest.mark.parametrize(("name", "attack", "expected"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_reported(path: Path, trail: AuditTrail, name: str,
                               attack: Callable[[Path], None], expected: str) -> None:
    fill(trail, 6)
    attack(path)
    report = trail.verify()
    assert report.ok is False
    assert expected in report.problems, report.problems
    if name != "delete middle":
        with pytest.raises(IntegrityError):
            trail.get(4)


def test_swapped_bodies_break_the_chain(path: Path, trail: AuditTrail) -> None:
    fill(trail, 6)
    swap_bodies(path, 4, 5)
    problems = trail.verify().problems
    assert "seq 5: chain broken" in problems and "seq 6: chain broken" in problems


def test_a_rewritten_entry_with_a_consistent_hash_fails_its_signature(
        path: Path, trail: AuditTrail) -> None:
    import hashlib

    fill(trail, 3)
    body = flip(row(path, 3)[0])
    digest = hashlib.sha256(b"biotemplate-audit-v1\x00" + body).digest()
    tamper(path, "UPDATE entries SET body = ?, hash = ? WHERE seq = 3", (body, digest))
    problems = trail.verify().problems
    assert "seq 3: signature invalid" in problems
    assert "seq 3: hash mismatch" not in problems


def test_another_key_signs_nothing_valid(path: Path, trail: AuditTrail) -> None:
    fill(trail, 2)
    trail.close()
    sign, _ = keypair()
    _, other = keypair(b"\x07" * 32)
    with pytest.raises(IntegrityError):
        AuditTrail.open(path, store_id=STORE, signer=sign, verifier=other, clock=Clock())


def test_open_refuses_a_forged_head_or_another_store(path: Path, trail: AuditTrail) -> None:
    fill(trail, 2)
    trail.close()
    with pytest.raises(IntegrityError):
        make(path, create=False, store=b"\x02" * 16)
    tamper(path, "UPDATE entries SET sig = ? WHERE seq = 3", (flip(row(path, 3)[2]),))
    with pytest.raises(IntegrityError):
        make(path, create=False)


def test_an_unreadable_file(path: Path, trail: AuditTrail, tmp_path: Path) -> None:
    trail.close()
    reopened = make(path, create=False)
    path.write_bytes(b"\x00garbage" * 1024)
    report = reopened.verify()
    assert report.ok is False and "audit database unreadable" in report.problems
    reopened.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AuditError):
        make(junk, create=False)


# --- truncation, old files, checkpoints -----------------------------------------------------


def test_truncation_is_seen_only_with_a_checkpoint(path: Path, trail: AuditTrail) -> None:
    fill(trail, 5)
    cp = trail.checkpoint()
    trail.close()
    tamper(path, "DELETE FROM entries WHERE seq > 4")
    reopened = make(path, create=False)
    assert reopened.verify().ok is True  # a chain alone cannot tell
    report = reopened.verify(cp)
    assert report.ok is False
    assert report.problems == (
        "trail ends at seq 4, before checkpoint seq 6: truncated or an old file restored",)
    reopened.close()


def test_a_running_trail_sees_its_own_truncation(path: Path, trail: AuditTrail) -> None:
    fill(trail, 5)
    tamper(path, "DELETE FROM entries WHERE seq > 4")
    report = trail.verify()
    assert report.ok is False
    assert "trail ends at seq 4, but this process wrote seq 6: truncated" in report.problems


def test_an_old_file_restored(path: Path, tmp_path: Path) -> None:
    trail = make(path)
    fill(trail, 2)  # 3 entries with the genesis
    trail.close()
    backup = tmp_path / "backup.db"
    shutil.copyfile(path, backup)
    trail = make(path, create=False)
    fill(trail, 3)
    cp = trail.checkpoint()
    assert cp.seq == 6
    trail.close()

    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(backup, path)
    restored = make(path, create=False)
    assert restored.verify().ok is True
    assert restored.verify(cp).problems == (
        "trail ends at seq 3, before checkpoint seq 6: truncated or an old file restored",)
    for _ in range(4):  # the restored trail grows past the checkpoint: still caught
        restored.append("search", actor="someone-else", durable=False)
    assert restored.verify(cp).problems == ("entry 6 differs from checkpoint: rewritten",)
    restored.close()


def test_checkpoint_is_exact_and_appends_nothing(trail: AuditTrail) -> None:
    fill(trail, 3)
    cp = trail.checkpoint()
    last = trail.last()
    assert last is not None and cp.seq == last.seq == 4 and cp.store_id == STORE
    assert cp.ts == T0 and len(cp.head) == 32 and len(cp.signature) == 64
    assert trail.verify(cp).ok is True
    fill(trail, 2)
    assert trail.verify(cp).ok is True  # growth after a checkpoint is normal


def test_checkpoint_round_trips(trail: AuditTrail) -> None:
    cp = trail.checkpoint()
    assert Checkpoint.from_bytes(cp.to_bytes()) == cp
    assert Checkpoint.from_json(cp.to_json()) == cp
    assert cp.to_bytes() == Checkpoint.from_bytes(cp.to_bytes()).to_bytes()
    assert cp.head.hex() in cp.to_json()


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\x93\x01\x02\x03", b"\x80", b"x" * 5000,
    b"\x86\xa1v\x01\xa5store\xc4\x00\xa3seq\x01\xa4head\xc4\x00\xa2ts\x00\xa3sig\xc4\x00",
])
def test_malformed_checkpoint_bytes(trail: AuditTrail, data: bytes) -> None:
    with pytest.raises(IntegrityError):
        Checkpoint.from_bytes(data)
    cp = trail.checkpoint().to_bytes()
    for cut in (1, len(cp) // 2, len(cp) - 1):
        with pytest.raises(IntegrityError):
            Checkpoint.from_bytes(cp[:cut])


@pytest.mark.parametrize("text", [
    "", "[]", "{}", "null", '{"v": 1}', "[" * 100000,
    '{"v":1,"store_id":"zz","seq":1,"head":"00","ts":"2025-01-01T00:00:00+00:00",'
    '"signature":"00"}',
])
def test_malformed_checkpoint_json(text: str) -> None:
    with pytest.raises(IntegrityError):
        Checkpoint.from_json(text)


def test_naive_checkpoint_time_in_json(trail: AuditTrail) -> None:
    text = trail.checkpoint().to_json().replace("+00:00", "")
    with pytest.raises(IntegrityError):
        Checkpoint.from_json(text)


def test_forged_checkpoints_are_reported(trail: AuditTrail) -> None:
    fill(trail, 3)
    cp = trail.checkpoint()
    forged = [
        dataclasses.replace(cp, signature=flip(cp.signature)),
        dataclasses.replace(cp, seq=cp.seq - 1),  # moved back to hide later entries
        dataclasses.replace(cp, head=flip(cp.head)),
        dataclasses.replace(cp, ts=cp.ts + timedelta(days=1)),
    ]
    for bad in forged:
        assert trail.verify(bad).problems == ("checkpoint signature invalid",)
    other = dataclasses.replace(cp, store_id=b"\x02" * 16)
    assert trail.verify(other).problems == ("checkpoint is for another store",)


# --- failing closed ------------------------------------------------------------------------


def test_a_failing_signer_fails_closed(path: Path) -> None:
    sign, _ = keypair()
    broken = {"on": False}

    def signer(message: bytes) -> bytes:
        if broken["on"]:
            raise RuntimeError("HSM unavailable")
        return sign(message)

    trail = make(path, signer=signer)
    fill(trail, 2)
    broken["on"] = True
    with pytest.raises(AuditError):
        trail.append("delete", actor="a")
    with pytest.raises(AuditError):
        trail.checkpoint()
    broken["on"] = False
    assert trail.append("delete", actor="a") == 4  # the head did not move
    assert trail.verify().ok is True
    trail.close()


def test_a_malformed_signature_fails_closed(path: Path) -> None:
    make(path).close()
    short = make(path, create=False, signer=lambda m: b"\x00" * 63)
    with pytest.raises(AuditError):
        short.append("search", actor="a")
    assert short.verify().entries == 1
    short.close()


def test_a_failing_write_fails_closed(path: Path, trail: AuditTrail) -> None:
    fill(trail, 2)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TRIGGER boom BEFORE INSERT ON entries "
                 "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    conn.commit()
    with pytest.raises(AuditError):
        trail.append("enroll", actor="a", record_ids=["x"])
    with pytest.raises(AuditError):
        trail.append("search", actor="a", durable=False)
    conn.execute("DROP TRIGGER boom")
    conn.commit()
    conn.close()
    assert trail.append("enroll", actor="a") == 4  # no partial entry, head unchanged
    report = trail.verify()
    assert report.ok is True and report.entries == 4


def test_a_closed_trail_refuses_everything(trail: AuditTrail) -> None:
    trail.close()
    trail.close()  # idempotent
    for call in (lambda: trail.append("search", actor="a"), trail.verify, trail.checkpoint,
                 trail.sync, lambda: trail.get(1)):
        with pytest.raises(AuditError):
            call()


@pytest.mark.parametrize("value", [
    object(), {1, 2}, datetime.now(UTC), {1: "int key"}, 1 << 64, -(1 << 63) - 1,
    bytearray(b"x"), [[[[[[[[[[[1]]]]]]]]]]],
])
def test_non_primitive_fields_are_refused(trail: AuditTrail, value: object) -> None:
    with pytest.raises(InvalidInput) as info:
        trail.append("search", actor="a", probe=value)
    assert "probe" in str(info.value)
    with pytest.raises(InvalidInput):  # caught when encoding: not UTF-8
        trail.append("search", actor="a", probe="\ud800")
    assert trail.verify().entries == 1


def test_a_template_cannot_be_written(trail: AuditTrail) -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(InvalidInput) as info:
        trail.append("enroll", actor="a", template=np.ones(512, dtype=np.float32))
    assert "ndarray" in str(info.value) and "1.0" not in str(info.value)


def test_naive_times_are_refused(path: Path, tmp_path: Path) -> None:
    naive = Clock(datetime(2025, 3, 1, 12, 0))
    with pytest.raises(InvalidInput):
        make(path, clock=naive)
    assert not path.exists()  # create is all or nothing
    clock = Clock()
    trail = make(path, clock=clock)
    with pytest.raises(InvalidInput):
        trail.append("search", actor="a", started=datetime(2025, 3, 1))
    clock.now = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(InvalidInput):
        trail.append("search", actor="a")
    with pytest.raises(InvalidInput):
        trail.checkpoint()
    clock.now = T0
    assert trail.append("search", actor="a") == 2
    trail.close()


def test_other_timezones_are_stored_as_utc(path: Path) -> None:
    from datetime import timezone

    cet = T0.astimezone(timezone(timedelta(hours=1)))
    trail = make(path, clock=Clock(cet))
    entry = trail.last()
    assert entry is not None and entry.ts_end == T0 and entry.ts_end.tzinfo == UTC
    trail.close()


# --- durability and concurrency ------------------------------------------------------------


def test_durable_and_non_durable_entries_persist(path: Path) -> None:
    trail = make(path)
    for i in range(150):  # crosses the 64-entry group commit twice
        trail.append("search", actor="a", durable=False, count=i)
    trail.append("delete", actor="a", record_ids=["r"])
    trail.append("search", actor="a", durable=False)
    trail.sync()
    trail.append("search", actor="a", durable=False)
    trail.close()
    reopened = make(path, create=False)
    last = reopened.last()
    assert last is not None and last.seq == 154
    assert reopened.get(100).fields["count"] == 98
    assert reopened.verify().ok is True
    assert reopened.append("enroll", actor="a") == 155
    reopened.close()


CHILD = """
import os, sys
from datetime import UTC, datetime
from pathlib import Path
from nacl.signing import SigningKey
from biotemplate.audit import AuditTrail
sk = SigningKey(bytes(range(32)))
t = AuditTrail.create(Path(sys.argv[1]), store_id=b"\\x01" * 16,
                      signer=lambda m: sk.sign(m).signature, verifier=lambda m, s: True,
                      clock=lambda: datetime(2025, 3, 1, tzinfo=UTC))
for i in range(10):
    t.append("search", actor="a", durable=False, count=i)
os._exit(0)  # a crash: no close, no sync
"""


def test_non_durable_entries_survive_a_process_crash(path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, cwd=root, timeout=60)
    trail = make(path, create=False)
    assert trail.verify().entries == 11
    assert trail.verify().ok is True
    trail.close()


def test_appends_from_many_threads(trail: AuditTrail) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                trail.append("search", actor=f"t{n}", durable=i % 10 == 0, i=i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    report = trail.verify()  # concurrently with the appends: a consistent snapshot
    assert report.ok is True, report.problems
    for t in threads:
        t.join()
    assert errors == []
    report = trail.verify()
    assert report.ok is True and report.entries == 401
    last = trail.last()
    assert last is not None and last.seq == 401


# --- background group commit of search entries -------------------------------------------


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[str]:
    import biotemplate.audit as audit_module

    calls: list[str] = []
    real = audit_module._fsync

    def spy(target: Path) -> None:
        calls.append(Path(target).name)
        if fail and threading.current_thread().name == "biotemplate-audit-sync":
            raise OSError("disk gone")
        real(target)

    monkeypatch.setattr(audit_module, "_fsync", spy)
    return calls


def _syncers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "biotemplate-audit-sync"]


def test_search_entries_are_fsynced_in_the_background_within_the_window(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import biotemplate.audit as audit_module

    before = len(_syncers())
    trail = make(path)
    assert len(_syncers()) == before  # durable entries never start the thread
    calls = _count_fsyncs(monkeypatch)
    for i in range(10):
        trail.append("search", actor="a", durable=False, count=i)
    assert calls == []  # the callers did not wait for the disk
    deadline = time.monotonic() + 20 * audit_module.SYNC_WINDOW + 2
    while "audit.db-wal" not in calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "audit.db-wal" in calls
    assert len(_syncers()) == before + 1
    trail.close()
    assert len(_syncers()) == before  # close stops and joins it
    assert make(path, create=False).last().seq == 11  # type: ignore[union-attr]


def test_a_failed_background_fsync_fails_the_trail_closed(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    trail = make(path)
    _count_fsyncs(monkeypatch, fail=True)
    trail.append("search", actor="a", durable=False)
    deadline = time.monotonic() + 5
    while not trail._sync_failed and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AuditError):
        trail.append("search", actor="a", durable=False)
    with pytest.raises(AuditError):
        trail.append("delete", actor="a")
    monkeypatch.undo()
    trail.close()


def test_close_right_after_a_search_entry_does_not_wait_for_the_window(path: Path) -> None:
    import time

    trail = make(path)
    trail.append("search", actor="a", durable=False)
    t0 = time.monotonic()
    trail.close()
    assert time.monotonic() - t0 < 5  # a stop event, not a sleep: no hang
    assert make(path, create=False).last().seq == 2  # type: ignore[union-attr]


# --- the public key, and verification without the master key -------------------------------


PUBLIC = SigningKey(SEED).verify_key.encode()


def make_keyed(path: Path, *, create: bool = True, read_only: bool = False,
               store: bytes = STORE, seed: bytes = SEED) -> AuditTrail:
    """A trail that publishes its public key (as every store's trail does)."""
    sign, verify = keypair(seed)
    public = SigningKey(seed).verify_key.encode()
    if create:
        return AuditTrail.create(path, store_id=store, signer=sign, verifier=verify,
                                 clock=Clock(), public_key=public)
    return AuditTrail.open(path, store_id=store, signer=sign, verifier=verify, clock=Clock(),
                           public_key=public, read_only=read_only)


def meta(path: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(path)
    found = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    conn.close()
    return found


def tamper_meta(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER IF EXISTS meta_no_update;"
                       "DROP TRIGGER IF EXISTS meta_no_delete;")
    conn.execute(sql, params)
    conn.commit()
    conn.close()


@pytest.fixture
def keyed(path: Path) -> Iterator[AuditTrail]:
    t = make_keyed(path)
    fill(t, 5)
    yield t
    t.close()


def test_the_public_key_is_in_meta_and_signed_into_the_genesis(path: Path,
                                                               keyed: AuditTrail) -> None:
    assert meta(path) == {"store_id": STORE, "public_key": PUBLIC}
    assert dict(keyed.get(1).fields) == {"public_key": PUBLIC}
    report = verify_audit(path)
    assert report.ok and report.entries == 6
    assert verify_audit(path.parent).ok  # the folder names its audit.db
    with pytest.raises(StoreNotFound):
        verify_audit(path.parent / "elsewhere")
    junk = path.with_name("junk.db")
    junk.write_bytes(b"not a database at all" * 100)
    assert verify_audit(junk).problems == ("audit database unreadable",)


def test_checkpoints_carry_the_key(keyed: AuditTrail) -> None:
    cp = keyed.checkpoint()
    assert cp.public_key == PUBLIC
    assert Checkpoint.from_bytes(cp.to_bytes()) == cp
    assert Checkpoint.from_json(cp.to_json()) == cp
    assert '"v": 2' in cp.to_json() and PUBLIC.hex() in cp.to_json()
    assert keyed.verify(cp).ok
    assert keyed.verify(dataclasses.replace(cp, public_key=None)).problems == (
        "checkpoint signature invalid",)  # the key is signed: dropping it is seen
    with pytest.raises(IntegrityError):
        Checkpoint.from_json(cp.to_json().replace('"v": 2', '"v": 1'))
    with pytest.raises(IntegrityError):
        Checkpoint.from_json(cp.to_json().replace(PUBLIC.hex(), PUBLIC.hex()[:-2]))


def test_verify_audit_finds_a_flipped_byte(path: Path, keyed: AuditTrail) -> None:
    keyed.close()
    body, _, sig = row(path, 3)
    tamper(path, "UPDATE entries SET body = ? WHERE seq = 3", (flip(body, 40),))
    report = verify_audit(path)
    assert report.ok is False and "seq 3: hash mismatch" in report.problems
    tamper(path, "UPDATE entries SET body = ? WHERE seq = 3", (body,))
    assert verify_audit(path).ok
    tamper(path, "UPDATE entries SET sig = ? WHERE seq = 3", (flip(sig),))
    assert verify_audit(path).problems == ("seq 3: signature invalid",)


def test_verify_audit_finds_truncation_with_a_checkpoint(path: Path, keyed: AuditTrail) -> None:
    cp = keyed.checkpoint()
    keyed.close()
    tamper(path, "DELETE FROM entries WHERE seq > 4")
    assert verify_audit(path).ok is True  # a chain alone cannot tell
    assert verify_audit(path, cp).problems == (
        "trail ends at seq 4, before checkpoint seq 6: truncated or an old file restored",)


def test_verify_audit_refuses_another_stores_checkpoint(path: Path, keyed: AuditTrail,
                                                        tmp_path: Path) -> None:
    other = make_keyed(tmp_path / "other.db", store=b"\x02" * 16, seed=bytes(32))
    fill(other, 5)
    assert verify_audit(path, other.checkpoint()).problems == (
        "checkpoint is for another store",)
    twin = make_keyed(tmp_path / "twin.db", seed=bytes(32))  # same store id, another key
    fill(twin, 5)
    assert verify_audit(path, twin.checkpoint()).problems == (
        "checkpoint names another audit public key",)
    assert keyed.verify(twin.checkpoint()).problems == (
        "checkpoint names another audit public key",)
    other.close()
    twin.close()


def test_an_edited_public_key_is_found(path: Path, keyed: AuditTrail) -> None:
    other = SigningKey(bytes(32)).verify_key.encode()
    tamper_meta(path, "UPDATE meta SET value = ? WHERE key = 'public_key'", (other,))
    report = verify_audit(path)  # every signature now fails, and the copies disagree
    assert "seq 1: signature invalid" in report.problems
    assert "the public key in the meta table differs from the signed one" in report.problems
    assert keyed.verify().problems == (
        "the public key in the meta table differs from the signed one",)
    tamper_meta(path, "DELETE FROM meta WHERE key = 'public_key'")
    assert keyed.verify().problems == ("the public key is missing from the meta table",)
    assert verify_audit(path).ok is False


def test_a_trail_from_before_keys_gets_its_key_on_a_writable_open(path: Path) -> None:
    old = make(path)  # no public key: a trail created before keys were published
    fill(old, 2)
    cp_v1 = old.checkpoint()
    assert cp_v1.public_key is None and '"v": 1' in cp_v1.to_json()
    old.close()
    report = verify_audit(path)
    assert report.ok is False and "names no usable public key" in report.problems[0]
    ro = make_keyed(path, create=False, read_only=True)  # a reader adds nothing
    assert ro.verify().ok and ro.verify(cp_v1).ok
    ro.close()
    assert verify_audit(path).ok is False

    upgraded = make_keyed(path, create=False)
    added = upgraded.last()
    assert added is not None and (added.seq, added.event) == (4, "audit-key")
    assert dict(added.fields) == {"public_key": PUBLIC}
    upgraded.close()
    assert meta(path) == {"store_id": STORE, "public_key": PUBLIC}
    assert verify_audit(path).ok and verify_audit(path, cp_v1).ok  # old checkpoints still do
    again = make_keyed(path, create=False)
    assert again.checkpoint().seq == 4  # published once
    again.close()


def test_a_read_only_trail_writes_nothing_and_follows_the_head(path: Path,
                                                               keyed: AuditTrail) -> None:
    ro = make_keyed(path, create=False, read_only=True)
    before = path.read_bytes()
    with pytest.raises(AuditError, match="read-only"):
        ro.append("search", actor="x")
    assert ro.checkpoint().seq == 6
    fill(keyed, 2)  # the writer goes on
    cp = ro.checkpoint()
    assert cp.seq == 8 and keyed.verify(cp).ok and ro.verify(cp).ok
    ro.close()
    assert path.read_bytes() == before  # the writer's entries are in its WAL


def test_a_read_only_trail_refuses_to_sign_a_shortened_file(path: Path,
                                                            keyed: AuditTrail) -> None:
    ro = make_keyed(path, create=False, read_only=True)
    tamper(path, "DELETE FROM entries WHERE seq > 4")
    with pytest.raises(IntegrityError, match="entry 6 is missing or rewritten"):
        ro.checkpoint()
    ro.close()


# --- a store's trail, offline ------------------------------------------------------------


def test_verify_audit_on_a_store_folder(store: Any, store_dir: Path, tmp_path: Path) -> None:
    assert verify_audit(store_dir).ok  # beside the live writer
    cp = store.audit.checkpoint()
    assert cp.public_key == store.audit.public_key
    assert verify_audit(store_dir / "audit.db", cp).ok
    backup = store.backup(tmp_path / "backup", actor="ops")
    assert verify_audit(backup.path, cp).ok
    store.close()
    assert verify_audit(store_dir, cp).ok
    body = row(store_dir / "audit.db", 2)[0]
    tamper(store_dir / "audit.db", "UPDATE entries SET body = ? WHERE seq = 2", (flip(body),))
    report = verify_audit(store_dir, cp)
    assert report.ok is False and "seq 2: hash mismatch" in report.problems
