"""Crash suite (SECURITY.md §5): SIGKILL a child working on a store, reopen, check.

A child (``worker.py``, run with ``sys.executable``) opens a store the parent created and
runs enroll_many (batches of 50 distinctive subjects), erase_subject, delete (a subject's
only record), purge_expired (its clock moves 4 h per call, so the 1-day ratchet steps),
snapshot and search in a seeded random loop, printing an ``ACK`` line only after each
call returned. The parent kills it
with SIGKILL after a seeded random delay, reopens the store and checks:

- the keyring loads, and its ratchet epoch is the last acknowledged one or the target of
  the purge in flight (never both/neither state; leftover ``.keyring.*`` temp files do not
  stop the reopen);
- every acknowledged batch is fully present with the acknowledged record ids (rows, and
  searchable while unexpired); no batch is partial (each batch's live subjects have all
  or none of their rows), an unacknowledged batch stays gone, a purged one too;
- acknowledged erasures and deletions are erased (no row, no subject-key entry in
  records.db, ``export_subject`` is empty); every live subject's entry lists its record;
- no row is unreadable (``shredded_rows`` and ``integrity_failures`` are 0);
- ``audit.verify().ok`` and every acknowledged audit seq holds the right event;
- the store keeps working (enrol + search after reopen).

The ratchet crash window is also hit deterministically, through ``Keyring.save``'s
``before_rename`` seam: the child dies after the temp keyring is fsynced, before the rename;
so is the bucket rotation of a deletion or erasure: killed in the save of the pending key,
inside the records transaction (pending key saved, nothing committed), and in the save
after the commit.

Reproduce a run with ``BIOTEMPLATE_CRASH_SEED=<seed>`` (printed in every failure).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import biotemplate as bt
from biotemplate import snapshot, streaming
from biotemplate.keyring import Keyring
from biotemplate.subject_keys import Entry, open_entry

WORKER = Path(__file__).with_name("worker.py")
_spec = importlib.util.spec_from_file_location("biotemplate_crash_worker", WORKER)
assert _spec is not None and _spec.loader is not None
wk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wk)

SEED = int(os.environ.get("BIOTEMPLATE_CRASH_SEED", "20260101"))
START = datetime(2026, 1, 1, tzinfo=UTC)
_EPOCH0 = datetime(1970, 1, 1, tzinfo=UTC)
STEP_S = 4 * 3600  # the worker's clock step per call: 6 calls per 1-day epoch
DAY_S = 86400
TTLS_S = [DAY_S, DAY_S, 10 * DAY_S]  # most batches expire (and get purged) within a run
MODEL = "crash-model-v1"
MAX_DELAY_S = 0.8
READY_TIMEOUT_S = 60.0


def _us(t: datetime) -> int:
    return (t - _EPOCH0) // timedelta(microseconds=1)


def _dt(us: int) -> datetime:
    return _EPOCH0 + timedelta(microseconds=us)


# --- the child ----------------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def text(self) -> str:
        return self.out.read_text()

    def lines(self) -> list[list[str]]:
        """Complete lines only: a line cut by the kill (no newline) was never acknowledged."""
        return [line.split() for line in self.text().split("\n")[:-1]]

    def stderr(self) -> str:
        return self.err.read_text()[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.text().startswith("READY"):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited ({self.proc.returncode}) before READY:\n"
                            f"{self.stderr()}")
            time.sleep(0.005)
        self.kill()
        pytest.fail(f"worker not READY after {READY_TIMEOUT_S} s")

    def kill(self) -> bool:
        """SIGKILL it; True if it was still running (not dead of its own accord)."""
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return alive


def spawn(store_dir: Path, key_file: Path, start_us: int, plan: dict[str, Any],
          work: Path, name: str) -> Child:
    plan_file = work / f"{name}.json"
    plan_file.write_text(json.dumps(plan))
    out, err = work / f"{name}.out", work / f"{name}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(store_dir), str(key_file),
             _dt(start_us).isoformat(), str(plan_file)],
            stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, close_fds=True)
    return Child(proc, out, err)


# --- what the parent knows ------------------------------------------------------------------


@dataclass
class Batch:
    batch_id: str
    expiry_us: int
    acked: bool
    record_ids: list[str] | None = None  # per subject, once acknowledged or seen committed
    gone: bool = False  # never committed, or purged: must stay absent

    @property
    def subjects(self) -> list[str]:
        return wk.subject_ids(self.batch_id)


@dataclass
class Model:
    epoch: int
    max_now: int
    batches: dict[str, Batch] = field(default_factory=dict)
    erased: set[str] = field(default_factory=set)  # acknowledged: no rows, no key
    erased_rows: set[str] = field(default_factory=set)  # in flight, committed: no rows
    purge_now: int = 0  # newest 'now' of any purge that began: older expiries may be gone
    threshold: float = 0.0  # match threshold of wk.TUNED in the last acknowledged policy
    stats: Counter[str] = field(default_factory=Counter)

    def dead(self, subject: str) -> bool:
        return subject in self.erased or subject in self.erased_rows


@dataclass
class Run:
    """What one child did, from its output."""

    ready_epoch: int | None = None
    inflight: list[str] | None = None  # the BEGIN line without an ACK
    acked_seqs: list[tuple[int, str]] = field(default_factory=list)
    acked_erasures: list[str] = field(default_factory=list)
    acked_batches: list[str] = field(default_factory=list)
    acks: Counter[str] = field(default_factory=Counter)


def apply_output(model: Model, lines: list[list[str]], where: str) -> Run:
    run = Run()
    pending: list[str] | None = None
    for parts in lines:
        tag = parts[0]
        if tag == "READY":
            run.ready_epoch = int(parts[1])
            assert run.ready_epoch == model.epoch, f"{where}: opened at epoch {parts[1]}"
            model.stats[f"worker_open_from_{parts[3]}"] += 1
            continue
        if tag == "BEGIN":
            pending = parts
            op, now = parts[1], int(parts[2])
            model.max_now = max(model.max_now, now)
            if op == "enroll_many":
                model.batches[parts[3]] = Batch(parts[3], int(parts[5]), acked=False)
            elif op == "purge":
                model.purge_now = max(model.purge_now, now)
            continue
        if tag != "ACK":
            continue
        op = parts[1]
        assert pending is not None and pending[1] == op, f"{where}: ACK without BEGIN {parts}"
        pending = None
        run.acks[op] += 1
        if op == "enroll_many":
            batch = model.batches[parts[2]]
            batch.acked, batch.record_ids = True, parts[5:]
            run.acked_batches.append(batch.batch_id)
            assert len(batch.record_ids) == int(parts[3]) == wk.BATCH
        elif op in ("erase", "delete"):  # a delete removes the subject's only record
            model.erased.add(parts[2])
            run.acked_erasures.append(parts[2])
            run.acked_seqs.append((int(parts[3]), op))
        elif op == "purge":
            assert int(parts[2]) >= model.epoch, f"{where}: ratchet went back: {parts}"
            model.epoch = int(parts[2])
            run.acked_seqs.append((int(parts[4]), "purge"))
        elif op == "search":
            run.acked_seqs.append((int(parts[2]), "search"))
        elif op == "set_policy":
            model.threshold = float(parts[2])
    run.inflight = pending
    return run


def read_rows(store_dir: Path) -> dict[bytes, list[str]]:
    """subject ref -> record ids, read straight from records.db (read-only)."""
    uri = f"{(store_dir / 'records.db').absolute().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        out: dict[bytes, list[str]] = {}
        for ref, rid in conn.execute("SELECT subject_ref, record_id FROM records ORDER BY seq"):
            out.setdefault(bytes(ref), []).append(rid)
        return out
    finally:
        conn.close()


def read_entries(store_dir: Path, ring: Keyring) -> dict[bytes, Entry]:
    """subject ref -> its key entry, read straight from records.db and opened with
    ``ring`` (raises IntegrityError if one does not open: the crash lost a bucket key)."""
    uri = f"{(store_dir / 'records.db').absolute().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        rows = conn.execute("SELECT bucket, subject_ref, blob FROM subject_keys").fetchall()
    finally:
        conn.close()
    return {bytes(ref): open_entry(ring, bucket, bytes(ref), bytes(blob))
            for bucket, ref, blob in rows}


def leftovers(store_dir: Path, prefix: str) -> list[Path]:
    return sorted(p for p in store_dir.iterdir() if p.name.startswith(prefix))


# --- the checks after a crash ---------------------------------------------------------------


def check_batches(model: Model, ring: Keyring, rows: dict[bytes, list[str]],
                  entries: dict[bytes, Entry], run: Run, where: str,
                  rng: random.Random) -> list[tuple[Batch, list[str]]]:
    """Row-level checks of every batch ever begun; returns (batch, subjects) to search:
    every live subject of the batches acknowledged or committed in this run, a sample of
    the older ones (they were searched in full after an earlier crash)."""
    inflight_batch = (run.inflight[3] if run.inflight and run.inflight[1] == "enroll_many"
                      else None)
    searchable: list[tuple[Batch, list[str]]] = []
    for batch in model.batches.values():
        live = [s for s in batch.subjects if not model.dead(s)]
        present = [s for s in live if ring.subject_ref(s) in rows]
        if present and len(present) != len(live):
            model.stats["partial_batches"] += 1
            pytest.fail(f"{where}: partial batch {batch.batch_id}: {len(present)} of "
                        f"{len(live)} live subjects have rows")
        if batch.gone:
            assert not present, f"{where}: batch {batch.batch_id} came back"
            continue
        if not batch.acked:
            assert batch.batch_id == inflight_batch, f"{where}: stray batch {batch.batch_id}"
            if present:
                batch.acked = True
                batch.record_ids = [rows[ring.subject_ref(s)][0] for s in batch.subjects]
                model.stats["inflight_enrol_committed"] += 1
            else:
                batch.gone = True
                model.stats["inflight_enrol_absent"] += 1
                continue
        assert batch.record_ids is not None
        expected = {s: rid for s, rid in zip(batch.subjects, batch.record_ids, strict=True)
                    if not model.dead(s)}
        if not present and live:
            if batch.expiry_us <= model.purge_now:
                batch.gone = True  # purged: legitimately gone, and must stay so
                model.stats["batches_purged"] += 1
                continue
            pytest.fail(f"{where}: acknowledged batch {batch.batch_id} (expiry "
                        f"{_dt(batch.expiry_us)}) is missing")
        epoch = batch.expiry_us // ring.epoch_us  # the epoch key its rows are sealed under
        for s, rid in expected.items():
            ref = ring.subject_ref(s)
            assert rows[ref] == [rid], f"{where}: {s} has rows {rows[ref]}, acknowledged {rid}"
            # Readable: its subject key and its epoch key still exist, and its entry lists it.
            assert ref in entries, f"{where}: live {s} lost its subject key"
            assert bytes.fromhex(rid) in entries[ref].ids, f"{where}: {s}'s record unlisted"
        assert epoch >= ring.ratchet_epoch, (
            f"{where}: rows of {batch.batch_id} survive in shredded epoch {epoch}")
        model.stats["acked_batches_checked"] += 1
        if batch.expiry_us > model.max_now and expected:
            fresh = batch.batch_id in run.acked_batches or batch.batch_id == inflight_batch
            live_now = sorted(expected)
            searchable.append((batch, live_now if fresh else
                               rng.sample(live_now, min(3, len(live_now)))))
    return searchable


def check_erasures(model: Model, ring: Keyring, rows: dict[bytes, list[str]],
                   entries: dict[bytes, Entry], run: Run, where: str) -> None:
    if run.inflight and run.inflight[1] in ("erase", "delete"):
        subject = run.inflight[3]
        if ring.subject_ref(subject) in rows:
            model.stats["inflight_erase_rolled_back"] += 1
        else:
            model.erased_rows.add(subject)
            model.stats["inflight_erase_committed"] += 1
    for subject in model.erased:
        ref = ring.subject_ref(subject)
        assert ref not in rows, f"{where}: acknowledged erasure of {subject} has rows"
        assert ref not in entries, f"{where}: erased {subject} still has a subject key"


def phantom_audit(store: bt.TemplateStore, model: Model, ring: Keyring,
                  rows: dict[bytes, list[str]], run: Run) -> None:
    """Count mutations the audit trail reports 'ok' although the crash rolled them back
    (the audit entry commits before the records transaction). Reported, not failed:
    SECURITY.md promises no partial data, not an audit without such entries."""
    if not run.inflight or run.inflight[1] not in ("enroll_many", "erase"):
        return
    seq = store.audit.checkpoint().seq
    all_ids = {rid for ids in rows.values() for rid in ids}
    known = {rid for b in model.batches.values() if b.acked for rid in b.record_ids or ()}
    for s in range(seq, max(seq - 8, 0), -1):
        entry = store.audit.get(s)
        if entry.actor != wk.ACTOR:
            continue
        if entry.outcome != "ok":
            return
        if entry.event == "enroll" and run.inflight[1] == "enroll_many":
            batch = model.batches[run.inflight[3]]
            ids = list(entry.fields.get("record_ids", []))
            if batch.gone and ids and not set(ids) & (all_ids | known):
                model.stats["audit_ok_but_enrol_rolled_back"] += 1
        elif entry.event == "erase" and run.inflight[1] == "erase":
            subject = run.inflight[3]
            if (entry.fields.get("subject_ref") == ring.subject_ref(subject).hex()
                    and subject not in model.erased_rows):
                model.stats["audit_ok_but_erase_rolled_back"] += 1
        return


def check_search(store: bt.TemplateStore, batches: list[tuple[Batch, list[str]]],
                 model: Model, where: str) -> None:
    """Each subject's own template finds its acknowledged record first."""
    for batch, subjects in batches:
        assert batch.record_ids is not None
        wanted = set(subjects)
        pairs = [(i, s) for i, s in enumerate(batch.subjects) if s in wanted]
        probes = wk.batch_templates(batch.batch_id)[[i for i, _ in pairs]]
        results = store.search_many(probes, purpose=wk.PURPOSE, k=1, actor="crash-checker",
                                    mode="investigation")
        for (i, s), res in zip(pairs, results, strict=True):
            top = res.candidates[0] if res.candidates else None
            assert top is not None and top.record_id == batch.record_ids[i] \
                and top.subject_id == s, f"{where}: {s} of {batch.batch_id} not searchable"
        model.stats["records_searched"] += len(pairs)


def verify_after_crash(store_dir: Path, keys: bt.FileKeyProvider, model: Model, run: Run,
                       where: str, parent_batch: str, rng: random.Random) -> None:
    kek = keys.master_key()
    for prefix in (".keyring.", ".index.snapshot."):  # they must not stop the reopen below
        model.stats[f"{prefix.strip('.')}_temps_left"] = len(leftovers(store_dir, prefix))
    allowed = {model.epoch}
    if run.inflight and run.inflight[1] == "purge":
        allowed.add(max(model.epoch, int(run.inflight[3])))
    ring = Keyring.load(store_dir / "keyring", kek)  # raises if neither/half a keyring
    assert ring.ratchet_epoch in allowed, (
        f"{where}: keyring at epoch {ring.ratchet_epoch}, expected one of {allowed}")

    reopen = _dt(model.max_now)
    store = bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: reopen)
    try:
        # open completes a key change that committed before its keyring save (a purge's
        # ratchet step among them): the keyring after open is the one to check against
        ring = Keyring.load(store_dir / "keyring", kek)
        assert ring.ratchet_epoch in allowed, f"{where}: after open at {ring.ratchet_epoch}"
        if ring.ratchet_epoch != model.epoch:
            model.stats["inflight_ratchet_step_kept"] += 1
        model.epoch = ring.ratchet_epoch
        stats = store.stats()
        assert stats.epoch == ring.ratchet_epoch
        # The policy is the last acknowledged one, or the one of the change in flight.
        threshold = store.policy.purposes[wk.TUNED].match_threshold
        allowed_policies = {model.threshold}
        if run.inflight and run.inflight[1] == "set_policy":
            allowed_policies.add(float(run.inflight[3]))
        assert threshold in allowed_policies, f"{where}: policy {threshold} {allowed_policies}"
        if threshold != model.threshold:
            model.stats["inflight_policy_change_kept"] += 1
        model.threshold = threshold
        assert len(Keyring.load(store_dir / "keyring", kek).policies) <= 1  # settled on open
        assert stats.shredded_rows == 0, f"{where}: rows whose key is gone: {stats}"
        assert stats.integrity_failures == 0, f"{where}: {stats}"
        report = store.audit.verify()
        assert report.ok, f"{where}: audit: {report.problems}"
        head = store.audit.get(store.audit.checkpoint().seq)
        model.stats[f"open_from_{head.fields.get('index')}"] += 1
        for seq, event in run.acked_seqs:
            assert store.audit.get(seq).event == event, f"{where}: audit seq {seq}"
        rows = read_rows(store_dir)
        entries = read_entries(store_dir, ring)
        assert stats.missing_rows == 0, f"{where}: {stats}"
        assert not ring.pending, f"{where}: a pending bucket key outlived the open"
        check_erasures(model, ring, rows, entries, run, where)
        searchable = check_batches(model, ring, rows, entries, run, where, rng)
        phantom_audit(store, model, ring, rows, run)
        check_search(store, searchable, model, where)
        for subject in run.acked_erasures[-5:]:
            assert store.export_subject(subject, actor="crash-checker") == [], where
            res = store.search(wk.subject_template(subject), purpose=wk.PURPOSE, k=5,
                               actor="crash-checker", mode="investigation")
            assert all(c.subject_id != subject for c in res.candidates), where
        # The store keeps working: enrol a batch of our own, find it again.
        ids = store.enroll_many(wk.batch_templates(parent_batch),
                                subject_ids=wk.subject_ids(parent_batch),
                                purposes=[wk.PURPOSE], ttl=timedelta(days=10),
                                source=wk.SOURCE, actor="crash-checker")
        batch = Batch(parent_batch, model.max_now + 10 * DAY_S * 10**6, acked=True,
                      record_ids=ids)
        model.batches[parent_batch] = batch
        check_search(store, [(batch, rng.sample(batch.subjects, 5))], model, where)
    finally:
        store.close()


# --- the random kill loop -------------------------------------------------------------------


def _fresh_store(tmp_path: Path, keys: bt.FileKeyProvider,
                 policy: bt.RetentionPolicy) -> tuple[Path, Path, Model]:
    """An empty store (created and closed), a work folder, and the model that tracks it."""
    store_dir, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    bt.TemplateStore.create(store_dir, dim=wk.DIM, model=MODEL, policy=policy,
                            key_provider=keys, clock=lambda: START).close()
    ring = Keyring.load(store_dir / "keyring", keys.master_key())
    model = Model(epoch=ring.ratchet_epoch, max_now=_us(START),
                  threshold=policy.purposes[wk.TUNED].match_threshold)
    return store_dir, work, model


def crash_loop(tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy,
               iterations: int, seed: int) -> Counter[str]:
    store_dir, work, model = _fresh_store(tmp_path, keys, policy)
    rng = random.Random(seed)
    t0 = time.monotonic()
    for it in range(iterations):
        where = f"seed={seed} iteration={it}"
        live = [b for b in model.batches.values()
                if not b.gone and b.acked and b.expiry_us > model.max_now + 2 * DAY_S * 10**6]
        candidates = [s for b in live for s in b.subjects if not model.dead(s)]
        plan = {
            "mode": "loop", "prefix": f"i{it:03d}", "seed": rng.randrange(2**32),
            "focus": wk.OPS[it % len(wk.OPS)], "step_s": STEP_S, "ttls_s": TTLS_S,
            "erase_candidates": rng.sample(candidates, min(len(candidates), 100)),
            "probe_subjects": rng.sample(candidates, min(len(candidates), 30)),
        }
        child = spawn(store_dir, keys.path, model.max_now + STEP_S * 10**6, plan, work,
                      f"it{it:03d}")
        child.wait_ready()
        time.sleep(rng.uniform(0.0, MAX_DELAY_S))
        alive = child.kill()
        assert alive, f"{where}: the worker died by itself:\n{child.stderr()}"
        assert child.proc.returncode == -signal.SIGKILL
        run = apply_output(model, child.lines(), where)
        assert run.ready_epoch is not None, where
        model.stats["kills"] += 1
        model.stats[f"killed_in_{run.inflight[1] if run.inflight else 'between_calls'}"] += 1
        model.stats["acked_calls"] += sum(run.acks.values())
        for op, n in run.acks.items():
            model.stats[f"acked_{op}"] += n
        verify_after_crash(store_dir, keys, model, run, where, f"i{it:03d}parent", rng)
    model.stats["seconds"] = round(time.monotonic() - t0)
    return model.stats


def _report(name: str, stats: Counter[str]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))


def test_crash_loop(tmp_path: Path, keys: bt.FileKeyProvider,
                    policy: bt.RetentionPolicy) -> None:
    stats = crash_loop(tmp_path, keys, policy, iterations=6, seed=SEED)
    _report("crash loop", stats)
    assert stats["kills"] == 6 and stats["partial_batches"] == 0
    assert stats["acked_enroll_many"] > 0 and stats["acked_batches_checked"] > 0


@pytest.mark.slow
def test_crash_loop_many(tmp_path: Path, keys: bt.FileKeyProvider,
                         policy: bt.RetentionPolicy) -> None:
    stats = crash_loop(tmp_path, keys, policy, iterations=60, seed=SEED + 1)
    _report("crash loop (slow)", stats)
    assert stats["kills"] == 60 and stats["partial_batches"] == 0
    for op in wk.OPS:
        assert stats[f"acked_{op}"] > 0, f"no {op} was ever acknowledged"


# --- the ratchet crash window, deterministically (before_rename seam) -----------------------


def seam_crash(tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy,
               seam_op: str, seam: str = "keyring",
               skip: int = 0) -> tuple[Path, Model, Run, list[list[str]]]:
    """Create a store, let a child enrol two batches, then die in the keyring save (or
    the snapshot write) of ``seam_op`` right before the rename."""
    store_dir, work, model = _fresh_store(tmp_path, keys, policy)
    ttl = DAY_S // 2 if seam_op == "purge" else 10 * DAY_S  # purge shreds the setup batches
    plan = {"mode": "seam", "prefix": "seam", "seed": SEED, "step_s": 600, "ttls_s": [ttl],
            "setup": ["enroll_many", "enroll_many"], "seam_op": seam_op,
            "advance_s": 2 * DAY_S if seam_op == "purge" else 0, "seam": seam,
            "seam_skip": skip,
            "keyring": str(store_dir / "keyring")}
    child = spawn(store_dir, keys.path, model.max_now + 60 * 10**6, plan, work,
                  f"{seam}-{seam_op}")
    child.proc.wait(timeout=120)
    lines = child.lines()
    assert child.proc.returncode == -signal.SIGKILL, (
        f"the seam did not kill the worker ({child.proc.returncode}):\n{child.stderr()}")
    assert ["RENAME-SEAM"] in lines, child.text()
    run = apply_output(model, lines, f"seam {seam_op}")
    assert run.inflight is not None and run.inflight[1] == seam_op, lines[-3:]
    assert run.acks["enroll_many"] == 2
    return store_dir, model, run, lines


@pytest.mark.parametrize(("seam_op", "skip"), [
    ("purge", 0),
    pytest.param("set_policy", 0, id="set_policy-before-commit"),
    pytest.param("set_policy", 1, id="set_policy-after-commit"),
])
def test_keyring_rename_window(tmp_path: Path, keys: bt.FileKeyProvider,
                               policy: bt.RetentionPolicy, seam_op: str, skip: int) -> None:
    store_dir, model, run, lines = seam_crash(tmp_path, keys, policy, seam_op, skip=skip)
    kek = keys.master_key()
    digest = next(p[1] for p in lines if p[0] == "KEYRING")
    # The old keyring is intact, byte for byte; the new one exists only as a temp file.
    assert hashlib.sha256((store_dir / "keyring").read_bytes()).hexdigest() == digest
    old = Keyring.load(store_dir / "keyring", kek)
    temps = leftovers(store_dir, ".keyring.")
    assert len(temps) == 1, temps
    new = Keyring.from_bytes(temps[0].read_bytes(), kek)  # fully written and fsynced
    setup = [b for b in model.batches.values() if b.acked]
    assert len(setup) == 2
    if seam_op == "purge":
        target = int(run.inflight[3])  # type: ignore[index]
        assert target > old.ratchet_epoch
        assert (old.ratchet_epoch, new.ratchet_epoch) == (model.epoch, target)
    else:
        # Before the commit the keyring gains the new policy's digest beside the old one;
        # after it, it keeps only the new one.
        assert (len(old.policies), len(new.policies)) == ((1, 2) if skip == 0 else (2, 1))

    reopen = _dt(model.max_now)
    store = bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: reopen)
    try:
        stats = store.stats()
        # A purge committed before the keyring save: records.db names the key change it
        # staged, and open completes it (the audit says so: "rollforward").
        rolled = seam_op == "purge" or skip != 0
        assert stats.epoch == (new.ratchet_epoch if seam_op == "purge" else old.ratchet_epoch)
        assert stats.shredded_rows == 0 and stats.integrity_failures == 0, stats
        assert store.audit.verify().ok
        events = [store.audit.get(n).event for n in range(1, store.audit.verify().entries + 1)]
        assert ("rollforward" in events) == rolled
        if seam_op == "purge":
            # rows gone, and their subject keys with them (the purge deleted their entries
            # in its transaction; the ratchet step was completed on open)
            assert stats.records == 0 and stats.subjects == 0
            report = store.purge_expired()
            assert report.epoch_after == int(run.inflight[3])  # type: ignore[index]
            assert report.subject_keys_destroyed == 0
        else:
            # Killed before the commit: the old policy; after it: the new one. Either way
            # the store opens and the keyring settles on the policy that is stored.
            wanted = model.threshold if skip == 0 else float(run.inflight[3])  # type: ignore[index]
            assert store.policy.purposes[wk.TUNED].match_threshold == wanted
            assert len(Keyring.load(store_dir / "keyring", kek).policies) == 1
            assert stats.records == 2 * wk.BATCH
            check_search(store, [(b, b.subjects) for b in setup], model, f"seam {seam_op}")
        # The store keeps working.
        ids = store.enroll_many(wk.batch_templates("after"), subject_ids=wk.subject_ids("after"),
                                purposes=[wk.PURPOSE], ttl=timedelta(days=10),
                                source=wk.SOURCE, actor="crash-checker")
        after = Batch("after", 0, True, ids)
        check_search(store, [(after, after.subjects)], model, f"seam {seam_op}")
        assert store.audit.verify().ok
    finally:
        store.close()


# where a deletion or erasure dies: (seam, keyring saves let through first)
ROTATION_WINDOWS = {
    "pending-save": ("keyring", 0),  # inside the save of the bucket's next key
    "in-transaction": ("stage", 0),  # next key saved; the transaction never commits
    "final-save": ("keyring", 1),  # committed; inside the save that makes the key current
}


@pytest.mark.parametrize("window", list(ROTATION_WINDOWS))
@pytest.mark.parametrize("op", ["erase", "delete"])
def test_rotation_window(tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy,
                         op: str, window: str) -> None:
    """A deletion or erasure saves its bucket's next key (pending), commits the rows, the
    entries resealed under it and the staged rotation, then saves the keyring with the
    key made current. Killed anywhere in that, the store opens with every entry readable
    under the current keys, no pending key left, and the call either fully done (the old
    bucket key gone: roll-forward) or not done at all."""
    seam, skip = ROTATION_WINDOWS[window]
    store_dir, model, run, lines = seam_crash(tmp_path, keys, policy, op, seam=seam, skip=skip)
    assert run.inflight is not None
    kek = keys.master_key()
    subject = run.inflight[3]
    committed = window == "final-save"
    digest = next(p[1] for p in lines if p[0] == "KEYRING")
    assert hashlib.sha256((store_dir / "keyring").read_bytes()).hexdigest() == digest
    old = Keyring.load(store_dir / "keyring", kek)
    ref = old.subject_ref(subject)
    bucket = old.bucket_of(ref)
    temps = leftovers(store_dir, ".keyring.")
    if window == "in-transaction":  # the pending key was saved, nothing after it
        assert not temps and set(old.pending) == {bucket}
    else:
        assert len(temps) == 1, temps
        new = Keyring.from_bytes(temps[0].read_bytes(), kek)
        if window == "pending-save":
            assert not old.pending and set(new.pending) == {bucket}
            assert (new.buckets, new.generation) == (old.buckets, old.generation)
        else:
            assert new.buckets[bucket] == old.pending[bucket] != old.buckets[bucket]
            assert (new.erasures, new.generation) == (old.erasures + 1, old.generation + 1)
            assert not new.pending
    assert (ref in read_rows(store_dir)) != committed
    setup = [b for b in model.batches.values() if b.acked]

    reopen = _dt(model.max_now)
    store = bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: reopen)
    try:
        ring = Keyring.load(store_dir / "keyring", kek)
        assert not ring.pending  # promoted, or discarded
        stats = store.stats()
        assert (stats.shredded_rows, stats.integrity_failures, stats.missing_rows) == (0, 0, 0)
        assert store.audit.verify().ok
        events = [store.audit.get(n).event for n in range(1, store.audit.verify().entries + 1)]
        assert ("rollforward" in events) == committed
        entries = read_entries(store_dir, ring)  # every entry opens with the current keys
        if committed:
            assert ring.buckets[bucket] == old.pending[bucket]  # the old key is gone
            assert stats.erasure_generation == old.erasures + 1
            assert ref not in entries and stats.records == 2 * wk.BATCH - 1
            assert store.export_subject(subject, actor="crash-checker") == []
            model.erased_rows.add(subject)
        else:
            assert ring.buckets == old.buckets and stats.erasure_generation == old.erasures
            assert ref in entries and stats.records == 2 * wk.BATCH
            assert len(store.export_subject(subject, actor="crash-checker")) == 1
        check_search(store, [(b, [s for s in b.subjects if not model.dead(s)])
                             for b in setup], model, f"{op} {window}")
        # The store keeps working: the call can be made (again), and nothing is left.
        receipt = store.erase_subject(subject, actor="crash-checker")
        assert receipt.key_destroyed != committed
        assert receipt.records_erased == (0 if committed else 1)
        assert ref not in read_entries(store_dir, Keyring.load(store_dir / "keyring", kek))
        report = store.purge_expired()  # nothing left to sweep
        assert report.subject_keys_destroyed == 0 and report.purged == 0
        assert store.audit.verify().ok
    finally:
        store.close()


def test_enrolment_never_saves_the_keyring(tmp_path: Path, keys: bt.FileKeyProvider,
                                           policy: bt.RetentionPolicy) -> None:
    """The keyring-save seam armed around an enrolment of 50 new subjects never fires:
    their keys commit with their rows, in records.db."""
    store_dir, work, model = _fresh_store(tmp_path, keys, policy)
    before = (store_dir / "keyring").read_bytes()
    plan = {"mode": "seam", "prefix": "seam", "seed": SEED, "step_s": 600,
            "ttls_s": [10 * DAY_S], "setup": [], "seam_op": "enroll_many",
            "keyring": str(store_dir / "keyring")}
    child = spawn(store_dir, keys.path, model.max_now + 60 * 10**6, plan, work, "enrol")
    child.proc.wait(timeout=120)
    lines = child.lines()
    assert child.proc.returncode == 0 and lines[-1] == ["SURVIVED"], child.stderr()
    run = apply_output(model, lines, "enrolment seam")
    assert run.acks["enroll_many"] == 1 and not leftovers(store_dir, ".keyring.")
    assert (store_dir / "keyring").read_bytes() == before
    ring = Keyring.load(store_dir / "keyring", keys.master_key())
    batch = model.batches[run.acked_batches[0]]
    entries = read_entries(store_dir, ring)
    assert {ring.subject_ref(s) for s in batch.subjects} <= set(entries)


def test_stale_keyring_temp_does_not_outlive_shredding(
        tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy) -> None:
    """A crash inside ``Keyring.save`` leaves ``.keyring.XXXX`` (a complete keyring, sealed
    under the KEK) in the store folder. After a later erasure and a ratchet step it would
    still hold the bucket key that sealed the erased subject's key entry, and the shredded
    ratchet state - an unmanaged keyring backup, so folder + KEK would resurrect
    erased/expired records from an old records.db copy. It must not outlive the reopen and
    the shredding that follow. (The crash here: inside the save of an erasure's pending
    bucket key.)"""
    store_dir, model, _, _ = seam_crash(tmp_path, keys, policy, "erase")
    kek = keys.master_key()
    victim = next(b for b in model.batches.values() if b.acked).subjects[0]
    now = [_dt(model.max_now)]
    store = bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: now[0])
    try:
        assert store.erase_subject(victim, actor="dpo", reason="Art. 17").key_destroyed
        now[0] += timedelta(days=3)
        report = store.purge_expired()
        assert report.epoch_after > report.epoch_before
        epoch = report.epoch_after
    finally:
        store.close()
    current = Keyring.load(store_dir / "keyring", kek)
    bucket = current.bucket_of(current.subject_ref(victim))
    stale = []
    for temp in leftovers(store_dir, ".keyring."):
        try:
            ring = Keyring.from_bytes(temp.read_bytes(), kek)
        except bt.BiotemplateError:
            continue  # a torn temp file holds nothing usable
        old_key = ring.buckets[bucket] != current.buckets[bucket]
        if old_key or ring.ratchet_epoch < epoch:
            stale.append(f"{temp.name}: epoch {ring.ratchet_epoch} (store at {epoch}), "
                         f"erased subject's old bucket key present: {old_key}")
    assert not stale, ("a leftover keyring temp file still holds shredded key material "
                       "after reopen + erase + purge: " + "; ".join(stale))


def _erased_from_snapshot(data: bytes, ring: Keyring, victim: str) -> str | None:
    """Open a snapshot file the way anyone holding it, the *current* keyring and the KEK
    can (the key derived for the epoch and generation its header names, whatever the
    keyring's own); a description if the erased ``victim`` is inside, else None."""
    import io

    try:
        (n,) = snapshot._LEN.unpack_from(data, 4)
        header = msgpack.unpackb(data[8:8 + n])
        key = snapshot._key(ring, header["epoch"], header["erasures"])
        body = bytearray(header["size"])
        streaming.open_into(key, header["salt"], io.BytesIO(data[8 + n:]).readinto, body,
                            snapshot.MAGIC + ring.store_id + data[8:8 + n], snapshot.FRAME)
    except (bt.BiotemplateError, ValueError, KeyError, TypeError):
        return None
    if victim.encode() not in body:
        return None
    return f"generation {header['erasures']}, keyring at {ring.erasures}"


def _snapshot_crash_then_erase(tmp_path: Path, keys: bt.FileKeyProvider,
                               policy: bt.RetentionPolicy) -> tuple[Path, bytes, Keyring, str]:
    """Die inside snapshot.write (temp fsynced, not renamed), keep a copy of the temp file
    (what a folder backup taken before the next open holds), reopen, erase a subject.
    Returns (store folder, the copy, the keyring after the erasure, the erased subject)."""
    store_dir, model, _, _ = seam_crash(tmp_path, keys, policy, "snapshot", seam="snapshot")
    temps = leftovers(store_dir, ".index.snapshot.")
    assert len(temps) == 1, "the seam left no temp snapshot"
    copy = temps[0].read_bytes()
    victim = next(b for b in model.batches.values() if b.acked).subjects[0]
    reopen = _dt(model.max_now)
    store = bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: reopen)
    try:
        assert store.erase_subject(victim, actor="dpo", reason="Art. 17").key_destroyed
    finally:
        store.close()
    return store_dir, copy, Keyring.load(store_dir / "keyring", keys.master_key()), victim


def test_stale_snapshot_temp_does_not_outlive_erasure(
        tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy) -> None:
    """A crash inside ``snapshot.write`` leaves ``.snapshot.XXXX``: the sealed index with
    every live template and the record -> subject id map. It must be gone once the store
    has been reopened and the subject erased."""
    store_dir, _, ring, victim = _snapshot_crash_then_erase(tmp_path, keys, policy)
    readable = [f"{t.name} ({found})" for t in leftovers(store_dir, ".index.snapshot.")
                if (found := _erased_from_snapshot(t.read_bytes(), ring, victim))]
    assert not readable, ("the erased subject's id and template are readable with the "
                          "current keyring from a leftover snapshot temp: " + ", ".join(readable))


def test_snapshot_copy_from_before_erasure_is_unreadable(
        tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy) -> None:
    """SECURITY.md §4: an erased subject stays readable only from a copy combined with a
    keyring copy taken *before* the erasure. The snapshot key is HKDF(K_epoch(e),
    "snapshot/" + generation) with a public generation counter, so the *current* keyring
    still opens a snapshot copy (here: the temp a crash left, as a backup caught it) of an
    older generation within the same epoch - the erased template and id come back."""
    _, copy, ring, victim = _snapshot_crash_then_erase(tmp_path, keys, policy)
    found = _erased_from_snapshot(copy, ring, victim)
    assert found is None, ("the erased subject's id and template are readable from a "
                           f"pre-erasure snapshot copy with the current keyring ({found})")


def test_the_snapshot_reading_technique_finds_a_subject(
        tmp_path: Path, keys: bt.FileKeyProvider, policy: bt.RetentionPolicy) -> None:
    """The control for the two tests above: a live subject is found in a snapshot read
    with the keyring it was written under."""
    from biotemplate.synthetic import make_gallery

    gallery = make_gallery(3, 1, 16, seed=4)
    store = bt.TemplateStore.create(tmp_path / "s", dim=16, model="m", policy=policy,
                                    key_provider=keys, clock=lambda: datetime(2030, 1, 1,
                                                                              tzinfo=UTC))
    try:
        purpose = next(iter(policy.purposes))
        store.enroll_many(gallery.templates, subject_ids=["X-victim-1", "X-2", "X-3"],
                          purposes=[purpose], actor="t")
        store.snapshot()
        data = (tmp_path / "s" / "index.snapshot").read_bytes()
        ring = Keyring.load(tmp_path / "s" / "keyring", keys.master_key())
        assert _erased_from_snapshot(data, ring, "X-victim-1") is not None
    finally:
        store.close()


def test_worker_runs_clean_without_kill(tmp_path: Path, keys: bt.FileKeyProvider,
                                        policy: bt.RetentionPolicy) -> None:
    """Sanity check of the harness: a bounded run ends by itself, every call acknowledged."""
    store_dir, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    bt.TemplateStore.create(store_dir, dim=wk.DIM, model=MODEL, policy=policy,
                            key_provider=keys, clock=lambda: START).close()
    plan = {"mode": "loop", "prefix": "clean", "seed": SEED, "step_s": STEP_S,
            "ttls_s": TTLS_S, "max_ops": 40}
    child = spawn(store_dir, keys.path, _us(START) + 10**6, plan, work, "clean")
    assert child.proc.wait(timeout=120) == 0, child.stderr()
    lines = child.lines()
    assert lines[-1] == ["DONE"]
    begins = sum(1 for p in lines if p[0] == "BEGIN")
    assert begins == sum(1 for p in lines if p[0] == "ACK") == 40
    assert np.isfinite(wk.batch_templates("x")).all()
