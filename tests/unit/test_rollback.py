"""Rollback evidence: the keyring, records.db and audit.db each carry the generation of the
key state they have seen, so putting back an older copy of any of them is caught on open.

The attacker (or the operator restoring a backup set) puts back every subset of the three
files from before an erasure. Each case is refused with an IntegrityError that names the
older file. (A keyring exactly one key change behind records.db is completed only when it
holds the pending keys that change sealed under, as a crash between the commit and the
keyring save leaves it: tests/unit/test_subject_keys.py and tests/crash.) All three files
together are caught only with a checkpoint a witness kept.
"""

from __future__ import annotations

import itertools
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery

FILES = ("keyring", "records.db", "audit.db")
WATCH = {"purposes": ["watchlist"], "ttl": timedelta(days=30), "source": "case-file-1"}
VICTIM = "P-000003"


def _copy(store_dir: Path, dest: Path) -> None:
    """A copy of a closed store's three files (no -wal/-shm: close checkpoints them)."""
    dest.mkdir()
    for name in FILES:
        assert not Path(f"{store_dir / name}-wal").exists()
        shutil.copy(store_dir / name, dest / name)


def _put_back(store_dir: Path, old: Path, names: tuple[str, ...]) -> None:
    for name in names:
        for suffix in ("-wal", "-shm"):
            Path(f"{store_dir / name}{suffix}").unlink(missing_ok=True)
        shutil.copy(old / name, store_dir / name)
    (store_dir / "index.snapshot").unlink(missing_ok=True)


def _found(store: bt.TemplateStore, gallery: Gallery, subject: str) -> bool:
    i = gallery.subject_ids.index(subject)
    res = store.search(gallery.templates[i], purpose="watchlist", k=20, actor="t",
                       mode="investigation")
    return any(c.subject_id == subject for c in res.candidates)


@pytest.fixture
def history(store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
            gallery: Gallery, tmp_path: Path) -> dict[str, Any]:
    """gen 0 -> (copy "two-old") -> erase P-000000 (gen 1) -> (copy "old") -> erase VICTIM
    (gen 2) -> checkpoint -> closed."""
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="t", **WATCH)
    store.close()
    _copy(store_dir, tmp_path / "two-old")
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        s.erase_subject("P-000000", actor="dpo")
    _copy(store_dir, tmp_path / "old")
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        receipt = s.erase_subject(VICTIM, actor="dpo", reason="Art. 17")
        assert receipt.key_destroyed and s.stats().generation == 2
        cp = s.audit.checkpoint()
    _copy(store_dir, tmp_path / "current")
    return {"old": tmp_path / "old", "two-old": tmp_path / "two-old",
            "current": tmp_path / "current", "checkpoint": cp}


SUBSETS = [c for n in (1, 2) for c in itertools.combinations(FILES, n)]
# what open says for each subset put back from one erasure earlier
STALE: dict[tuple[str, ...], str] = {
    ("keyring",): r"keyring is older than records\.db .* lacks the keys",
    ("records.db",): r"records\.db is older than the keyring",
    ("audit.db",): r"audit\.db is older than the keyring and records\.db",
    ("keyring", "records.db"): r"keyring and records\.db are older than audit\.db",
    ("keyring", "audit.db"): r"keyring is older than records\.db .* lacks the keys",
    ("records.db", "audit.db"): r"records\.db is older than the keyring",
}


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_subset_put_back_is_refused(history: dict[str, Any], store_dir: Path,
                                          keys: Any, clock: Any, gallery: Gallery,
                                          names: tuple[str, ...]) -> None:
    _put_back(store_dir, history["old"], names)
    with pytest.raises(bt.IntegrityError, match=STALE[names]):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    # nothing was lost by the refusal: with the current files back, the store opens
    # as it was, the erased subject still erased
    _put_back(store_dir, history["current"], names)
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().generation == 2 and s.stats().integrity_failures == 0
        assert s.export_subject(VICTIM, actor="t") == []
        assert not _found(s, gallery, VICTIM)
        assert s.audit.verify().ok


@pytest.mark.parametrize("names", [("keyring",), ("keyring", "audit.db")])
def test_a_keyring_two_changes_old_is_refused(history: dict[str, Any], store_dir: Path,
                                              keys: Any, clock: Any,
                                              names: tuple[str, ...]) -> None:
    _put_back(store_dir, history["two-old"], names)
    with pytest.raises(bt.IntegrityError, match=r"keyring is older than records\.db"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)


def test_all_three_put_back_are_caught_by_a_checkpoint(history: dict[str, Any],
                                                       store_dir: Path, keys: Any,
                                                       clock: Any, gallery: Gallery) -> None:
    _put_back(store_dir, history["old"], FILES)
    with pytest.raises(bt.IntegrityError, match="checkpoint"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock,
                              checkpoint=history["checkpoint"])
    # without the witness's checkpoint the older, consistent set is all there is: this
    # is the limit SECURITY.md states (keep checkpoints off the host)
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().generation == 1
        assert _found(s, gallery, VICTIM)


def test_the_current_files_open_with_the_checkpoint(history: dict[str, Any], store_dir: Path,
                                                    keys: Any, clock: Any) -> None:
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock,
                               checkpoint=history["checkpoint"]) as s:
        assert s.stats().generation == 2


def test_the_clock_high_water_mark_survives_a_refused_rollback(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    """Old keyring + old audit.db + the clock set back: the rollback is refused, so the
    high-water mark they carry never replaces the newer one, and expired records stay
    expired."""
    store.enroll_many(gallery.templates[:4], subject_ids=gallery.subject_ids[:4], actor="t",
                      purposes=["watchlist"], ttl=timedelta(days=1), source="case-file-1")
    store.close()
    _copy(store_dir, tmp_path / "old")
    clock.advance(days=3)  # expired, not yet purged
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        s.erase_subject("P-000009", actor="dpo")  # any key change: generation 1
        assert s.export_subject(gallery.subject_ids[0], actor="t") == []
    _put_back(store_dir, tmp_path / "old", ("keyring", "audit.db"))
    clock.advance(days=-3)
    with pytest.raises(bt.IntegrityError):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)


def test_a_failed_commit_is_followed_by_a_rollback_entry(
        store: bt.TemplateStore, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit entry is written inside the records transaction; when the commit itself
    fails, the entry is followed at once by a "rollback" entry naming it."""
    from biotemplate.backends.sqlite import SQLiteBackend

    store.enroll_many(gallery.templates[:4], subject_ids=gallery.subject_ids[:4], actor="t",
                      **WATCH)
    real = SQLiteBackend.transaction

    def failing_commit(self: SQLiteBackend) -> Any:
        cm = real(self)

        class _Failing:
            def __enter__(self) -> None:
                cm.__enter__()

            def __exit__(self, *exc: Any) -> None:
                cm.__exit__(RuntimeError, RuntimeError("x"), None)  # roll back
                if exc[0] is None:
                    raise bt.StorageError("commit failed (SQLITE_FULL)")

        return _Failing()

    monkeypatch.setattr(SQLiteBackend, "transaction", failing_commit)
    with pytest.raises(bt.StorageError):
        store.erase_subject(gallery.subject_ids[0], actor="dpo")
    monkeypatch.undo()
    head = store.audit.verify().entries
    staged, rollback, refused = (store.audit.get(n) for n in range(head - 2, head + 1))
    assert (staged.event, staged.outcome) == ("erase", "ok")
    assert rollback.event == "rollback" and rollback.fields["ref_seq"] == staged.seq
    assert (refused.event, refused.outcome) == ("erase", "error")  # the call's own record
    assert len(store.export_subject(gallery.subject_ids[0], actor="t")) >= 1  # not erased
    assert store.stats().generation == 0


def test_a_keyring_from_before_a_hold_is_refused_not_completed(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    """place_hold reseals the subject's rows under a hold key saved just before its commit:
    a keyring one change behind without that key is an older copy, and completing the
    change would leave the held rows unreadable. It is refused; the current keyring opens
    with the hold intact."""
    store.enroll_many(gallery.templates[:6], subject_ids=gallery.subject_ids[:6], actor="t",
                      **WATCH)
    store.close()
    _copy(store_dir, tmp_path / "before")
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        s.place_hold(gallery.subject_ids[0], actor="legal", reason="case 4")
    current = (store_dir / "keyring").read_bytes()
    _put_back(store_dir, tmp_path / "before", ("keyring",))
    with pytest.raises(bt.IntegrityError, match="lacks the keys"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    (store_dir / "keyring").write_bytes(current)
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        held = s.export_subject(gallery.subject_ids[0], actor="legal")
        assert held and all(v.held for v in held)
