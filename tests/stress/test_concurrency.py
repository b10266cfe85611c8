"""Searches racing writes (issue 4, item 6).

Several threads search (``search`` and ``search_many``) while one writer enrols, deletes,
erases, purges, snapshots and moves the shared clock forward. A thread-safe model records
what the writer did and when it was acknowledged. Afterwards every result is checked:

- no thread raised;
- no result was expired when its search started, or erased/deleted by a call that had
  returned before the search started (a removal still in flight may go either way);
- no result belongs to another purpose, and every candidate's subject is its record's;
- no acknowledged enrolment was lost: a record enrolled before a search started, and not
  being removed or expired by the time it ended, is found by a probe of its own template
  (during the run and again once everything is quiet, and after a reopen);
- the audit trail verifies.

"Before the search started" is measured with the model's own counter and the clock, read
before the call, so the checks hold whatever the interleaving. The quick run (~10 s) is in
the default suite; the heavier ones run with ``pytest -m slow``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt

DIM = 64
MODEL = "test-model-v1"
SOURCE = "enrolment-desk-1"
# subject prefix -> purposes of its records
KINDS: dict[str, tuple[str, ...]] = {"W-": ("watchlist",), "R-": ("rare",),
                                     "X-": ("rare", "watchlist")}
TTLS: dict[str, list[timedelta]] = {
    "W-": [timedelta(hours=6), timedelta(days=1), timedelta(days=3), timedelta(days=30),
           timedelta(days=400)],
    "R-": [timedelta(hours=4), timedelta(days=1), timedelta(days=2), timedelta(days=7)],
    "X-": [timedelta(hours=8), timedelta(days=2), timedelta(days=20)],
}
SIGMA = float(np.sqrt((1 / 0.7 - 1) / DIM))  # genuine cosine ~0.7 between two samples


def _us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Rec:
    subject: str
    purposes: tuple[str, ...]
    expiry_us: int
    template: np.ndarray
    acked: int  # model tick at which the enrolment call had returned


@dataclass
class Obs:
    """One probe's search, as a searcher saw it."""

    tick: int  # model tick before the call
    t_us: int  # clock before the call
    purpose: str
    mode: str
    candidates: list[tuple[str, str, float]]
    expect: str | None  # a record whose subject must be among the candidates


@dataclass
class Model:
    """What the writer did, and when each call had returned (a monotonic tick)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tick: int = 0
    records: dict[str, Rec] = field(default_factory=dict)
    by_subject: dict[str, list[str]] = field(default_factory=dict)
    removing: set[str] = field(default_factory=set)  # delete/erase called (maybe not done)
    gone: dict[str, int] = field(default_factory=dict)  # tick when the removal returned

    def now(self) -> int:
        with self.lock:
            return self.tick

    def acknowledge(self, ids: list[str], subjects: list[str], purposes: tuple[str, ...],
                    expiry_us: int, templates: np.ndarray) -> None:
        with self.lock:
            self.tick += 1
            for rid, sid, t in zip(ids, subjects, templates, strict=True):
                self.records[rid] = Rec(sid, purposes, expiry_us, t, self.tick)
                self.by_subject.setdefault(sid, []).append(rid)

    def start_removal(self, ids: list[str]) -> None:
        with self.lock:
            self.removing.update(ids)

    def removed(self, ids: list[str]) -> None:
        with self.lock:
            self.tick += 1
            for rid in ids:
                self.gone.setdefault(rid, self.tick)  # the first removal counts

    def live(self, now_us: int, margin_us: int = 0) -> list[tuple[str, Rec]]:
        """Acknowledged records not being removed and not expiring within the margin."""
        with self.lock:
            return [(rid, r) for rid, r in self.records.items()
                    if rid not in self.removing and r.expiry_us > now_us + margin_us]

    def excused(self, rid: str, now_us: int) -> bool:
        with self.lock:
            return rid in self.removing or self.records[rid].expiry_us <= now_us


class Clock:
    """The shared clock: only the writer moves it (an attribute swap is atomic)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Run:
    store: bt.TemplateStore
    clock: Clock
    model: Model
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    observations: list[Obs] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, who: str) -> None:
        with self.lock:
            self.errors.append(f"{who}:\n{traceback.format_exc()}")
        self.stop.set()

    def count(self, op: str) -> None:
        with self.lock:
            self.ops[op] = self.ops.get(op, 0) + 1


# --- the writer -------------------------------------------------------------------------


class Writer:
    def __init__(self, run: Run, seed: int) -> None:
        self.run, self.store, self.model, self.clock = run, run.store, run.model, run.clock
        self.rng = np.random.default_rng(seed)
        self.pick = random.Random(seed)
        self.centres: dict[str, np.ndarray] = {}
        self.next_subject = 0

    def _samples(self, subjects: list[str]) -> np.ndarray:
        rows = []
        for sid in subjects:
            centre = self.centres.get(sid)
            if centre is None:
                centre = self.centres[sid] = _unit(self.rng.standard_normal(DIM))
            rows.append(centre + self.rng.standard_normal(DIM) * SIGMA)
        return _unit(np.asarray(rows))

    def enrol(self, subjects: list[str]) -> list[str]:
        kind = subjects[0][:2]
        assert all(s[:2] == kind for s in subjects)
        ttl = self.pick.choice(TTLS[kind])
        templates = self._samples(subjects)
        expiry = _us(self.clock.now) + ttl // timedelta(microseconds=1)  # only we move it
        if len(subjects) == 1:
            ids = [self.store.enroll(templates[0], subject_id=subjects[0],
                                     purposes=list(KINDS[kind]), ttl=ttl, source=SOURCE,
                                     actor="svc-enrol")]
        else:
            ids = self.store.enroll_many(templates, subject_ids=subjects,
                                         purposes=list(KINDS[kind]), ttl=ttl, source=SOURCE,
                                         actor="svc-enrol")
        self.model.acknowledge(ids, subjects, KINDS[kind], expiry, templates)
        return ids

    def new_subjects(self, n: int) -> list[str]:
        kind = self.pick.choice(["W-", "W-", "R-", "X-"])
        out = [f"{kind}{self.next_subject + i:06d}" for i in range(n)]
        self.next_subject += n
        return out

    def seed_gallery(self, subjects: int) -> None:
        for start in range(0, subjects, 100):
            batch = self.new_subjects(min(100, subjects - start))
            self.enrol(batch + batch)  # two samples each

    def _live(self) -> list[tuple[str, Rec]]:
        return self.model.live(_us(self.clock.now))

    def step(self, n: int) -> None:
        # a random mix, with a purge and an erasure in every ten steps whatever the draw
        op = {5: "purge", 8: "erase"}.get(n % 10) or self.pick.choices(
            ["enrol", "enrol-many", "enrol-again", "delete", "erase", "purge", "tick",
             "snapshot"], weights=[25, 12, 8, 18, 6, 4, 12, 5])[0]
        live = self._live()
        if not live and op in ("enrol-again", "delete", "erase"):
            op = "enrol"
        if op == "enrol":
            self.enrol(self.new_subjects(1))
        elif op == "enrol-many":
            self.enrol(self.new_subjects(self.pick.randint(2, 40)))
        elif op == "enrol-again":
            self.enrol([self.pick.choice(live)[1].subject])
        elif op == "delete":
            rid = self.pick.choice(live)[0]
            self.model.start_removal([rid])
            self.store.delete(rid, actor="svc", reason="stress")
            self.model.removed([rid])
        elif op == "erase":
            sid = self.pick.choice(live)[1].subject
            with self.model.lock:
                ids = list(self.model.by_subject[sid])
            self.model.start_removal(ids)
            self.store.erase_subject(sid, actor="dpo", reason="stress")
            self.model.removed(ids)
        elif op == "purge":
            self.clock.now += timedelta(hours=self.pick.randint(1, 10))
            self.store.purge_expired()
        elif op == "tick":
            self.clock.now += timedelta(minutes=self.pick.randint(10, 300))
        elif op == "snapshot":
            self.store.snapshot()
        self.run.count(op)

    def __call__(self, seconds: float, min_steps: int) -> None:
        """Write for ``seconds``, and at least ``min_steps`` times on a slow machine."""
        deadline, n = time.monotonic() + seconds, 0
        try:
            while (time.monotonic() < deadline or n < min_steps) and not self.run.stop.is_set():
                self.step(n)
                n += 1
        except BaseException:
            self.run.fail("writer")
        finally:
            self.run.stop.set()


# --- the searchers ----------------------------------------------------------------------


def searcher(run: Run, seed: int, batched: bool) -> None:
    pick = random.Random(seed)
    rng = np.random.default_rng(seed)
    store, model, clock = run.store, run.model, run.clock
    seen: list[Obs] = []
    try:
        while not run.stop.is_set():
            purpose = pick.choice(["watchlist", "rare"])
            mode = pick.choice(["identification", "investigation"])
            rows, expect = [], []
            live = [x for x in model.live(_us(clock.now), margin_us=3_600_000_000)
                    if purpose in x[1].purposes]
            for _ in range(pick.randint(1, 8) if batched else 1):
                if live and pick.random() < 0.7:  # a probe of an enrolled template
                    rid, rec = pick.choice(live)
                    rows.append(rec.template)
                    expect.append(rid)
                else:  # someone else, or a noisy sample of someone maybe enrolled
                    rows.append(_unit(rng.standard_normal(DIM)))
                    expect.append(None)
            k = pick.randint(5, 10)
            tick, t_us = model.now(), _us(clock.now)
            if batched:
                results = store.search_many(np.asarray(rows), purpose=purpose, k=k,
                                            actor=f"analyst-{seed}", mode=mode)
                run.count("search_many")
            else:
                results = [store.search(rows[0], purpose=purpose, k=k, actor=f"analyst-{seed}",
                                        mode=mode)]
                run.count("search")
            t_after = _us(clock.now)
            assert len(results) == len(rows)
            for res, want in zip(results, expect, strict=True):
                assert res.purpose == purpose and res.mode == mode
                assert [c.rank for c in res.candidates] == list(range(1, len(res.candidates) + 1))
                if mode == "identification":
                    assert all(c.score >= res.threshold for c in res.candidates)
                if want is not None and model.excused(want, t_after):
                    want = None  # removed or expired while we searched: either way is fine
                seen.append(Obs(tick, t_us, purpose, mode,
                                [(c.record_id, c.subject_id, c.score) for c in res.candidates],
                                want))
    except BaseException:
        run.fail(f"searcher {seed}")
    finally:
        with run.lock:
            run.observations.extend(seen)


# --- checks -----------------------------------------------------------------------------


def violations(run: Run) -> list[str]:
    model, out = run.model, []
    for n, obs in enumerate(run.observations):
        names = {sid for _, sid, _ in obs.candidates}
        if obs.expect is not None and model.records[obs.expect].subject not in names:
            out.append(f"#{n}: lost write: {obs.expect} ({model.records[obs.expect].subject})"
                       f" not found by its own template ({obs.purpose}, {obs.mode})")
        for rid, sid, _score in obs.candidates:
            rec = model.records.get(rid)
            if rec is None:
                out.append(f"#{n}: {rid} was never enrolled")
                continue
            if rec.subject != sid:
                out.append(f"#{n}: {rid} returned as {sid}, enrolled as {rec.subject}")
            if obs.purpose not in rec.purposes:
                out.append(f"#{n}: {rid} ({rec.purposes}) returned for {obs.purpose}")
            if rec.expiry_us <= obs.t_us:
                out.append(f"#{n}: {rid} expired {obs.t_us - rec.expiry_us} us before the "
                           "search started")
            done = model.gone.get(rid)
            if done is not None and done <= obs.tick:
                out.append(f"#{n}: {rid} returned after its removal returned "
                           f"(removed at tick {done}, search from tick {obs.tick})")
    return out


def lost_when_quiet(store: bt.TemplateStore, model: Model, now_us: int) -> list[str]:
    """Every live record, probed with its own template, is found (in each purpose)."""
    lost = []
    live = model.live(now_us)
    for purpose in ("watchlist", "rare"):
        mine = [(rid, r) for rid, r in live if purpose in r.purposes]
        for start in range(0, len(mine), 256):
            chunk = mine[start:start + 256]
            res = store.search_many(np.asarray([r.template for _, r in chunk]),
                                    purpose=purpose, k=5, actor="auditor",
                                    mode="investigation")
            for (rid, rec), got in zip(chunk, res, strict=True):
                if rec.subject not in {c.subject_id for c in got.candidates}:
                    lost.append(f"{rid} ({rec.subject}, {purpose})")
    return lost


@contextlib.contextmanager
def stress_store(tmp_path: Path, params: bt.IndexParams | None,
                 policy: bt.RetentionPolicy) -> Iterator[tuple[bt.TemplateStore, Clock, Any]]:
    clock = Clock()
    keys = bt.FileKeyProvider.generate(tmp_path / "master.key")
    store = bt.TemplateStore.create(tmp_path / "store", dim=DIM, model=MODEL, policy=policy,
                                    key_provider=keys, clock=clock, index_params=params)
    try:
        yield store, clock, keys
    finally:
        with contextlib.suppress(Exception):
            store.close()


def stress(tmp_path: Path, policy: bt.RetentionPolicy, *, seconds: float, searchers: int,
           gallery: int, params: bt.IndexParams | None, seed: int) -> dict[str, int]:
    with stress_store(tmp_path, params, policy) as (store, clock, keys):
        run = Run(store, clock, Model())
        writer = Writer(run, seed)
        writer.seed_gallery(gallery)
        threads = [threading.Thread(target=searcher, args=(run, seed * 100 + i, i % 2 == 1),
                                    name=f"searcher-{i}", daemon=True)
                   for i in range(searchers)]
        threads.append(threading.Thread(target=writer, args=(seconds, 40), name="writer",
                                        daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 300)
        assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
        assert not run.errors, "\n".join(run.errors[:3])

        bad = violations(run)
        assert not bad, f"{len(bad)} bad results, e.g.:\n" + "\n".join(bad[:10])
        # the run did what it is meant to: writes and searches interleaved, removals seen
        ops = dict(run.ops)
        assert ops.get("search", 0) + ops.get("search_many", 0) >= 20 * searchers, ops
        assert ops.get("delete", 0) + ops.get("erase", 0) >= 4, ops
        assert ops.get("purge", 0) >= 4, ops
        assert sum(o.expect is not None for o in run.observations) >= 50
        assert any(o.candidates for o in run.observations)

        now_us = _us(clock.now)
        lost = lost_when_quiet(store, run.model, now_us)
        assert not lost, f"{len(lost)} acknowledged enrolments not found: {lost[:10]}"
        report = store.audit.verify()
        assert report.ok, report.problems[:5]
        assert store.stats().integrity_failures == 0
        store.purge_expired()
        live = len(run.model.live(now_us))
        assert store.stats().records == live
        assert store.stats().indexed == live
        # the model's expiries are the store's (the expiry checks above rely on it)
        for rid, rec in run.model.live(now_us)[:: max(1, live // 20)]:
            views = store.export_subject(rec.subject, actor="auditor")
            assert _us(next(v.expires_at for v in views if v.record_id == rid)) == rec.expiry_us
        store.close()

        again = bt.TemplateStore.open(tmp_path / "store", key_provider=keys, clock=clock,
                                      index_params=params)
        try:
            opened = again.audit.get(again.audit.checkpoint().seq)
            assert (opened.event, opened.fields["index"]) == ("open", "snapshot")
            lost = lost_when_quiet(again, run.model, now_us)
            assert not lost, f"after reopen: {lost[:10]}"
            report = again.audit.verify()
            assert report.ok, report.problems[:5]
        finally:
            again.close()
        return ops


def test_searches_race_writes_quick(tmp_path: Path, policy: bt.RetentionPolicy) -> None:
    """~10 s: 4 searchers (2 single, 2 batched) against one writer, HNSW path forced."""
    stress(tmp_path, policy, seconds=5, searchers=4, gallery=200,
           params=bt.IndexParams(exact_cutoff=0), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("params", [None, bt.IndexParams(exact_cutoff=0)],
                         ids=["default", "hnsw"])
def test_searches_race_writes_heavy(tmp_path: Path, policy: bt.RetentionPolicy,
                                    params: bt.IndexParams | None) -> None:
    """Longer, more searchers, a gallery past the exact-search cut-off."""
    stress(tmp_path, policy, seconds=40, searchers=8, gallery=3_000, params=params, seed=2)
