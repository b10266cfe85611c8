"""Issue 13, point 3: what erasing a record costs, and whether a purge stalls searches.

Who runs it: anyone checking the removal rows of the targets table (RESULTS.md) after a
change to erasure, the index lock or the purge. ~4 min at the default N=100k, d=512 on
2 cores (most of it enrolling), seconds at --n 4000::

    .venv/bin/python benchmarks/bench_purge.py --n 100000 --dim 512
    git archive 9aa68d8 biotemplate | tar -x -C /tmp/before    # the code before issue 13
    PYTHONPATH=/tmp/before .venv/bin/python benchmarks/bench_purge.py --label before

A store of N records (data set A, one per subject, purpose "bench"), 10% of them with a
one-day TTL. Through the public API, with a clock the script moves:

1. ``delete``: ``--trials`` single deletions, each timed whole, and the index's share of it
   (``Gallery.forget``, timed by a wrapper around it);
2. the purge: the clock moves two days on, a thread keeps calling ``search`` (k=10,
   investigation) while the main thread calls ``purge_expired`` and then waits for the
   index's background repair to finish (or for ``--repair-window`` seconds of it: it runs
   at a quarter duty, ~13 min for 10k records at d=512, and its total is then
   extrapolated from its rate). Every search's latency is recorded by phase (before,
   during the purge call, during the repair): p50, p99 and max; the max is the longest
   any search was held back.

Removal per record = the index's share of the purge (``forget``) / records purged; the
background repair's time is reported beside it (it runs between searches, off the
caller's path). Prints a Markdown table and writes ``purge_d{dim}_n{n}_{label}.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import common
import numpy as np


class Clock:
    """The store's clock: fixed, moved on by hand."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> Any:
        return common.FIXED_NOW + self.offset


def pcts(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    if not a.size:
        return {"n": 0}
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def run(n: int, dim: int, trials: int, label: str, window: float = 180.0) -> dict[str, Any]:
    """The measurement (see the module docstring); returns the JSON payload."""
    import biotemplate as bt
    from biotemplate import gallery as gallery_module

    a = common.data_a(dim, n, 2000)
    forget_s: list[float] = []
    real_forget = gallery_module.Gallery.forget

    def forget(self: Any, record_ids: Any) -> None:
        t0 = time.perf_counter()
        real_forget(self, record_ids)
        forget_s.append(time.perf_counter() - t0)

    gallery_module.Gallery.forget = forget  # type: ignore[method-assign]
    common.DATA.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-purge-", dir=common.DATA))
    clock = Clock()
    res: dict[str, Any] = {"n": n, "dim": dim, "label": label, "load_before": os.getloadavg(),
                           "source": common.source_digest()}
    try:
        keys = bt.FileKeyProvider.generate(work / "master.key")
        store = bt.TemplateStore.create(work / "store", dim=dim, model="bench",
                                        policy=common.bench_policy(), key_provider=keys,
                                        clock=clock, index_params=common.params())
        n_short = n // 10
        sids = [f"S{i:07d}" for i in range(n)]
        common.log(f"purge: enrolling {n} records (d={dim}), {n_short} with a 1-day TTL")
        ids = store.enroll_many(a.x[n_short:], subject_ids=sids[n_short:], purposes=["bench"],
                                ttl=timedelta(days=300), actor="bench")
        store.enroll_many(a.x[:n_short], subject_ids=sids[:n_short], purposes=["bench"],
                          ttl=timedelta(days=1), actor="bench")
        index = store._p.gallery._index  # not public: to wait for the background repair

        def settle(limit: float = float("inf")) -> float:
            t0 = time.perf_counter()
            while index.stats().get("repairs_pending", 0) and time.perf_counter() - t0 < limit:
                time.sleep(0.05)
            return time.perf_counter() - t0

        common.log(f"purge: {trials} single deletions")
        whole: list[float] = []
        forget_s[:] = []
        for rid in ids[:trials]:
            t0 = time.perf_counter()
            store.delete(rid, actor="bench")
            whole.append(time.perf_counter() - t0)
            settle()  # one deletion at a time: the next does not wait for this repair
        res["delete"] = {"whole": pcts(whole), "index_share": pcts(list(forget_s))}

        probes = a.q[:500]
        phase = ["before"]
        lat: dict[str, list[float]] = {"before": [], "purge": [], "repair": []}
        stop = threading.Event()

        def searcher() -> None:
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                store.search(probes[i % len(probes)], purpose="bench", k=10, actor="bench",
                             mode=common.INV)
                lat[phase[0]].append(time.perf_counter() - t0)
                i += 1

        thread = threading.Thread(target=searcher)
        clock.offset = timedelta(days=2)
        store.search(probes[0], purpose="bench", k=10, actor="bench")  # hides the expired
        thread.start()
        time.sleep(2.0)
        common.log(f"purge: purging {n_short} expired records while searching")
        forget_s[:] = []
        phase[0] = "purge"
        t0 = time.perf_counter()
        report = store.purge_expired()
        purge_s = time.perf_counter() - t0
        phase[0] = "repair"
        pending = index.stats().get("repairs_pending", 0)
        repair_s = settle(window)  # searches are timed through the repair, or its first part
        left = index.stats().get("repairs_pending", 0)
        time.sleep(0.5)
        stop.set()
        thread.join()
        index_s = sum(forget_s)
        done = max(pending - left, 1)
        res["purge"] = {"purged": report.purged, "call_s": purge_s, "index_share_s": index_s,
                        "index_ms_per_record": index_s / max(report.purged, 1) * 1e3,
                        "call_ms_per_record": purge_s / max(report.purged, 1) * 1e3,
                        "background_repair_s": repair_s * pending / done,  # left: at its rate
                        "repair_observed_s": repair_s, "repair_left": left,
                        "repair_ms_per_record": repair_s / done * 1e3}
        res["search_during"] = {k: pcts(v) for k, v in lat.items()}
        res["load_after"] = os.getloadavg()
        store.close()
    finally:
        gallery_module.Gallery.forget = real_forget  # type: ignore[method-assign]
        shutil.rmtree(work, ignore_errors=True)
    return res


def table(res: dict[str, Any]) -> str:
    p, s, d = res["purge"], res["search_during"], res["delete"]
    rows = [
        ["delete(): whole call, p50 / p99", f"{d['whole']['p50_ms']:.2f} / "
         f"{d['whole']['p99_ms']:.2f} ms"],
        ["delete(): the index's share, p50", f"{d['index_share']['p50_ms']:.3f} ms"],
        [f"purge_expired() of {p['purged']:,} records: the call",
         f"{p['call_s']:.2f} s ({p['call_ms_per_record']:.3f} ms a record)"],
        ["  the index's share (removal per record)",
         f"{p['index_share_s'] * 1e3:.0f} ms ({p['index_ms_per_record']:.4f} ms a record)"],
        ["  background graph repair after it", f"{p['background_repair_s']:.1f} s "
         f"({p['repair_ms_per_record']:.2f} ms a record, between searches, at a quarter duty"
         + (f"; {p['repair_observed_s']:.0f} s of it timed, {p['repair_left']:,} records "
            "left, the rest at its rate" if p.get("repair_left") else "") + ")"],
    ] + [[f"search while {k}: p50 / p99 / max (n)",
          f"{v.get('p50_ms', 0):.2f} / {v.get('p99_ms', 0):.2f} / {v.get('max_ms', 0):.1f} ms"
          f" ({v['n']})"] for k, v in s.items()]
    return f"N={res['n']} d={res['dim']} ({res['label']})\n" + common.md(rows, ["measure", "value"])


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, default=100_000, help="records")
    ap.add_argument("--dim", type=int, default=512, help="template dimension")
    ap.add_argument("--trials", type=int, default=30, help="single deletions timed")
    ap.add_argument("--label", default="after", help="suffix of the JSON file")
    ap.add_argument("--repair-window", type=float, default=180.0,
                    help="seconds of the background repair to time searches through (its "
                         "total time is then extrapolated from its rate)")
    common.add_results_dir_arg(ap)
    args = ap.parse_args()
    common.configure(args.n, args.results_dir)
    res = run(args.n, args.dim, args.trials, args.label, args.repair_window)
    print(table(res))
    path = common.write_json(f"purge_d{args.dim}_n{args.n}_{args.label}", res)
    print(f"wrote {common.shown(path)}")


if __name__ == "__main__":
    main()
