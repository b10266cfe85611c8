"""Quickstart: create a store, enrol, search open-set, verify 1:1, erase, reopen.

Who it is for: a developer trying biotemplate for the first time. It is the README's
quickstart as a script that runs as it is (``python examples/quickstart.py``), on
synthetic face-like templates, in a temporary folder it removes at the end.

The thresholds below (0.55, 0.60) suit the synthetic data only: a real face model needs
its own, measured on labelled templates of that model (see docs/architecture.md and the
README). Using a tutorial's threshold with a real model accepts strangers.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import biotemplate as bt
from biotemplate.synthetic import make_gallery, probes, strangers


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="biotemplate-quickstart-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    # The retention policy a compliance engineer writes (usually as TOML): each purpose
    # says how long its records may live, which search modes it allows, and its threshold.
    policy = bt.RetentionPolicy.from_dict({
        "epoch": "1d",  # crypto-shredding granularity: expired data is unreadable within a day
        "purposes": {
            "border-verification": {"max_retention": "12h", "default_retention": "12h",
                                    "modes": ["verification"], "match_threshold": 0.60},
            "watchlist": {"max_retention": "3y",
                          "modes": ["identification", "investigation"],
                          "match_threshold": 0.55, "max_candidates": 20},
        },
    })
    # The master key: a file of mode 0600, kept off the store's disk in production.
    keys = bt.FileKeyProvider.generate(work / "master.key")
    now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def clock() -> datetime:  # optional; the default is the system clock
        return now

    gallery = make_gallery(100, 2, 512, seed=1)  # 100 identities x 2 samples, 512-d
    with bt.TemplateStore.create(work / "faces", dim=512, model="arcface-r100-v1",
                                 policy=policy, key_provider=keys, clock=clock) as store:
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                          purposes=["watchlist"], ttl=timedelta(days=30), actor="svc-enrol")
        store.enroll(probes(gallery, [3])[0], subject_id="T-1",
                     purposes=["border-verification"], actor="egate-7")  # 12h default

        res = store.search(probes(gallery, [7], seed=9)[0], purpose="watchlist", k=10,
                           actor="analyst-17", reason="case 118")
        print(f"identification: decision={res.decision}, "
              f"top={res.candidates[0].subject_id} score={res.candidates[0].score:.3f}")

        nobody = store.search(strangers(1, 512)[0], purpose="watchlist", actor="analyst-17")
        print(f"a stranger: {len(nobody.candidates)} candidates, decision={nobody.decision}"
              "  (open set: no candidate is the right answer)")

        v = store.verify(probes(gallery, [3], seed=5)[0], subject_id="T-1",
                         purpose="border-verification", actor="egate-7")
        print(f"1:1 at the gate: match={v.match} score={v.score:.3f}")

        receipt = store.erase_subject("P-000007", actor="dpo", reason="GDPR Art. 17 req. 55")
        print(f"erasure: {receipt.records_erased} records, key destroyed="
              f"{receipt.key_destroyed}, audit entry {receipt.audit_seq}")
        print(f"audit trail verifies: {store.audit.verify().ok}")

    with bt.TemplateStore.open(work / "faces", key_provider=keys, clock=clock) as store:
        print(f"reopened: {store.stats().records} records, generation "
              f"{store.stats().generation}")


if __name__ == "__main__":
    main()
