"""Child process of the crash suite: open a store, run operations until SIGKILLed.

Usage::

    python worker.py STORE_DIR KEY_FILE START_ISO PLAN_JSON

``START_ISO`` is the fixed aware datetime the injected clock starts from; the clock then
moves forward by ``plan["step_s"]`` seconds before every operation (so epochs pass and
``purge_expired`` steps the ratchet). Each line on stdout is written and flushed:

    READY <epoch> <now_us> <index source: snapshot|rebuild>
    BEGIN enroll_many <now_us> <batch-id> <n> <expiry_us>   (subjects: <batch-id>-sNN)
    ACK enroll_many <batch-id> <n> <expiry_us> <record ids...>
    BEGIN erase <now_us> <subject>           ACK erase <subject> <audit_seq>
    BEGIN delete <now_us> <subject> <rid>    ACK delete <subject> <audit_seq>
    BEGIN purge <now_us> <target_epoch>      ACK purge <epoch_after> <purged> <audit_seq>
    BEGIN snapshot <now_us>                  ACK snapshot <seq>
    BEGIN search <now_us>                    ACK search <audit_seq> <candidates>
    BEGIN set_policy <now_us> <threshold>    ACK set_policy <threshold>
    KEYRING <sha256 of the keyring file>     (seam mode, just before the save that dies)

An ACK line is only written after the call returned. In ``seam`` mode the worker runs
``plan["setup"]`` normally, then arms ``Keyring.save``'s ``before_rename`` seam with a
SIGKILL of itself and runs ``plan["seam_op"]``: it dies inside the keyring save (after
``plan["seam_skip"]`` saves let through), after the temp file is written and fsynced,
before the rename. With ``plan["seam"] == "snapshot"``
it dies the same way inside ``snapshot.write`` (``os.replace`` of a ``.index.snapshot.*`` temp);
with ``plan["seam"] == "stage"`` it dies inside the records transaction of ``seam_op``,
when the key change is staged (``Vault.stage``): after a deletion or erasure saved its
bucket's pending key, before the commit.

The module is also imported by the parent (``batch_templates``, ``subject_ids``), so it
keeps its imports light and does nothing on import.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

DIM = 32
BATCH = 50
PURPOSE = "watchlist"
SOURCE = "case-file-crash"
ACTOR = "crash-worker"
OPS = ("enroll_many", "search", "purge", "erase", "snapshot", "set_policy", "delete")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WEIGHTS = {"enroll_many": 4, "search": 4, "purge": 2, "erase": 2, "snapshot": 1,
           "set_policy": 1, "delete": 1}
TUNED = "rare"  # set_policy flips this purpose's match threshold between two values


def subject_ids(batch_id: str, n: int = BATCH) -> list[str]:
    return [f"{batch_id}-s{i:02d}" for i in range(n)]


def batch_templates(batch_id: str, n: int = BATCH) -> np.ndarray:
    """The templates of a batch, derived from its id alone (the parent regenerates them)."""
    rng = np.random.default_rng(zlib.crc32(batch_id.encode()))
    return rng.standard_normal((n, DIM)).astype(np.float32)


def subject_template(subject: str) -> np.ndarray:
    batch_id, _, tail = subject.rpartition("-s")
    return batch_templates(batch_id)[int(tail)]


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _us(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, store_dir: str, key_file: str, start: datetime,
                 plan: dict[str, Any]) -> None:
        import biotemplate as bt  # after argv parsing: the parent imports helpers only

        self.bt = bt
        self.plan = plan
        self.clock = Clock(start)
        self.step = timedelta(seconds=plan.get("step_s", 7200))
        self.rng = random.Random(plan.get("seed", 0))
        self.store = bt.TemplateStore.open(store_dir, key_provider=bt.FileKeyProvider(key_file),
                                           clock=self.clock, snapshot_on_close=False)
        self.epoch_us = self.store.stats().epoch_seconds * 1_000_000
        opened = self.store.audit.get(self.store.audit.checkpoint().seq)
        self.source = opened.fields.get("index") if opened.event == "open" else "?"
        self.candidates: list[str] = list(plan.get("erase_candidates", []))
        # subject -> (its record, expiry), enrolled by this worker
        self.records: dict[str, tuple[str, int]] = {}
        self.probes: list[str] = list(plan.get("probe_subjects", []))
        self.batches = 0

    # --- operations ----------------------------------------------------------------------

    def tick(self) -> int:
        self.clock.now += self.step
        return _us(self.clock.now)

    def enroll_many(self) -> None:
        now = self.tick()
        batch_id = f"{self.plan['prefix']}b{self.batches:04d}"
        self.batches += 1
        ttl = timedelta(seconds=self.rng.choice(self.plan.get("ttls_s", [86400, 864000])))
        expiry = now + ttl // timedelta(microseconds=1)
        sids = subject_ids(batch_id)
        say("BEGIN enroll_many", now, batch_id, len(sids), expiry)
        ids = self.store.enroll_many(batch_templates(batch_id), subject_ids=sids,
                                     purposes=[PURPOSE], ttl=ttl, source=SOURCE, actor=ACTOR)
        say("ACK enroll_many", batch_id, len(ids), expiry, *ids)
        self.candidates.extend(sids)
        self.probes.extend(sids[:3])
        self.records.update((s, (rid, expiry)) for s, rid in zip(sids, ids, strict=True))

    def erase(self) -> None:
        if not self.candidates:
            return self.search()
        subject = self.candidates.pop(self.rng.randrange(len(self.candidates)))
        now = self.tick()
        say("BEGIN erase", now, subject)
        receipt = self.store.erase_subject(subject, actor=ACTOR, reason="crash suite")
        say("ACK erase", subject, receipt.audit_seq)
        return None

    def delete(self) -> None:
        """Delete one record (not expired: a purge may have taken those): each subject has
        one, so it is the subject's last."""
        now = self.tick()
        known = [s for s in self.candidates if s in self.records
                 and self.records[s][1] > now + self.step // timedelta(microseconds=1)]
        if not known:
            return self.search()
        subject = known[self.rng.randrange(len(known))]
        self.candidates.remove(subject)
        rid = self.records.pop(subject)[0]
        say("BEGIN delete", now, subject, rid)
        receipt = self.store.delete(rid, actor=ACTOR, reason="crash suite")
        say("ACK delete", subject, receipt.audit_seq)
        return None

    def purge(self) -> None:
        now = self.tick()
        say("BEGIN purge", now, now // self.epoch_us)
        report = self.store.purge_expired()
        say("ACK purge", report.epoch_after, report.purged, report.audit_seq)

    def snapshot(self) -> None:
        now = self.tick()
        say("BEGIN snapshot", now)
        seq = self.store.snapshot().change_seq
        say("ACK snapshot", seq)

    def search(self) -> None:
        now = self.tick()
        if self.probes and self.rng.random() < 0.7:
            probe = subject_template(self.rng.choice(self.probes))
        else:
            probe = np.asarray([self.rng.gauss(0, 1) for _ in range(DIM)], dtype=np.float32)
        say("BEGIN search", now)
        res = self.store.search(probe, purpose=PURPOSE, k=5, actor=ACTOR, reason="crash suite",
                                mode="investigation")
        say("ACK search", res.audit_seq, len(res.candidates))

    def set_policy(self) -> None:
        now = self.tick()
        policy = self.store.policy.to_dict()
        rule = policy["purposes"][TUNED]
        rule["match_threshold"] = 0.6 if rule["match_threshold"] == 0.5 else 0.5
        say("BEGIN set_policy", now, rule["match_threshold"])
        self.store.set_policy(self.bt.RetentionPolicy.from_dict(policy), actor=ACTOR,
                              reason="crash suite")
        say("ACK set_policy", rule["match_threshold"])

    # --- modes ---------------------------------------------------------------------------

    def loop(self) -> None:
        focus = self.plan.get("focus")
        weights = [WEIGHTS[op] * (6 if op == focus else 1) for op in OPS]
        say("READY", self.store.stats().epoch, _us(self.clock.now), self.source)
        limit = self.plan.get("max_ops")
        done = 0
        while limit is None or done < limit:
            getattr(self, self.rng.choices(OPS, weights)[0])()
            done += 1
        self.store.close()
        say("DONE")

    def seam(self) -> None:
        say("READY", self.store.stats().epoch, _us(self.clock.now), self.source)
        for op in self.plan.get("setup", []):
            getattr(self, op)()
        self.clock.now += timedelta(seconds=self.plan.get("advance_s", 0))
        keyring = Path(self.plan["keyring"])
        skip = [self.plan.get("seam_skip", 0)]  # keyring saves let through before dying

        def die() -> None:
            say("RENAME-SEAM")
            os.kill(os.getpid(), signal.SIGKILL)

        if self.plan.get("seam") == "stage":  # inside the transaction, pending key saved
            from biotemplate.vault import Vault

            stage = Vault.stage

            def dying_stage(self: Any, **kwargs: Any) -> int:
                if kwargs.get("rotate"):
                    say("KEYRING", hashlib.sha256(keyring.read_bytes()).hexdigest())
                    die()
                return stage(self, **kwargs)

            Vault.stage = dying_stage  # type: ignore[method-assign]
        elif self.plan.get("seam", "keyring") == "keyring":
            from biotemplate.keyring import Keyring

            original = Keyring.save

            def armed(self: Any, path: Path, master_key: Any, before_rename: Any = None) -> None:
                if skip[0] > 0:
                    skip[0] -= 1
                    original(self, path, master_key)
                    return
                say("KEYRING", hashlib.sha256(keyring.read_bytes()).hexdigest())
                original(self, path, master_key, before_rename=die)

            Keyring.save = armed  # type: ignore[method-assign]
        else:  # "snapshot": die between the fsynced temp snapshot and its rename
            say("KEYRING", hashlib.sha256(keyring.read_bytes()).hexdigest())
            replace = os.replace

            def dying_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
                if Path(src).name.startswith(".index.snapshot."):
                    die()
                replace(src, dst, *args, **kwargs)

            os.replace = dying_replace
        getattr(self, self.plan["seam_op"])()
        say("SURVIVED")  # the seam did not fire: the parent fails the test


def main(argv: list[str]) -> None:
    store_dir, key_file, start_iso, plan_file = argv[1:5]
    plan = json.loads(Path(plan_file).read_text())
    worker = Worker(store_dir, key_file, datetime.fromisoformat(start_iso), plan)
    if plan.get("mode") == "seam":
        worker.seam()
    else:
        worker.loop()


if __name__ == "__main__":
    main(sys.argv)
