"""Crash safety of a policy change that shortens stored records (``set_policy``).

The change saves the new bucket keys of the affected subjects (pending) and both policy
digests, then commits in one records transaction the resealed rows, the entries of those
buckets resealed under the pending keys, the policy and its audit entry, then saves the
keyring with the pending keys made current. A child process is SIGKILLed in each window:

- ``pending-save``: inside the first keyring save (before its rename);
- ``in-transaction``: inside the records transaction, when the key change is staged;
- ``final-save``: committed, inside the keyring save that makes the keys current.

After a reopen the change is all or nothing: the old policy with every expiry as it was,
or the new policy with every affected record shortened (rolled forward: "rollforward" in
the audit), no pending key left, every row readable, the audit whole, and the change can
be made (again).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import biotemplate as bt
from biotemplate.keyring import Keyring
from biotemplate.synthetic import make_gallery

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 1, tzinfo=UTC)
CHILD = textwrap.dedent("""
    import os, signal, sys
    from datetime import datetime
    from pathlib import Path
    import biotemplate as bt
    from biotemplate.keyring import Keyring
    from biotemplate.vault import Vault

    store_dir, key_file, now_iso, window, tighter = sys.argv[1:6]
    now = datetime.fromisoformat(now_iso)

    def die():
        print("DYING", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    store = bt.TemplateStore.open(store_dir, key_provider=bt.FileKeyProvider(key_file),
                                  clock=lambda: now)
    skip = [0 if window == "pending-save" else 1]
    if window == "in-transaction":
        stage = Vault.stage
        def dying_stage(self, **kwargs):
            die()
            return stage(self, **kwargs)
        Vault.stage = dying_stage
    else:
        save = Keyring.save
        def armed(self, path, master_key, before_rename=None):
            if skip[0] > 0:
                skip[0] -= 1
                return save(self, path, master_key)
            return save(self, path, master_key, before_rename=die)
        Keyring.save = armed
    store.set_policy(bt.RetentionPolicy.from_toml_string(tighter), actor="dpo")
    print("SURVIVED", flush=True)
""")


def expiries(store_dir: Path) -> dict[str, int]:
    from biotemplate.backends.sqlite import SQLiteBackend
    db = SQLiteBackend.open(store_dir / "records.db", read_only=True)
    try:
        return {r.record_id: r.expiry_us for b in db.scan_headers() for r in b}
    finally:
        db.close()


@pytest.mark.parametrize("window", ["pending-save", "in-transaction", "final-save"])
def test_policy_tightening_crash_windows(tmp_path: Path, keys: bt.FileKeyProvider,
                                         policy: bt.RetentionPolicy, window: str) -> None:
    store_dir = tmp_path / "store"
    gallery = make_gallery(12, 2, 32, seed=5)
    with bt.TemplateStore.create(store_dir, dim=32, model="crash-policy-v1", policy=policy,
                                 key_provider=keys, clock=lambda: NOW) as store:
        store.enroll_many(gallery.templates[:20], subject_ids=gallery.subject_ids[:20],
                          purposes=["watchlist"], ttl=timedelta(days=300),
                          source="case-file", actor="svc")
        store.enroll_many(gallery.templates[20:], subject_ids=gallery.subject_ids[20:],
                          purposes=["rare"], ttl=timedelta(days=20), actor="svc")
    before = expiries(store_dir)
    ring_before = Keyring.load(store_dir / "keyring", keys.master_key())
    d = policy.to_dict()
    d["purposes"]["watchlist"]["max_retention"] = "30d"
    tighter = bt.RetentionPolicy.from_dict(d)

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(store_dir), str(keys.path), NOW.isoformat(), window,
         tighter.to_toml()], capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "DYING" in child.stdout and "SURVIVED" not in child.stdout
    committed = window == "final-save"

    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: NOW) as store:
        ring = Keyring.load(store_dir / "keyring", keys.master_key())
        assert not ring.pending  # promoted, or discarded
        stats = store.stats()
        assert (stats.shredded_rows, stats.integrity_failures, stats.missing_rows) == (0, 0, 0)
        assert store.audit.verify().ok
        events = [store.audit.get(n).event for n in range(1, store.audit.verify().entries + 1)]
        assert ("rollforward" in events) == committed
        after = expiries(store_dir)
        shortened = {rid for rid in before if after[rid] != before[rid]}
        if committed:
            assert store.policy == tighter
            assert len(shortened) == 20 and all(after[r] < before[r] for r in shortened)
            assert ring.buckets != ring_before.buckets  # the old bucket keys are gone
        else:
            assert store.policy == policy and not shortened
            assert ring.buckets == ring_before.buckets
        # every record still opens (export reads them) and the store keeps working
        assert all(len(store.export_subject(s, actor="check")) >= 2
                   for s in sorted(set(gallery.subject_ids[:20])))
        res = store.search(gallery.templates[4], purpose="watchlist", actor="check")
        assert res.candidates and res.candidates[0].subject_id == gallery.subject_ids[4]
        receipt = store.set_policy(tighter, actor="dpo")
        assert receipt.records_shortened == (0 if committed else 20)
        assert store.audit.verify().ok
