"""Search entries MAC'd, then sealed: a 32-byte HMAC of the entry hash at append time, an
Ed25519 seal of the head at each group commit (``sync``, ``close``, the syncer), an
unsealed tail checked and sealed on the next writable open, and never counted as
verified by an auditor before a signature covers it."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from biotemplate import sealing
from biotemplate.audit import SYNC_WINDOW, AuditTrail, checkpoint_audit, verify_audit
from biotemplate.audit_export import export_audit
from biotemplate.errors import AuditError, IntegrityError, InvalidInput

STORE = b"\x02" * 16
SEED = bytes(range(32))
PUBLIC = SigningKey(SEED).verify_key.encode()
MAC = sealing.audit_mac(SEED)


def open_trail(path: Path, *, create: bool = False, mac: Callable[[bytes], bytes] | None = MAC,
               read_only: bool = False) -> AuditTrail:
    sign, _ = sealing.signer_from_seed(SEED)
    verify = sealing.verifier_for(PUBLIC)
    clock = lambda: datetime(2025, 3, 1, tzinfo=UTC)  # noqa: E731
    if create:
        return AuditTrail.create(path, store_id=STORE, signer=sign, verifier=verify,
                                 clock=clock, public_key=PUBLIC, mac=mac)
    return AuditTrail.open(path, store_id=STORE, signer=sign, verifier=verify, clock=clock,
                           public_key=PUBLIC, mac=mac, read_only=read_only)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def trail(path: Path) -> Iterator[AuditTrail]:
    t = open_trail(path, create=True)
    yield t
    t.close()


def searches(trail: AuditTrail, n: int) -> None:
    for i in range(n):
        trail.append("search", actor="a", durable=False, count=i)


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def unsealed_close(trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    """Close as a process killed before its syncer ran would leave the file."""
    monkeypatch.setattr(trail, "_seal_head", lambda: None)
    trail.close()


def test_search_entries_carry_a_mac_and_mutations_a_signature(path: Path,
                                                              trail: AuditTrail) -> None:
    searches(trail, 3)
    trail.append("delete", actor="a")
    sigs = rows(path, "SELECT seq, hash, sig FROM entries ORDER BY seq")
    assert [len(s) for _, _, s in sigs] == [64, 32, 32, 32, 64]  # type: ignore[arg-type]
    verify = sealing.verifier_for(PUBLIC)
    for seq, digest, sig in sigs[1:4]:
        assert sig == MAC(digest), seq  # type: ignore[arg-type]
        assert not verify(digest, sig), seq  # type: ignore[arg-type]
    assert rows(path, "SELECT seq FROM seals") == []  # the delete's signature covers them
    report = verify_audit(path)
    assert (report.ok, report.entries, report.unsealed) == (True, 5, 0)


def test_without_a_mac_key_every_entry_is_signed(path: Path) -> None:
    t = open_trail(path, create=True, mac=None)
    searches(t, 2)
    t.close()
    assert [len(s) for s, in rows(path, "SELECT sig FROM entries")] == [64, 64, 64]  # type: ignore[arg-type]
    assert rows(path, "SELECT seq FROM seals") == []


def test_sync_and_the_syncer_and_close_seal_the_head(path: Path, trail: AuditTrail) -> None:
    verify = sealing.verifier_for(PUBLIC)
    searches(trail, 4)
    trail.sync()
    [(seq, seal)] = rows(path, "SELECT seq, sig FROM seals")
    [(digest,)] = rows(path, "SELECT hash FROM entries WHERE seq = 5")
    assert seq == 5 and verify(digest, seal)  # type: ignore[arg-type]
    trail.sync()  # nothing new: no second seal
    assert len(rows(path, "SELECT seq FROM seals")) == 1

    searches(trail, 2)  # the background syncer seals within the window
    deadline = time.monotonic() + 40 * SYNC_WINDOW + 2
    while len(rows(path, "SELECT seq FROM seals")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rows(path, "SELECT max(seq) FROM seals") == [(7,)]

    searches(trail, 1)
    trail.close()
    assert rows(path, "SELECT max(seq) FROM seals") == [(8,)]
    report = verify_audit(path)
    assert (report.ok, report.entries, report.unsealed) == (True, 8, 0)


def test_an_unsealed_tail_verifies_as_unsealed_then_is_sealed_on_open(
        path: Path, trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    trail.append("enroll", actor="a")
    searches(trail, 4)
    unsealed_close(trail, monkeypatch)
    report = verify_audit(path)  # an auditor: chained, but no signature covers them yet
    assert (report.ok, report.entries, report.unsealed) == (True, 2, 4)
    assert [e.entry.seq for e in open_trail(path, mac=None, read_only=True).entries()] == [1, 2]
    assert [r.seq for r in export_audit(path)] == [1, 2]
    offline = open_trail(path, mac=None, read_only=True)
    with pytest.raises(IntegrityError, match="not sealed"):
        offline.get(6)
    offline.close()
    cp = checkpoint_audit(path)  # the newest signed point, not the MAC'd head
    assert (cp.seq, cp.version) == (2, 3)

    reopened = open_trail(path)  # crash recovery: MACs checked, head sealed
    assert rows(path, "SELECT seq FROM seals") == [(6,)]
    assert reopened.verify(cp).ok
    reopened.close()
    report = verify_audit(path, cp)
    assert (report.ok, report.entries, report.unsealed) == (True, 6, 0)
    assert checkpoint_audit(path).seq == 6


def test_a_forged_tail_entry_without_the_mac_key_fails_the_next_open(
        path: Path, trail: AuditTrail, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    searches(trail, 2)
    trail.close()
    # an attacker with write access chains a search entry under a key of their own
    forger = open_trail(path, mac=None)
    forger._mac = sealing.audit_mac(bytes(32))
    forger.append("search", actor="ghost", durable=False)
    unsealed_close(forger, monkeypatch)
    keep = tmp_path / "forged.db"
    shutil.copy(path, keep)

    report = verify_audit(path)  # the public key cannot tell: unsealed, never verified
    assert report.ok and (report.entries, report.unsealed) == (3, 1)
    with pytest.raises(IntegrityError):
        open_trail(path, read_only=True)  # the store's reader has the MAC key
    reader = open_trail(path, mac=None, read_only=True)
    reader._mac = MAC  # given the key, verify checks every MAC, not just the tail's
    assert "seq 4: MAC invalid" in reader.verify().problems
    reader.close()
    with pytest.raises(IntegrityError):
        open_trail(path)
    with pytest.raises(IntegrityError):
        open_trail(path, mac=None)  # no key: a writable open refuses what it cannot check
    assert rows(path, "SELECT seq FROM seals") == rows(keep, "SELECT seq FROM seals")


def test_seals_are_append_only_and_a_deleted_one_is_never_verified(
        path: Path, trail: AuditTrail) -> None:
    searches(trail, 3)
    trail.sync()  # seal at 4
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        sql(path, "DELETE FROM seals WHERE seq = 4")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        sql(path, "UPDATE seals SET sig = zeroblob(64)")
    sql(path, "DROP TRIGGER seals_no_delete", "DELETE FROM seals WHERE seq = 4")
    report = trail.verify()  # the live trail knows it sealed them
    assert not report.ok and "a seal was deleted" in report.problems[0]
    trail.close()  # it holds the head as sealed: nothing re-sealed
    report = verify_audit(path)
    assert (report.ok, report.entries, report.unsealed) == (True, 1, 3)

    again = open_trail(path)  # MACs check out: sealed again
    again.append("delete", actor="a")
    again.close()
    sql(path, "DROP TRIGGER seals_no_delete", "DELETE FROM seals")  # (open put it back)
    report = verify_audit(path)  # covered by the later signed entry
    assert (report.ok, report.entries, report.unsealed) == (True, 5, 0)


def test_a_forged_seal_is_reported_and_refused(path: Path, trail: AuditTrail) -> None:
    searches(trail, 2)
    trail.close()
    sql(path, "DROP TRIGGER seals_no_update", "UPDATE seals SET sig = zeroblob(64)")
    assert "seq 3: seal invalid" in verify_audit(path).problems
    with pytest.raises(IntegrityError, match="seal"):
        open_trail(path)


def test_an_old_trail_without_seals_opens_and_gets_the_table(path: Path,
                                                             trail: AuditTrail) -> None:
    trail.append("enroll", actor="a")
    trail.close()
    sql(path, "DROP TABLE seals")
    assert verify_audit(path).ok
    reader = open_trail(path, read_only=True)
    assert reader.verify().ok and reader.checkpoint().seq == 2
    reader.close()
    t = open_trail(path)
    searches(t, 2)
    t.close()
    assert rows(path, "SELECT seq FROM seals") == [(4,)]
    assert rows(path, "PRAGMA user_version") == [(1,)]
    report = verify_audit(path)
    assert (report.ok, report.entries, report.unsealed) == (True, 4, 0)


def test_checkpoints_stay_valid(path: Path, trail: AuditTrail) -> None:
    searches(trail, 3)
    cp = trail.checkpoint()  # seals first, then signs (version 2)
    assert cp.seq == 4 and verify_audit(path, cp).ok
    searches(trail, 2)
    v3 = trail.entry_checkpoint()  # the live trail seals, the seal signs the head
    assert (v3.seq, v3.version) == (6, 3)
    trail.close()
    assert verify_audit(path, cp).ok and verify_audit(path, v3).ok
    assert checkpoint_audit(path) == v3


# --- append_many: a search_many step's entries in one commit


def test_append_many_writes_the_entries_append_would(trail: AuditTrail, path: Path) -> None:
    head = trail.head_seq
    seqs = trail.append_many("search", [{"count": 1, "record_ids": ["a"]}, {"count": 2}],
                             actor="a")
    one = trail.append("search", actor="a", durable=False, count=3)
    assert seqs == [head + 1, head + 2] and one == head + 3
    assert [trail.get(s).fields["count"] for s in (*seqs, one)] == [1, 2, 3]
    assert trail.get(seqs[0]).fields["record_ids"] == ["a"]
    sigs = rows(path, f"SELECT length(sig) FROM entries WHERE seq > {head}")
    assert sigs == [(32,), (32,), (32,)]  # MAC'd, like append's search entries
    trail.sync()
    report = trail.verify()
    assert report.ok and report.unsealed == 0 and report.entries == one


def test_append_many_writes_all_or_nothing(trail: AuditTrail, path: Path) -> None:
    head = trail.head_seq
    with pytest.raises(InvalidInput):
        trail.append_many("search", [{"count": 1}, {"count": object()}], actor="a")

    class Failing:
        """The connection, except that the batch insert fails half way."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

        def executemany(self, statement: str, params: list[tuple[object, ...]]) -> None:
            self.conn.execute(statement, params[0])
            raise sqlite3.OperationalError("disk I/O error")

    real = trail._conn
    trail._conn = Failing(real)  # type: ignore[assignment]
    try:
        with pytest.raises(AuditError):
            trail.append_many("search", [{"count": 1}, {"count": 2}], actor="a")
    finally:
        trail._conn = real
    assert trail.head_seq == head
    assert rows(path, "SELECT max(seq) FROM entries") == [(head,)]
    assert trail.append("search", actor="a", durable=False, count=9) == head + 1
    assert trail.verify().ok


def test_a_long_unsealed_tail_fails_verification(path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash leaves ~50 ms of searches unsealed; a tail spanning minutes means seals
    were deleted (and its entries may have been rewritten: only the store can check their
    MACs), so an auditor's verify fails instead of calling it normal."""
    sign, _ = sealing.signer_from_seed(SEED)
    now = [datetime(2025, 3, 1, tzinfo=UTC)]
    t = AuditTrail.create(path, store_id=STORE, signer=sign,
                          verifier=sealing.verifier_for(PUBLIC), clock=lambda: now[0],
                          public_key=PUBLIC, mac=MAC)
    t.append("enroll", actor="a")
    for _ in range(3):
        now[0] += timedelta(seconds=3)
        searches(t, 1)
    unsealed_close(t, monkeypatch)
    report = verify_audit(path)  # 6 s: still what a crash could leave
    assert (report.ok, report.unsealed) == (True, 3)
    t = open_trail(path)  # sealed again, then three more spread over 30 s
    for _ in range(3):
        now[0] += timedelta(seconds=15)
        t._clock = lambda: now[0]
        searches(t, 1)
    unsealed_close(t, monkeypatch)
    report = verify_audit(path)
    assert not report.ok and report.unsealed == 3
    assert any("seals were deleted" in p for p in report.problems)


def test_a_seal_that_outlived_its_entry_refuses_the_open(path: Path,
                                                         trail: AuditTrail) -> None:
    searches(trail, 3)
    trail.close()  # sealed at 4
    sql(path, "DROP TRIGGER entries_no_delete", "DELETE FROM entries WHERE seq = 4")
    with pytest.raises(IntegrityError, match="truncated"):
        open_trail(path)
    with pytest.raises(IntegrityError, match="truncated"):
        open_trail(path, mac=None, read_only=True)
