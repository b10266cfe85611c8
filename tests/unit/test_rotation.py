"""Master-key rotation: the key state is resealed under a new master key, no record is
re-encrypted, and afterwards the old master key opens nothing in the store folder."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from copies import read_with

import biotemplate as bt
from biotemplate.synthetic import Gallery, probes

WATCH = {"purposes": ["watchlist"], "ttl": timedelta(days=30), "source": "case-file-1"}


def _blobs(store_dir: Path) -> dict[str, bytes]:
    con = sqlite3.connect(f"file:{store_dir / 'records.db'}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT record_id, blob FROM records").fetchall())
    finally:
        con.close()


def _events(store: bt.TemplateStore) -> list[str]:
    return [store.audit.get(n).event for n in range(1, store.audit.verify().entries + 1)]


def test_rotation_rewraps_the_key_state_only(store: bt.TemplateStore, store_dir: Path,
                                             keys: Any, clock: Any, gallery: Gallery,
                                             tmp_path: Path) -> None:
    ids = store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="t",
                            **WATCH)
    blobs = _blobs(store_dir)
    new_keys = bt.FileKeyProvider.generate(tmp_path / "new.key")
    receipt = store.rotate_master_key(new_keys, actor="security-officer")
    entry = store.audit.get(receipt.audit_seq)
    assert entry.event == "rotate-master-key" and entry.fields["new_key"] == \
        receipt.master_key_id != entry.fields["old_key"]
    assert store.search(probes(gallery, [3])[0], purpose="watchlist", actor="t").decision
    store.close()
    assert _blobs(store_dir) == blobs  # no record was re-encrypted
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)  # the old key
    with bt.TemplateStore.open(store_dir, key_provider=new_keys, clock=clock) as s:
        assert s.stats().records == len(ids)
        res = s.search(probes(gallery, [3])[0], purpose="watchlist", actor="t")
        assert res.candidates[0].subject_id == gallery.subject_ids[6]
        assert "rollback" not in _events(s)
        assert s.audit.verify().ok


def test_no_temp_keyring_under_the_old_key_is_left(store: bt.TemplateStore, store_dir: Path,
                                                   tmp_path: Path) -> None:
    store.rotate_master_key(bt.FileKeyProvider.generate(tmp_path / "new.key"), actor="so")
    assert not [p for p in store_dir.iterdir() if p.name.startswith(".keyring.")]


def test_rotating_to_the_same_key_is_refused_and_audited(store: bt.TemplateStore,
                                                         keys: Any) -> None:
    with pytest.raises(bt.InvalidInput, match="current one"):
        store.rotate_master_key(keys, actor="so")
    last = store.audit.get(store.audit.verify().entries)
    assert (last.event, last.outcome) == ("rotate-master-key", "refused")


def test_a_new_provider_that_fails_changes_nothing(store: bt.TemplateStore, store_dir: Path,
                                                   keys: Any, clock: Any,
                                                   tmp_path: Path) -> None:
    with pytest.raises(bt.KeyUnavailable):
        store.rotate_master_key(bt.FileKeyProvider(tmp_path / "missing.key"), actor="so")
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.audit.verify().ok


def test_a_rotation_killed_before_the_new_keyring_is_marked_rolled_back(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit entry comes first; if the keyring replace never happens (simulated by a
    failing save), the next open under the old key says the rotation did not complete."""
    from biotemplate.vault import Vault

    def killed(self: Vault, new_kek: Any) -> None:
        raise KeyboardInterrupt  # as if the process died here

    monkeypatch.setattr(Vault, "rewrap", killed)
    with pytest.raises(KeyboardInterrupt):
        store.rotate_master_key(bt.FileKeyProvider.generate(tmp_path / "new.key"), actor="so")
    monkeypatch.undo()
    store._p.closed = True  # no close entry: the process is gone
    store._p.trail.close()
    store._p.vault.close()
    assert store._p.writer is not None
    store._p.writer.release()  # a killed process's lock dies with it
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        events = _events(s)
        rotate = events.index("rotate-master-key")
        assert "rollback" in events[rotate:]
        assert s.audit.verify().ok


# --- rotate_keys: post-compromise security ------------------------------------------------


def _read_with(keyring_file: Path, keys: Any, db_file: Path) -> dict[str, str]:
    return read_with(keyring_file, keys, db_file, model="test-model-v1", dim=64)


def test_records_enrolled_after_rotate_keys_do_not_open_with_a_leaked_key_state(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    store.enroll_many(gallery.templates[:20], subject_ids=gallery.subject_ids[:20],
                      actor="t", **WATCH)
    store.place_hold(gallery.subject_ids[0], actor="legal", reason="case 1")
    leaked = tmp_path / "leaked-keyring"
    leaked.write_bytes((store_dir / "keyring").read_bytes())  # the attacker's copy
    receipt = store.rotate_keys(actor="security-officer")
    assert receipt.records_resealed == 20 and receipt.holds_rekeyed == 1
    assert receipt.subjects_rewrapped == 10
    late = store.enroll(gallery.templates[20], subject_id="LATE-1", actor="t", **WATCH)
    again = store.enroll(gallery.templates[21], subject_id=gallery.subject_ids[2],
                         actor="t", **WATCH)  # a new record of a subject from before
    store.close()
    stolen = _read_with(leaked, keys, store_dir / "records.db")
    assert stolen[late] == stolen[again] == "unreadable"
    assert set(stolen.values()) == {"unreadable"}  # and what was resealed, too
    current = _read_with(store_dir / "keyring", keys, store_dir / "records.db")
    assert "unreadable" not in current.values() and current[late] == "LATE-1"
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().records == 22 and s.stats().integrity_failures == 0
        res = s.search(probes(gallery, [5])[0], purpose="watchlist", actor="t")
        assert res.candidates and res.candidates[0].subject_id == "P-000005"
        held = s.export_subject(gallery.subject_ids[0], actor="legal")
        assert held and all(v.held for v in held)
        assert s.release_hold(gallery.subject_ids[0], actor="legal", reason="closed").records
        assert s.audit.verify().ok


def test_searches_keep_working_across_rotate_keys(store: bt.TemplateStore,
                                                  gallery: Gallery) -> None:
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="t", **WATCH)
    before = store.search(probes(gallery, [7])[0], purpose="watchlist", actor="t")
    ticks: list[tuple[int, int]] = []
    store.rotate_keys(actor="so", progress=lambda done, total: ticks.append((done, total)))
    after = store.search(probes(gallery, [7])[0], purpose="watchlist", actor="t")
    assert [c.record_id for c in after.candidates] == [c.record_id for c in before.candidates]
    assert store.stats().integrity_failures == 0
    assert ticks and ticks[-1] == (100, 100)


def test_rotate_keys_failing_before_its_commit_changes_nothing(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from biotemplate.vault import Vault

    store.enroll_many(gallery.templates[:10], subject_ids=gallery.subject_ids[:10],
                      actor="t", **WATCH)
    generation = store.stats().generation

    def broken(self: Vault) -> int:
        raise bt.StorageError("disk full")

    monkeypatch.setattr(Vault, "rewrap_entries", broken)
    with pytest.raises(bt.StorageError):
        store.rotate_keys(actor="so")
    monkeypatch.undo()
    assert store.stats().generation == generation
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert len(s.export_subject(gallery.subject_ids[0], actor="t")) == 2
        assert s.stats().integrity_failures == 0
        assert s.rotate_keys(actor="so").records_resealed == 10  # and it works afterwards


def test_rotate_keys_killed_after_its_commit_is_completed_on_open(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from biotemplate._calls import Parts

    store.enroll_many(gallery.templates[:10], subject_ids=gallery.subject_ids[:10],
                      actor="t", **WATCH)
    leaked = tmp_path / "leaked-keyring"
    leaked.write_bytes((store_dir / "keyring").read_bytes())

    def killed(self: Parts) -> Any:
        raise KeyboardInterrupt  # the process dies between the commit and the key save

    monkeypatch.setattr(Parts, "apply_key_change", killed)
    with pytest.raises(KeyboardInterrupt):
        store.rotate_keys(actor="so")
    monkeypatch.undo()
    store._p.closed = True
    store._p.trail.close()
    store._p.vault.close()
    assert store._p.writer is not None
    store._p.writer.release()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert _events(s)[-2:] == ["rollforward", "open"]
        assert len(s.export_subject(gallery.subject_ids[0], actor="t")) == 2
        assert s.stats().integrity_failures == 0
    stolen = _read_with(leaked, keys, store_dir / "records.db")
    assert set(stolen.values()) == {"unreadable"}
