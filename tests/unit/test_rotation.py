"""Master-key rotation: the key state is resealed under a new master key, no record is
re-encrypted, and afterwards the old master key opens nothing in the store folder."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

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
