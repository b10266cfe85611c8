"""store.backup: consistent copies of records.db and audit.db, never the keyring."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

import biotemplate as bt


def test_backup_copies_databases_not_the_keyring(store: bt.TemplateStore, store_dir: Path,
                                                 gallery, keys,
                                                 clock, tmp_path: Path) -> None:
    store.enroll_many(gallery.templates[:10], subject_ids=gallery.subject_ids[:10],
                      purposes=["watchlist"], ttl=timedelta(days=1), source="case-file-1",
                      actor="t")
    before = store.audit.verify().entries
    dest = store.backup(tmp_path / "bk", actor="ops").path
    assert sorted(p.name for p in dest.iterdir()) == ["audit.db", "records.db"]
    assert (dest.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o077) == 0 for p in dest.iterdir())
    assert store.audit.verify().entries == before + 1  # the backup itself is audited
    with pytest.raises(bt.StoreExists):
        store.backup(dest, actor="ops")
    # the copy opens with the store's keyring: it is a real, consistent database
    restored = tmp_path / "restored"
    shutil.copytree(dest, restored)
    shutil.copy(store_dir / "keyring", restored / "keyring")
    with bt.TemplateStore.open(restored, key_provider=keys, clock=clock) as copy:
        assert copy.stats().records == 10
        assert copy.audit.verify().ok
