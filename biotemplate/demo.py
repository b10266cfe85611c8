"""``make demo``: one walk through biotemplate on the embedded default (SQLite).

It creates a store in a temporary folder, enrols a few thousand synthetic face-like
templates, runs a 1:1 verification, open-set identification (an enrolled person and a
stranger), an investigative candidate list, expires and purges records by moving the
injected clock, erases a subject, shows that a database copy taken before the erasure no
longer yields that subject, and verifies the audit trail. Each step prints what happened
and how long it took.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

import biotemplate as bt
from biotemplate.synthetic import make_gallery, non_mated, probes

POLICY = {
    "epoch": "1h",
    "purposes": {
        "border-verification": {
            "description": "1:1 traveller verification at the gate",
            "max_retention": "12h", "default_retention": "12h",
            "modes": ["verification"], "match_threshold": 0.60,
        },
        "watchlist": {
            "description": "1:N identification against a watch list",
            "max_retention": "3y", "default_retention": "365d",
            "modes": ["identification", "investigation"],
            "match_threshold": 0.55, "max_candidates": 20,
            "allowed_sources": ["enrolment-desk", "case-file"],
        },
    },
}


class Clock:
    """An injected clock the demo can move forward (the store never reads time itself)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@contextmanager
def step(title: str) -> Iterator[None]:
    t0 = time.perf_counter()
    print(f"\n== {title}")
    yield
    print(f"   ({(time.perf_counter() - t0) * 1000:.1f} ms)")


def main(workdir: Path) -> None:
    dim, clock = 512, Clock()
    folder, key = workdir / "faces", workdir / "master.key"
    gallery = make_gallery(1000, 3, dim, seed=7)  # 1,000 people x 3 samples
    travellers = make_gallery(200, 1, dim, seed=8, prefix="T-")

    with step("create a store (key file 0600, policy with two purposes)"):
        keys = bt.FileKeyProvider.generate(key)
        store = bt.TemplateStore.create(folder, dim=dim, model="synthetic-arcface-like-v1",
                                        policy=bt.RetentionPolicy.from_dict(POLICY),
                                        key_provider=keys, clock=clock)
        print(f"   {folder}: records.db (sealed rows), audit.db (signed trail), keyring")
        print(f"   key file mode {key.stat().st_mode & 0o777:o}")

    with step(f"enrol {len(gallery.templates):,} watch-list templates in one transaction"):
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                          purposes=["watchlist"], ttl=timedelta(days=730),
                          source="enrolment-desk-3", actor="svc-enrol")
        store.enroll_many(travellers.templates, subject_ids=travellers.subject_ids,
                          purposes=["border-verification"], source="egate-7",
                          actor="svc-egate")  # default retention of the purpose: 12h
        print(f"   {store.stats().records:,} records, all encrypted at rest")

    with step("1:1 verification at the gate (traveller T-000005)"):
        v = store.verify(probes(travellers, [5])[0], subject_id="T-000005",
                         purpose="border-verification", actor="egate-7")
        print(f"   match={v.match} score={v.score:.3f} (threshold 0.60)")

    with step("1:N identification of an enrolled person (P-000042)"):
        res = store.search(probes(gallery, [42])[0], purpose="watchlist", k=5,
                           actor="analyst-17", reason="case 118")
        for c in res.candidates:
            print(f"   rank {c.rank}: {c.subject_id} score={c.score:.3f}")
        print(f"   decision={res.decision}")

    with step("1:N identification of a stranger (not in the gallery)"):
        res2 = store.search(non_mated(gallery, 1)[0], purpose="watchlist", k=5,
                            actor="analyst-17", reason="case 118")
        print(f"   candidates={len(res2.candidates)} decision={res2.decision}"
              "  <- open-set: no candidate is a normal answer")

    with step("investigation list for the stranger (weak candidates marked)"):
        inv = store.search(non_mated(gallery, 1, seed=4)[0], purpose="watchlist", k=5,
                           actor="analyst-17", reason="case 118", mode="investigation")
        for c in inv.candidates:
            mark = "" if c.above_threshold else "  [below threshold: weak]"
            print(f"   rank {c.rank}: {c.subject_id} score={c.score:.3f}{mark}")

    with step("two reviewers confirm the identification (AI Act Art. 14(5))"):
        top = res.candidates[0].record_id
        store.confirm_match(res.audit_seq, top, reviewer="officer-2")
        conf = store.confirm_match(res.audit_seq, top, reviewer="officer-9")
        print(f"   reviewers={conf.reviewers} two_person_confirmed={conf.two_person_confirmed}")

    with step("13 hours later: border records expired, then purged"):
        clock.now += timedelta(hours=13)
        try:
            store.verify(probes(travellers, [5])[0], subject_id="T-000005",
                         purpose="border-verification", actor="egate-7")
        except bt.RecordNotFound:
            print("   verify(T-000005) -> RecordNotFound (expired before any purge)")
        report = store.purge_expired()
        print(f"   purged={report.purged} epoch {report.epoch_before} -> {report.epoch_after}"
              f" subject keys destroyed={report.subject_keys_destroyed}")

    with step("erase subject P-000042 (GDPR Art. 17); a backup from before is useless"):
        backup = store.backup(workdir / "backup-before-erasure", actor="ops").path / "records.db"
        receipt = store.erase_subject("P-000042", actor="dpo-1", reason="request 55")
        print(f"   erased {receipt.records_erased} records, key destroyed={receipt.key_destroyed}")
        store.close()
        restored = workdir / "restored"
        shutil.copytree(folder, restored)
        (restored / "records.db").unlink()
        for suffix in ("-wal", "-shm"):
            (restored / f"records.db{suffix}").unlink(missing_ok=True)
        shutil.copy(backup, restored / "records.db")
        try:
            bt.TemplateStore.open(restored, key_provider=keys, clock=clock)
        except bt.IntegrityError as exc:  # the keyring names a later generation
            print(f"   restored copy refused: {exc}")
        print("   (and its rows of P-000042 were sealed under a key that no longer exists)")
        store = bt.TemplateStore.open(folder, key_provider=keys, clock=clock)

    with step("verify the audit trail and take a checkpoint for a witness"):
        cp = store.audit.checkpoint()
        report_a = store.audit.verify(checkpoint=cp)
        print(f"   ok={report_a.ok} entries={report_a.entries} checkpoint seq={cp.seq}")
        store.close()
    print("\nDone. Every call above is in audit.db, signed and hash-chained.")
    assert np.isfinite(v.score)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="biotemplate-demo-") as tmp:
        main(Path(tmp))
    sys.exit(0)
