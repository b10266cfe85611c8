"""E-gate verification: 1:1 at a boarding gate, 12-hour retention, purge on a schedule.

Who it is for: an engineer building a "traveller verification service" style flow (a
face captured at check-in is matched 1:1 at the gate, then must not outlive the trip).
It shows the three things such a service owes its travellers:

1. **Purpose and retention are the store's job, not the caller's.** The policy gives the
   purpose a 12-hour limit and default; an enrolment needs no TTL and cannot ask for more.
2. **1:1 only.** The purpose allows "verification" and nothing else: a 1:N search for it is
   refused (and audited as refused), so the gate gallery cannot become a watch list.
3. **Expired means gone.** A record past its expiry is never matched, even before the
   purge; the scheduled purge (here run every simulated hour; in production a cron
   job or systemd timer running ``biotemplate purge STORE --key-file ...`` at least once
   per epoch) shreds it and steps the key ratchet, so older copies of the database cannot
   be read for it either.

Runs as it is (``python examples/egate_verification.py``) on synthetic templates, with an
injected clock so that a day passes in a second. The threshold (0.60) suits the synthetic
data only: calibrate your face model's own (docs/developers.md).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import biotemplate as bt
from biotemplate.synthetic import make_gallery, non_mated, probes

POLICY = """
epoch = "1h"                       # key-shredding granularity: an expired face is unreadable
                                   # in every copy within about an hour of the purge
[purposes.boarding]
description = "1:1 traveller verification at the gate, deleted after the flight"
max_retention = "12h"
default_retention = "12h"
modes = ["verification"]           # 1:1 only: no searching this gallery
match_threshold = 0.60             # synthetic data; calibrate for your model
"""


class Clock:
    """The store's clock, moved by hand so the example can skip hours."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="biotemplate-egate-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    policy = bt.RetentionPolicy.from_toml_string(POLICY)
    keys = bt.FileKeyProvider.generate(work / "master.key")  # off the store's disk in prod
    clock = Clock()
    flight = make_gallery(30, 1, 128, seed=11, prefix="PAX-")  # 30 travellers at check-in
    others = non_mated(flight, 3, seed=12)  # people who did not check in

    with bt.TemplateStore.create(work / "gate", dim=128, model="gate-cam-v1",
                                 policy=policy, key_provider=keys, clock=clock) as store:
        # Check-in desk: one template per traveller; no ttl: the purpose's 12h default.
        store.enroll_many(flight.templates, subject_ids=flight.subject_ids,
                          purposes=["boarding"], source="checkin-desk-3", actor="checkin-3")
        print(f"06:00 check-in: {store.stats().records} travellers enrolled for 12 h")

        # Boarding, two hours later: the gate verifies the boarding-pass holder 1:1.
        clock.now += timedelta(hours=2)
        fresh = probes(flight, [4, 9], seed=5)  # new captures at the gate
        for capture, who in zip(fresh, ["PAX-000004", "PAX-000009"], strict=True):
            v = store.verify(capture, subject_id=who, purpose="boarding", actor="gate-B12")
            print(f"08:00 gate B12: {who} match={v.match} (score {v.score:.2f})")
        impostor = store.verify(others[0], subject_id="PAX-000004", purpose="boarding",
                                actor="gate-B12")
        print(f"08:00 gate B12: someone else on PAX-000004's pass: match={impostor.match}")

        # The gallery cannot be searched: 1:N is not a mode of this purpose.
        try:
            store.search(fresh[0], purpose="boarding", actor="gate-B12")
        except bt.PolicyViolation as exc:
            print(f"08:00 a 1:N search is refused: {exc}")

        # The scheduled purge runs every hour; nothing has expired yet at 17:00.
        for _hour in range(9):
            clock.now += timedelta(hours=1)
            store.purge_expired()
        report = store.retention_report()
        boarding = report.purposes[0]
        print(f"{clock.now:%H:%M} retention report: {boarding.live} live, "
              f"{boarding.expiring_24h} expiring within 24 h, the first at "
              f"{boarding.oldest_expiry:%H:%M}")
        clock.now += timedelta(hours=2)  # 19:00: 13 h after check-in, before the purge
        try:
            store.verify(fresh[0], subject_id="PAX-000004", purpose="boarding",
                         actor="gate-B12")
        except bt.RecordNotFound:
            print(f"{clock.now:%H:%M} PAX-000004 can no longer be verified (expired at "
                  "18:00; not purged yet, never matched all the same)")
        purge = store.purge_expired()
        print(f"{clock.now:%H:%M} purge: {purge.purged} records shredded, "
              f"{purge.subject_keys_destroyed} subject keys destroyed, epoch "
              f"{purge.epoch_before} -> {purge.epoch_after}")
        assert store.stats().records == 0
        assert store.audit.verify().ok
        print("audit trail verifies; every verification and the refused search are in it")


if __name__ == "__main__":
    main()
