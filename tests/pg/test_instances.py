"""Several OS processes serving one store on PostgreSQL: the guarantees of docs/scale-out.md.

Each instance is a process running ``instance.py``; the test drives them over pipes. No
timing is asserted except generous deadlines (a stuck feed fails, a slow machine does not):
the lag itself is measured by ``benchmarks/bench_pg.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from tests.conftest import DIM, MODEL

HERE = Path(__file__).parent


class Instance:
    """A store instance in a child process."""

    def __init__(self, url: str, key: Path, partition: tuple[int, int] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "instance.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.opened = self.call("open", url=url, key=str(key),
                                partition=list(partition) if partition else None)

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise AssertionError(f"{op}: {answer['error']}: {answer.get('message')}")
        return answer["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close")
            finally:
                self.proc.wait(timeout=30)


@pytest.fixture
def shared(pg_url: str, policy: bt.RetentionPolicy, keys: bt.FileKeyProvider,
           tmp_path: Path) -> Iterator[tuple[str, Path, bt.TemplateStore]]:
    """A store on PostgreSQL with one instance in this process; the key file's path."""
    store = bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy,
                                    key_provider=keys)
    yield pg_url, tmp_path / "master.key", store
    store.close()


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    made: list[Instance] = []
    yield made
    for inst in made:
        inst.close()


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def enrol(store: bt.TemplateStore, vecs: np.ndarray, prefix: str) -> list[str]:
    return store.enroll_many(vecs, subject_ids=[f"{prefix}{i}" for i in range(len(vecs))],
                             purposes=["watchlist"], ttl=timedelta(days=30),
                             source="case-file", actor="test")


def test_an_enrolment_on_one_instance_is_found_on_the_others(shared, instances) -> None:
    url, key, store = shared
    enrol(store, vectors(50, 1), "a")
    instances += [Instance(url, key) for _ in range(2)]
    assert all(i.opened["records"] == 50 for i in instances)
    new = vectors(1, 2)
    done = instances[0].call("enroll", templates=new.tolist(), subjects=["fresh"])
    lag = instances[1].call("wait_subject", probe=new[0].tolist(), subject="fresh",
                            since=done["at"], timeout=20)
    assert lag is not None, "the other instance never saw the enrolment"
    # and the in-process instance too
    hits = store.search(new[0], purpose="watchlist", actor="test").candidates
    for _ in range(200):
        if hits:
            break
        import time

        time.sleep(0.05)
        hits = store.search(new[0], purpose="watchlist", actor="test").candidates
    assert hits and hits[0].subject_id == "fresh"


def test_after_an_erasure_returns_no_instance_returns_the_subject(shared, instances) -> None:
    url, key, store = shared
    vecs = vectors(40, 3)
    enrol(store, vecs, "s")
    instances += [Instance(url, key) for _ in range(3)]
    before = instances[2].call("search", probes=[vecs[7].tolist()])
    assert before[0][0][0] == "s7"
    assert instances[0].call("erase", subject="s7") == 1
    # at once, with no wait: every other instance still holds the vector in its index,
    # and must drop it because its row is gone
    for inst in instances[1:]:
        found = inst.call("search", probes=[vecs[7].tolist()], mode="investigation", k=10)
        assert all(c[0] != "s7" for c in found[0])
    found = store.search(vecs[7], purpose="watchlist", k=10, actor="t", mode="investigation")
    assert all(c.subject_id != "s7" for c in found.candidates)
    assert store.stats().integrity_failures == 0  # gone elsewhere is not tampering


def test_a_delete_on_one_instance_is_never_served_by_another(shared, instances) -> None:
    url, key, store = shared
    vecs = vectors(30, 4)
    ids = enrol(store, vecs, "d")
    instances.append(Instance(url, key))
    instances[0].call("delete", record_id=ids[5])
    r = store.search(vecs[5], purpose="watchlist", actor="t", k=10, mode="investigation")
    assert ids[5] not in {c.record_id for c in r.candidates}


def test_key_state_changes_are_seen_by_all(shared, instances) -> None:
    url, key, store = shared
    vecs = vectors(20, 5)
    enrol(store, vecs, "k")
    instances += [Instance(url, key) for _ in range(2)]
    # an erasure on one instance rotates a bucket key and moves the generation; the
    # others must act on the new key state (not write back the old one)
    instances[0].call("erase", subject="k1")
    instances[1].call("erase", subject="k2")
    gen = instances[0].call("stats")["generation"]
    store.erase_subject("k3", actor="t")
    assert store.stats().generation == gen + 1
    more = vectors(5, 6)
    done = instances[1].call("enroll", templates=more.tolist(),
                             subjects=[f"m{i}" for i in range(5)])
    # every instance indexes the new subjects under the new key state
    for inst in instances:
        assert inst.call("wait_subject", probe=more[2].tolist(), subject="m2",
                         since=done["at"]) is not None
    assert instances[0].call("purge") == 0
    views = store.export_subject("m3", actor="t")
    assert len(views) == 1
    assert store.audit.verify().ok


def test_four_partitions_in_four_processes_merge_to_the_single_index(
        shared, instances) -> None:
    url, key, store = shared
    vecs = vectors(400, 7)
    enrol(store, vecs, "p")
    whole = Instance(url, key)
    parts = [Instance(url, key, (i, 4)) for i in range(4)]
    instances += [whole, *parts]
    assert sum(p.opened["records"] for p in parts) == 400
    probes = (vecs[:25] + np.random.default_rng(8).normal(scale=0.3, size=(25, DIM))
              ).astype(np.float32).tolist()
    single = whole.call("search", probes=probes, k=10, mode="investigation")
    answers = [p.call("search", probes=probes, k=10, mode="investigation") for p in parts]
    threshold = store.policy.purpose("watchlist").match_threshold
    for i in range(len(probes)):
        results = [bt.SearchResult(
            candidates=[bt.Candidate(record_id=c[1], subject_id=c[0], score=c[2], rank=j + 1,
                                     above_threshold=c[3]) for j, c in enumerate(a[i])],
            decision=any(c[3] for c in a[i]), threshold=threshold, mode="investigation",
            purpose="watchlist", audit_seq=1) for a in answers]
        merged = bt.merge_results(results, k=10)
        assert [c.record_id for c in merged.candidates] == [c[1] for c in single[i]]
        assert merged.decision == any(c[3] for c in single[i])


def test_an_instance_killed_between_commit_and_key_save_is_completed_by_the_next(
        shared, instances) -> None:
    url, key, store = shared
    vecs = vectors(10, 9)
    enrol(store, vecs, "c")
    doomed = Instance(url, key)
    assert doomed.proc.stdin is not None
    doomed.proc.stdin.write(json.dumps({"op": "erase_and_die", "subject": "c4"}) + "\n")
    doomed.proc.stdin.flush()
    assert doomed.proc.wait(timeout=30) == 9
    # the erasure committed (rows and entries gone, the change staged in the database)
    # but the key state was never saved: the next mutation, anywhere, completes it
    receipt = store.erase_subject("c5", actor="t")
    assert receipt.key_destroyed
    assert store.stats().generation == 2  # the dead one's change, then this one
    assert store.export_subject("c4", actor="t") == []
    assert len(store.export_subject("c6", actor="t")) == 1
    events = [store.audit.get(s).event for s in range(1, store.audit.checkpoint().seq + 1)]
    assert events.count("rollforward") == 1 and events.count("erase") == 2
    assert store.audit.verify().ok


@pytest.mark.slow
def test_concurrent_writers_on_every_instance_converge(shared, instances) -> None:
    """Three processes enrol and erase at once, each its own subjects: every instance's
    feed must end up with exactly the rows the database holds (no change skipped)."""
    import threading
    import time

    url, key, store = shared
    instances += [Instance(url, key) for _ in range(3)]
    errors: list[BaseException] = []

    def work(i: int, inst: Instance) -> None:
        try:
            for b in range(8):
                vecs = vectors(15, 100 * i + b)
                inst.call("enroll", templates=vecs.tolist(),
                          subjects=[f"w{i}-{b}-{j}" for j in range(15)])
                inst.call("erase", subject=f"w{i}-{b}-0")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, inst))
               for i, inst in enumerate(instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    expected = 3 * 8 * 14
    deadline = time.time() + 60
    counts: list[int] = []
    while time.time() < deadline:
        counts = [inst.call("stats")["indexed"] for inst in instances]
        if counts == [expected] * 3 and store.stats().indexed == expected:
            break
        time.sleep(0.2)
    assert counts == [expected] * 3
    assert store.stats().indexed == expected == store.stats().records
    assert store.audit.verify().ok
