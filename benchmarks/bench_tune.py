"""What ef does tune_index pick, what added miss rate does it reach, and how fast do
searches run at it, against the fixed auto_ef curve?

Who runs it: whoever changes ``biotemplate.tuning`` or ``auto_ef``, or a deployment that
wants these numbers for its own size and dimension. ~3 min at 100k (d=128), ~6 min at
d=512, ~20 min at 1M (d=128) on 2 cores; seconds with --n 5000::

    .venv/bin/python benchmarks/bench_tune.py --dim 128 --n 100000
    .venv/bin/python benchmarks/bench_tune.py --dim 512 --n 100000
    .venv/bin/python benchmarks/bench_tune.py --dim 128 --n 1000000
    .venv/bin/python benchmarks/bench_tune.py --dim 128 --n 1000000 --m 32   # M=32 instead
    .venv/bin/python benchmarks/bench_tune.py --dim 128 --n 1000000 --compare  # M=16 | M=32
    .venv/bin/python benchmarks/bench_tune.py --dim 128 --n 100000 --report   # from the JSON

Method: data set A (``common.data_a``: N identities x 1 sample, the hard case for a
graph; 2000 fresh mated probes with exact top-1 as truth) is enrolled into a store with
the default parameters (M=32, or --m; ef_construction=200, ef = auto_ef(N)), threshold
0.55. Then, in this order:

1. ``index_health(sample=--health-sample, seed=1)`` at auto_ef: the added miss rate on
   the store's own templates perturbed to the threshold (see ``biotemplate/tuning.py``),
   and the graph's CPU time per probe on one thread;
2. single-probe ``store.search`` over 1000 of the mated probes (investigation, k=10):
   wall p50 and mean CPU time of the process per search (audit thread included; CPU time
   hardly moves when other jobs share the machine, wall time does), and rank-1 of all
   2000 against exact search (an independent check of misses, on probes the tuner never
   saw);
3. ``tune_index(--target)`` (default sample 9 / target probes), timed; its trials are
   the fixed-ef curve: added miss rate and graph time at every ef of its ladder;
4. steps 1 and 2 again at the tuned ef (health with the same seed: the same probes).

Writes ``tune_d{dim}_n{n}.json`` to --results-dir. Latencies on a shared machine are
noisy: compare within a run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from common import (
    ACTOR,
    INV,
    RESULTS,
    add_results_dir_arg,
    configure,
    data_a,
    fmt,
    log,
    md,
    new_store,
    parser,
    percentiles_us,
    results_dir,
    shown,
    table,
    time_each,
    timed,
    write_json,
)

PURPOSE = "bench"


def measure(store: Any, d: Any, health_sample: int, label: str) -> dict[str, Any]:
    """Health (seed 1), single-search p50 and rank-1 of the mated probes, at the ef in use."""
    health = store.index_health(PURPOSE, sample=health_sample, actor=ACTOR, seed=1).of(PURPOSE)
    miss = health.added_miss
    probe = d.q[:1000]
    cpu0 = time.process_time()
    lat = percentiles_us(time_each(
        lambda v: store.search(v, purpose=PURPOSE, k=10, actor=ACTOR, mode=INV), probe))
    search_cpu_us = 1e6 * (time.process_time() - cpu0) / len(probe)
    results = store.search_many(d.q, purpose=PURPOSE, k=10, actor=ACTOR, mode=INV)
    mates = [f"P-{int(i):07d}" for i in d.q_ident]
    rank1 = float(np.mean([bool(r.candidates) and r.candidates[0].subject_id == m
                           for r, m in zip(results, mates, strict=True)]))
    exact = float(np.mean(d.exact_rank1))
    row = {"config": label, "ef": health.ef, "source": health.ef_source,
           "found": health.found, "misses": miss.errors if miss else None,
           "added_miss": miss.value if miss else None, "miss_high": miss.high if miss else None,
           "graph_us": health.graph_us, "search_p50_us": lat["p50_us"],
           "search_cpu_us": search_cpu_us,
           "rank1": rank1, "exact_rank1": exact, "extra_fnir_pt": 100 * (exact - rank1)}
    log(f"{label}: ef={row['ef']} added miss {fmt(row['added_miss'], '.4f')} "
        f"({row['misses']}/{row['found']}), graph {row['graph_us']:.0f} us CPU, search p50 "
        f"{row['search_p50_us']:.0f} us ({search_cpu_us:.0f} us CPU), rank-1 {rank1:.4f} "
        f"(exact {exact:.4f})")
    return row


def run(args: Any) -> dict[str, Any]:
    d = data_a(args.dim, args.n)
    ids = [f"P-{i:07d}" for i in range(args.n)]
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        store = new_store(Path(tmp), "store", args.dim, (PURPOSE,))
        try:
            enrol_s, _ = timed(lambda: store.enroll_many(d.x, subject_ids=ids,
                                                         purposes=[PURPOSE], actor=ACTOR))
            log(f"enrolled {args.n} in {enrol_s:.0f} s")
            before = measure(store, d, args.health_sample, "auto_ef")
            started = time.perf_counter()
            report = store.tune_index(args.target, actor=ACTOR, sample=args.tune_sample,
                                      seed=2)
            tune_s = time.perf_counter() - started
            t = report.of(PURPOSE)
            log(f"tune_index: ef {t.ef} (met {t.met}) in {tune_s:.0f} s; {t.warning or ''}")
            after = measure(store, d, args.health_sample, "tuned")
        finally:
            store.close()
    trials = [{"ef": x.ef, "misses": x.misses, "found": x.found, "rate": x.rate,
               "graph_us": x.graph_us} for x in t.trials]
    return {"args": vars(args), "enrol_s": enrol_s, "tune_s": tune_s,
            "tune": {"ef": t.ef, "met": t.met, "auto_ef": t.auto_ef, "probes": report.probes,
                     "added_miss": t.added_miss.value if t.added_miss else None,
                     "added_miss_high": t.added_miss.high if t.added_miss else None,
                     "found": t.added_miss.trials if t.added_miss else None,
                     "before_rate": t.before.rate, "larger_m_advised": t.larger_m_advised,
                     "warning": t.warning},
            "rows": [before, after], "trials": trials}


COLUMNS = [("config", "config", ""), ("ef", "ef", "d"), ("added_miss", "added miss", ".4f"),
           ("misses", "misses", "d"), ("found", "of", "d"), ("graph_us", "graph CPU us", ".0f"),
           ("search_p50_us", "search p50 us", ".0f"),
           ("search_cpu_us", "search CPU us", ".0f"), ("rank1", "rank-1", ".4f"),
           ("exact_rank1", "exact", ".4f")]


def report(path: Path) -> None:
    import json

    data = json.loads(path.read_text())
    a, t = data["args"], data["tune"]
    print(f"d={a['dim']}, N={a['n']}: tuned ef {t['ef']} (auto_ef {t['auto_ef']}), target "
          f"{a['target']}, {t['probes']} probes, tune {data['tune_s']:.0f} s, "
          f"enrol {data['enrol_s']:.0f} s\n")
    print(md([[r["config"], str(r["ef"]), fmt(r["added_miss"], ".4f"),
               f"{r['misses']}/{r['found']}", fmt(r["miss_high"], ".4f"),
               f"{r['graph_us']:.0f}", f"{r['search_p50_us']:.0f}",
               f"{r['search_cpu_us']:.0f}",
               f"{r['rank1']:.4f} ({r['exact_rank1']:.4f})"] for r in data["rows"]],
             ["config", "ef", "added miss", "misses/found", "95% high", "graph CPU us/probe",
              "search p50 us (wall)", "search CPU us", "rank-1 (exact)"]))
    print()
    print(md([[str(x["ef"]), f"{x['rate']:.4f}", f"{x['misses']}/{x['found']}",
               f"{x['graph_us']:.0f}"] for x in data["trials"]],
             ["ef", "added miss", "misses/found", "graph CPU us/probe"]))


def compare(folder: Path, dim: int, n: int, ms: tuple[int, ...] = (16, 32)) -> None:
    """Issue 13, item 5: the tuned ef of each M's run side by side (its own JSON each)."""
    import json

    rows = []
    for m in ms:
        path = folder / (f"tune_d{dim}_n{n}.json" if m == 16 else f"tune_d{dim}_n{n}_m{m}.json")
        if not path.exists():
            rows.append([f"M={m}", "not run", "", "", "", "", "", "", "", ""])
            continue
        data = json.loads(path.read_text())
        t, (auto, tuned) = data["tune"], data["rows"]
        rows.append([f"M={m}", f"{data['enrol_s']:.0f}", f"{auto['ef']}: {auto['misses']}/"
                     f"{auto['found']}, rank-1 {auto['rank1']:.4f}, {auto['search_cpu_us']:.0f}",
                     f"**{t['ef']}**" + ("" if t["met"] else " (not met)"),
                     f"{fmt(t['added_miss'], '.4f')} "
                     f"(95 % high {fmt(t['added_miss_high'], '.4f')})",
                     f"{tuned['misses']}/{tuned['found']}",
                     f"{tuned['rank1']:.4f} ({tuned['exact_rank1']:.4f})",
                     f"{tuned['graph_us']:.0f}", f"{tuned['search_cpu_us']:.0f}",
                     f"{tuned['search_p50_us']:.0f}"])
    print(md(rows, ["M", "enrol s", "auto_ef: misses, rank-1, search CPU us",
                    "tuned ef", "tuner's added miss", "health misses", "rank-1 (exact)",
                    "graph CPU us/probe", "search CPU us", "search p50 us (wall)"]))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dim", type=int, default=128, help="template dimension")
    ap.add_argument("--n", type=int, default=100_000, help="gallery size (identities)")
    ap.add_argument("--target", type=float, default=0.001, help="target added miss rate")
    ap.add_argument("--tune-sample", type=int, default=None,
                    help="tune_index probes (default: the store's, 9 / target)")
    ap.add_argument("--health-sample", type=int, default=3000, help="index_health probes")
    ap.add_argument("--m", type=int, default=common.M,
                    help="HNSW M of the store (default 16; the 1M comparison also runs 32)")
    ap.add_argument("--work-dir", default=None, help="where the temporary store lives")
    ap.add_argument("--report", action="store_true", help="print a run's tables from its JSON")
    ap.add_argument("--compare", action="store_true",
                    help="print the M=16 and M=32 runs at --dim/--n side by side")
    add_results_dir_arg(ap)
    args = ap.parse_args()
    configure(args.n, args.results_dir)
    common.M = args.m  # read by common.params(): every store of this run is built with it
    name = f"tune_d{args.dim}_n{args.n}" + ("" if args.m == 16 else f"_m{args.m}")
    if args.report:
        report((results_dir() if args.results_dir else RESULTS) / f"{name}.json")
        return
    if args.compare:
        compare(results_dir() if args.results_dir else RESULTS, args.dim, args.n)
        return
    out = run(args)
    print(table(out["rows"], COLUMNS))
    print(table(out["trials"], [("ef", "ef", "d"), ("rate", "added miss", ".4f"),
                                ("misses", "misses", "d"), ("found", "of", "d"),
                                ("graph_us", "graph CPU us", ".0f")]))
    path = write_json(name, out)
    print(f"\nwrote {shown(path)}")


if __name__ == "__main__":
    main()
