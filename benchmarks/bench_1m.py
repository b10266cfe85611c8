"""Issue 4's targets at N = 1M (d = 128 by default): raw hnswlib vs biotemplate, one run.

Who runs it: whoever checks that the store still holds at a large gallery (rank-1 vs exact
search, search latency, enrolment and snapshot-open cost). Needs ~3 GB of RAM and ~15 min
on 2 cores at 1M; ``--n 2000`` is a smoke test of a few seconds::

    .venv/bin/python benchmarks/bench_1m.py --n 1000000 --dim 128

Phases (same process, same vectors, the store's M (32; 16 before issue 13) / ef_construction=200 /
ef=auto_ef(N), 3168 at 1M):
  1. raw hnswlib ``add_items`` of the in-memory array (wall, CPU);
  2. ``enroll_many`` of the same vectors into a fresh store (1 sample per identity, one
     purpose, max_candidates 100, fixed clock) (wall, CPU);
  3. single-query p50: ``knn_query(k=10)`` vs ``store.search(k=10, investigation)`` over
     1000 mated probes, alternating passes, median of per-round ratios;
  4. rank-1 of 2000 mated probes: exact (numpy, chunked), raw hnswlib, store;
  5. ``store.close()`` (writes the snapshot), then ``TemplateStore.open`` from the snapshot
     in a fresh subprocess (open time, peak RSS via getrusage and VmHWM).
The rebuild-from-rows timing is not run. Writes ``bench_1m_d{dim}.json`` to --results-dir
(``bench_1m_d{dim}_n{n}.json`` when n is not 1M), rewritten after every phase, so an
interrupted run still leaves the phases that completed; prints the JSON at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from common import (
    ACTOR,
    DATA,
    EF_CONSTRUCTION,
    INV,
    SNAPSHOT_FILE,
    K,
    M,
    add_results_dir_arg,
    clock,
    configure,
    ef_default,
    exact_topk,
    log,
    median,
    new_store,
    params,
    parser,
    passes,
    peak_rss_mb,
    ratio_stats,
    raw_build_cpu,
    rows_of,
    rss_mb,
    shown,
    source_digest,
    time_each,
    timed,
    write_json,
)

if TYPE_CHECKING:
    import biotemplate as bt

PURPOSE = "bench"


def open_worker(root: Path) -> dict[str, Any]:
    """Run in a fresh interpreter: open the store from its snapshot."""
    # both imported before the baseline
    import hnswlib  # noqa: F401

    import biotemplate as bt

    base = rss_mb()
    t, store = timed(lambda: bt.TemplateStore.open(
        root / "S", key_provider=bt.FileKeyProvider(root / "master.key"), clock=clock,
        index_params=params(), snapshot_on_close=False))
    gc.collect()
    out = {"baseline_mb": base, "open_s": t, "after_mb": rss_mb(),
           "peak_mb_vmhwm": peak_rss_mb(),
           "peak_mb_ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "indexed": store.stats().indexed}
    store.close()
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=1_000_000, help="identities (1 sample each)")
    p.add_argument("--dim", type=int, default=128, help="template dimension")
    p.add_argument("--seed", type=int, default=31, help="gallery seed")
    p.add_argument("--single", type=int, default=1000, help="probes timed one by one")
    p.add_argument("--nq-rank1", type=int, default=2000, help="mated probes for rank-1")
    p.add_argument("--rounds", type=int, default=3, help="alternating single-query passes")
    add_results_dir_arg(p)
    p.add_argument("--worker-open", help=argparse.SUPPRESS)
    args = p.parse_args()
    configure(args.n, args.results_dir)
    if args.worker_open:
        print(json.dumps(open_worker(Path(args.worker_open))))
        return

    name = f"bench_1m_d{args.dim}" + ("" if args.n == 1_000_000 else f"_n{args.n}")
    res: dict[str, Any] = {"dim": args.dim, "n": args.n, "M": M,
                           "ef_construction": EF_CONSTRUCTION, "ef_search": ef_default(), "k": K,
                           "seed": args.seed, "source": source_digest(), "phases_done": []}

    def save(phase: str) -> None:
        res["phases_done"].append(phase)
        write_json(name, res)

    from biotemplate.synthetic import make_gallery, probes

    t_start = time.perf_counter()
    log(f"generating gallery {args.n} x {args.dim}")
    t, g = timed(lambda: make_gallery(args.n, 1, args.dim, seed=args.seed))
    x = g.templates
    rng = np.random.default_rng(args.seed + 1)
    which = rng.choice(args.n, size=max(args.nq_rank1, args.single), replace=False)
    q = probes(g, which, seed=args.seed + 2)
    subject_ids = [f"S{i:07d}" for i in range(args.n)]
    del g
    gc.collect()
    res["data"] = {"generate_s": t, "vectors_mib": x.nbytes / 2**20, "probes": len(q),
                   "rss_mb_after_data": rss_mb()}
    log(f"  {t:.1f} s, rss {rss_mb():.0f} MB")

    # 1. raw build
    log("raw hnswlib add_items")
    rss0 = rss_mb()
    raw_t, raw_c, raw = raw_build_cpu(x)
    res["raw_build"] = {"add_items_s": raw_t, "add_items_cpu_s": raw_c,
                        "rss_growth_mb": rss_mb() - rss0}
    log(f"  {raw_t:.1f} s (CPU {raw_c:.1f} s)")
    save("raw_build")

    DATA.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench1m-", dir=DATA))
    try:
        # 2. enroll_many
        log("enroll_many")
        store = new_store(root, "S", args.dim, (PURPOSE,))
        rss0 = rss_mb()
        enrol_t, enrol_c, ids = timed_enrol(store, x, subject_ids)
        res["enroll_many"] = {"s": enrol_t, "cpu_s": enrol_c, "ratio_wall": enrol_t / raw_t,
                              "ratio_cpu": enrol_c / raw_c,
                              "rss_growth_mb": rss_mb() - rss0,
                              "peak_rss_mb_process": peak_rss_mb()}
        log(f"  {enrol_t:.1f} s (x{enrol_t / raw_t:.3f}; CPU {enrol_c:.1f} s, "
            f"x{enrol_c / raw_c:.3f}); process peak {peak_rss_mb():.0f} MB")
        save("enroll_many")
        row = rows_of(ids)
        del ids

        # 3. single-query p50, alternating passes
        single = q[: args.single]
        for v in single[:50]:
            raw.knn_query(v, k=K)
            store.search(v, purpose=PURPOSE, k=K, actor=ACTOR, mode=INV)
        log("single-query passes")
        p50 = passes({
            "raw_knn_k10": lambda: time_each(lambda v: raw.knn_query(v, k=K), single),
            "store_search_investigation": lambda: time_each(
                lambda v: store.search(v, purpose=PURPOSE, k=K, actor=ACTOR, mode=INV),
                single),
        }, args.rounds)
        lat: dict[str, Any] = {n: {"p50_us_per_round": v, "p50_us": median(v)}
                               for n, v in p50.items()}
        lat["ratio_investigation_vs_raw_k10"] = ratio_stats(
            p50["store_search_investigation"], p50["raw_knn_k10"])
        res["single"] = lat
        log(f"  p50 raw {lat['raw_knn_k10']['p50_us']:.0f} us, store "
            f"{lat['store_search_investigation']['p50_us']:.0f} us "
            f"(x{lat['ratio_investigation_vs_raw_k10']['ratio_median']:.2f})")
        save("single")

        # 4. rank-1 of mated probes
        qr, ident = q[: args.nq_rank1], which[: args.nq_rank1]
        log("rank-1: exact")
        ex_t, top_ex = timed(lambda: exact_topk(x, qr, 1, chunk=128)[:, 0])
        raw_t1, top_raw = timed(lambda: raw.knn_query(qr, k=K)[0][:, 0])
        st_t, out = timed(lambda: store.search_many(qr, purpose=PURPOSE, k=K, actor=ACTOR,
                                                    mode=INV))
        top_st = np.asarray([row[r.candidates[0].record_id] if r.candidates else -1
                             for r in out])
        r_ex = float((top_ex == ident).mean())
        r_raw = float((top_raw == ident).mean())
        r_st = float((top_st == ident).mean())
        res["rank1"] = {"probes": len(qr), "exact": r_ex, "raw_hnswlib": r_raw, "store": r_st,
                        "raw_minus_exact_pt": (r_raw - r_ex) * 100,
                        "store_minus_exact_pt": (r_st - r_ex) * 100,
                        "exact_s": ex_t, "raw_batch_s": raw_t1, "store_search_many_s": st_t}
        log(f"  exact {r_ex:.4f} raw {r_raw:.4f} store {r_st:.4f}")
        save("rank1")
        raw = out = None  # free the raw index before the open
        gc.collect()

        # 5. close (snapshot) and open from it in a fresh process
        log("close (writes snapshot)")
        close_t, _ = timed(store.close)
        snap = root / "S" / SNAPSHOT_FILE
        db_mib = sum(f.stat().st_size for f in (root / "S").rglob("*") if f.is_file()) / 2**20
        res["close"] = {"close_s": close_t,
                        "snapshot_mib": snap.stat().st_size / 2**20 if snap.exists() else None,
                        "store_dir_mib": db_mib}
        log(f"  {close_t:.1f} s, snapshot {res['close']['snapshot_mib']} MiB, "
            f"store dir {db_mib:.0f} MiB")
        save("close")
        x = None
        gc.collect()
        log("open from snapshot (fresh subprocess)")
        cmd = [sys.executable, __file__, "--worker-open", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800)
        o = json.loads(proc.stdout.strip().splitlines()[-1])
        o["open_vs_raw_build"] = o["open_s"] / raw_t
        res["open_snapshot"] = o
        log(f"  open {o['open_s']:.1f} s ({raw_t / o['open_s']:.1f}x faster than the raw "
            f"build), peak RSS {o['peak_mb_vmhwm']:.0f} MB (ru_maxrss "
            f"{o['peak_mb_ru_maxrss']:.0f} MB), indexed {o['indexed']}")
        save("open_snapshot")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        log(f"deleted {root}")
    res["elapsed_s"] = time.perf_counter() - t_start
    path = write_json(name, res)
    print(json.dumps({k: v for k, v in res.items() if k != "source"}, indent=2, default=float))
    print(f"\nwrote {shown(path)}")


def timed_enrol(store: bt.TemplateStore, x: np.ndarray,
                subject_ids: list[str]) -> tuple[float, float, list[str]]:
    c0, t0 = time.process_time(), time.perf_counter()
    ids = store.enroll_many(x, subject_ids=subject_ids, purposes=[PURPOSE], actor=ACTOR)
    return time.perf_counter() - t0, time.process_time() - c0, ids


if __name__ == "__main__":
    main()
