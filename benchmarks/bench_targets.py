"""Issues 4 and 13's targets: biotemplate vs raw hnswlib in the same process, on the same
vectors, with the same M / ef_construction / ef (the store's defaults: 32 / 200 /
auto_ef(N)).

Who runs it: anyone checking the targets table of RESULTS.md, after a change to the
store's enrol, search, snapshot, rebuild or removal paths. One command runs every target
at d=128 and d=512 (~10 + ~15 min for N=100k on 2 cores; seconds at --n 2000)::

    .venv/bin/python benchmarks/bench_targets.py --profile                  # everything
    .venv/bin/python benchmarks/bench_targets.py --dims 128 --parts 0       # one part
    .venv/bin/python benchmarks/bench_targets.py --report                   # table only

Part 0: the per-search overhead at --small-n (20k), where it weighs most.
Part 1 (data set A, n identities x 1 sample; store purpose "all"):
  raw ``add_items`` vs ``enroll_many``; single-query p50 of ``knn_query(k=10)`` vs
  ``store.search(k=10)`` (policy checks and audit entry included), measured in alternating
  passes over the same probes; batch ``knn_query`` vs ``search_many``; recall@10.
  Then the same vectors' 10% and 2% subsets are enrolled again as records of purposes
  "p10" and "p02" (same subjects) for the filtered-search test, compared with hnswlib's
  ``filter=`` callable on the one raw index (the naive approach).
Part 2 (data set B, n/4 identities x 4 samples; store purpose "bench"):
  raw build vs ``enroll_many`` again; rank-1 of mated probes (raw, biotemplate, exact, and
  per ef); close (writes the sealed snapshot); ``TemplateStore.open`` with the snapshot vs
  without it (a rebuild from the sealed rows) vs the raw build; peak RSS of a raw index
  build, of an open from the snapshot and of an open by rebuild, each in a fresh subprocess.
Part 3 (at --purge-dim only): bench_purge.py in its own process: removal cost per record,
  and search latency while a purge of 10% and its background repair run.

Prints the targets table (met / not met), draws ``targets_n{n}.png`` (plot.py) and writes
``targets_d{dim}_n{n}.json`` to --results-dir; ``--report`` prints that JSON's table as
Markdown without running anything.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from common import (
    ACTOR,
    DATA,
    EF_CONSTRUCTION,
    INV,
    SAMPLES_B,
    SNAPSHOT_FILE,
    K,
    M,
    add_results_dir_arg,
    configure,
    data_a,
    data_b,
    ef_default,
    exact_topk,
    log,
    md,
    median,
    new_store,
    open_store,
    parser,
    passes,
    peak_rss_mb,
    percentiles_us,
    ratio_stats,
    raw_build_cpu,
    recall_at_k,
    results_dir,
    rows_of,
    rss_mb,
    search_split,
    shown,
    source_digest,
    time_each,
    timed,
    timed_cpu,
    what_if,
    write_json,
)

if TYPE_CHECKING:
    import biotemplate as bt


def profile_calls(fn: Callable[[], Any], top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    return "\n".join(lines[:top + 8])


def rank1_efs() -> tuple[int, ...]:
    """The rank-1 sweep: fixed points and this run's default (auto) ef."""
    return tuple(sorted({32, 64, 128, 256, 512, ef_default()}))


def raw_rank1_sweep(index: Any, q: np.ndarray, truth: Callable[[np.ndarray], np.ndarray],
                    efs: tuple[int, ...] | None = None) -> list[dict[str, float]]:
    """Rank-1 of mated probes on a raw hnswlib index at each ef (``truth`` maps the top-1
    labels to a hit mask); restores ef=ef_default() afterwards."""
    out = []
    for ef in efs or rank1_efs():
        index.set_ef(ef)
        t, top = timed(lambda: index.knn_query(q, k=1)[0][:, 0])
        out.append({"ef": ef, "rank1": float(truth(top).mean()), "qps": len(q) / t})
    index.set_ef(ef_default())
    return out


def naive_filter(index: Any, q: np.ndarray, allowed: set[int], threads: int) -> list[list[int]]:
    """hnswlib's ``filter=`` on the one unfiltered index; rows it cannot fill are []."""
    def keep(label: int) -> bool:
        return label in allowed

    try:
        return index.knn_query(q, k=K, filter=keep, num_threads=threads)[0].tolist()
    except RuntimeError:
        out = []
        for v in q:
            try:
                out.append(index.knn_query(v, k=K, filter=keep, num_threads=1)[0][0].tolist())
            except RuntimeError:
                out.append([])
        return out


def single_search(store: Any, raw: Any, purpose: str, single: np.ndarray,
                  rounds: int) -> dict[str, Any]:
    """Single-query p50 of raw ``knn_query(k=10)`` and ``store.search`` in alternating
    passes over the same probes; the overhead (store p50 - raw p50 of each round); the
    split of a search into its steps; the what-if passes (common.what_if)."""
    for v in single[:50]:
        raw.knn_query(v, k=K)
        store.search(v, purpose=purpose, k=K, actor=ACTOR, mode=INV)
    p50 = passes({
        "raw_knn_k10": lambda: time_each(lambda v: raw.knn_query(v, k=K), single),
        "raw_knn_k40": lambda: time_each(lambda v: raw.knn_query(v, k=3 * K + 10), single),
        "store_search_investigation": lambda: time_each(
            lambda v: store.search(v, purpose=purpose, k=K, actor=ACTOR, mode=INV), single),
        "store_search_identification": lambda: time_each(
            lambda v: store.search(v, purpose=purpose, k=K, actor=ACTOR), single),
    }, rounds)
    lat: dict[str, Any] = {name: {"p50_us_per_round": v, "p50_us": median(v)}
                           for name, v in p50.items()}
    for mode in ("investigation", "identification"):
        lat[f"ratio_{mode}_vs_raw_k10"] = ratio_stats(p50[f"store_search_{mode}"],
                                                      p50["raw_knn_k10"])
        lat[f"overhead_{mode}_us"] = median([s - r for s, r in zip(
            p50[f"store_search_{mode}"], p50["raw_knn_k10"], strict=True)])
    lat["ratio_raw_k40_vs_raw_k10"] = ratio_stats(p50["raw_knn_k40"], p50["raw_knn_k10"])
    # one more pass each for p99 (same probes); "p50_us" above stays the median of rounds
    lat["raw_knn_k10"]["extra_pass"] = percentiles_us(time_each(
        lambda v: raw.knn_query(v, k=K), single))
    lat["store_search_investigation"]["extra_pass"] = percentiles_us(time_each(
        lambda v: store.search(v, purpose=purpose, k=K, actor=ACTOR, mode=INV), single))
    few = single[:300]
    lat["split_investigation_us"] = search_split(store, purpose, few)
    lat["split_identification_us"] = search_split(store, purpose, few, mode="identification")
    lat["what_if"] = what_if(store, raw, purpose, few, rounds)
    return lat


def overhead_small(args: argparse.Namespace, root: Path, res: dict[str, Any]) -> None:
    """The per-search overhead at a small gallery (--small-n), where it weighs most."""
    a = data_a(args.dim, args.small_n, 500)
    log(f"overhead at N={args.small_n}: raw build and enroll_many")
    _, _, raw = raw_build_cpu(a.x, ef=ef_default(args.small_n))
    store = new_store(root, "small", args.dim, ("all",))
    store.enroll_many(a.x, subject_ids=[f"S{i:07d}" for i in range(len(a.x))],
                      purposes=["all"], actor=ACTOR)
    out = single_search(store, raw, "all", a.q[:300], args.rounds)
    out["n"], out["ef"] = args.small_n, ef_default(args.small_n)
    res["small"] = out
    log(f"  overhead {out['overhead_investigation_us']:.0f} us (investigation), "
        f"{out['overhead_identification_us']:.0f} us (identification)")
    store.close()


# --- part 1 -----------------------------------------------------------------------------


def part1(args: argparse.Namespace, root: Path, res: dict[str, Any]) -> None:
    a = data_a(args.dim, args.n, args.nq)
    n = len(a.x)
    log("part 1: raw hnswlib build (A)")
    raw_t, raw_c, raw = raw_build_cpu(a.x)
    log(f"  raw add_items {raw_t:.1f} s (CPU {raw_c:.1f} s); enroll_many (A)")
    store = new_store(root, "A", args.dim, ("all", "p10", "p02"))
    subject_ids = [f"S{i:07d}" for i in range(n)]
    enrol_t, enrol_c, ids = timed_cpu(lambda: store.enroll_many(
        a.x, subject_ids=subject_ids, purposes=["all"], actor=ACTOR))
    row = rows_of(ids)
    res["A_build"] = {"raw_add_items_s": raw_t, "enroll_many_s": enrol_t,
                      "ratio": enrol_t / raw_t, "raw_add_items_cpu_s": raw_c,
                      "enroll_many_cpu_s": enrol_c, "cpu_ratio": enrol_c / raw_c}
    log(f"  enroll_many {enrol_t:.1f} s  (x{enrol_t / raw_t:.3f}; CPU {enrol_c:.1f} s, "
        f"x{enrol_c / raw_c:.3f})")

    def bio_rows(r: bt.SearchResult) -> list[int]:
        return [row[c.record_id] for c in r.candidates]

    # single-query latency, alternating passes over the same probes
    single = a.q[: args.single]
    log("  single-query passes, the split of a search, what-if passes")
    res["A_single"] = single_search(store, raw, "all", single, args.rounds)
    lat = res["A_single"]
    log(f"  p50 raw {lat['raw_knn_k10']['p50_us']:.0f} us, store "
        f"{lat['store_search_investigation']['p50_us']:.0f} us "
        f"(x{lat['ratio_investigation_vs_raw_k10']['ratio_median']:.2f}, overhead "
        f"{lat['overhead_investigation_us']:.0f} us)")

    # batch
    log("  batch passes")
    bt_raw, bt_bio, found_raw, found_bio = [], [], None, None
    for r in range(args.rounds):
        for which in (("raw", "bio") if r % 2 == 0 else ("bio", "raw")):
            if which == "raw":
                t, found_raw = timed(lambda: raw.knn_query(a.q, k=K)[0])
                bt_raw.append(t)
            else:
                t, found_bio = timed(lambda: store.search_many(a.q, purpose="all", k=K,
                                                               actor=ACTOR, mode=INV))
                bt_bio.append(t)
    assert found_raw is not None and found_bio is not None
    qps_raw = [len(a.q) / t for t in bt_raw]
    qps_bio = [len(a.q) / t for t in bt_bio]
    res["A_batch"] = {"raw_qps": median(qps_raw), "store_qps": median(qps_bio),
                      **ratio_stats(qps_bio, qps_raw),
                      "recall_at_10_raw": recall_at_k(found_raw, a.gt),
                      "recall_at_10_store": recall_at_k([bio_rows(r) for r in found_bio], a.gt),
                      "rank1_raw": float((found_raw[:, 0] == a.q_ident).mean()),
                      "rank1_store": float(np.mean([bool(r.candidates) and
                                                    row[r.candidates[0].record_id] == i
                                                    for r, i in zip(found_bio, a.q_ident,
                                                                    strict=True)])),
                      "rank1_exact": float(a.exact_rank1.mean())}
    log(f"  batch QPS raw {median(qps_raw):.0f}, store {median(qps_bio):.0f}")

    if args.profile:
        res["A_profile_search"] = profile_calls(lambda: [
            store.search(v, purpose="all", k=K, actor=ACTOR, mode=INV) for v in single])
        res["A_profile_search_many"] = profile_calls(lambda: store.search_many(
            a.q, purpose="all", k=K, actor=ACTOR, mode=INV))

    filtered(args, a, raw, store, subject_ids, row, res)
    store.close()
    res["A_rank1_per_ef_raw"] = raw_rank1_sweep(raw, a.q, lambda top: top == a.q_ident)
    log("  rank-1 per ef (A, raw): " + ", ".join(
        f"ef={p['ef']}: {p['rank1']:.4f}" for p in res["A_rank1_per_ef_raw"])
        + f"  (exact {a.exact_rank1.mean():.4f})")


def filtered(args: argparse.Namespace, a: Any, raw: Any, store: bt.TemplateStore,
             subject_ids: list[str], row: dict[str, int], res: dict[str, Any]) -> None:
    n = len(a.x)
    rng = np.random.default_rng(7)
    sizes = {"p10": n // 10, "p02": n // 50}
    nf = min(args.filter_queries, sizes["p02"] // 2)
    probe_rows = a.q_ident[:nf]
    q = a.q[:nf]
    subsets: dict[str, np.ndarray] = {}
    for name, size in sizes.items():
        others = np.setdiff1d(np.arange(n), probe_rows)
        extra = rng.choice(others, size=size - nf, replace=False)
        subsets[name] = np.sort(np.concatenate([probe_rows, extra]))
    log(f"filtered search: p10={sizes['p10']} p02={sizes['p02']} records, {nf} mated probes")
    subset_row: dict[str, dict[str, int]] = {}
    enrol_subsets = {}
    for name, rows in subsets.items():
        t, ids = timed(lambda rows=rows, name=name: store.enroll_many(
            a.x[rows], subject_ids=[subject_ids[i] for i in rows], purposes=[name],
            actor=ACTOR))
        enrol_subsets[name] = t
        subset_row[name] = {rid: int(r) for rid, r in zip(ids, rows, strict=True)}
    gt_all = exact_topk(a.x, q, K)

    def bio(purpose: str) -> tuple[float, float, float]:
        mapping = row if purpose == "all" else subset_row[purpose]
        gt = gt_all if purpose == "all" else subsets[purpose][exact_topk(a.x[subsets[purpose]],
                                                                         q, K)]
        store.search_many(q[:20], purpose=purpose, k=K, actor=ACTOR, mode=INV)
        times, out = [], None
        for _ in range(args.rounds):
            t, out = timed(lambda: store.search_many(q, purpose=purpose, k=K, actor=ACTOR,
                                                     mode=INV))
            times.append(t)
        assert out is not None
        lat = time_each(lambda v: store.search(v, purpose=purpose, k=K, actor=ACTOR, mode=INV),
                        q[: min(len(q), 300)])
        found = [[mapping[c.record_id] for c in r.candidates] for r in out]
        return nf / median(times), recall_at_k(found, gt), float(np.percentile(lat, 50)) * 1e6

    def naive(purpose: str | None) -> dict[str, Any]:
        """hnswlib on the one index: batch with 1 thread (the Python filter holds the GIL,
        more threads only contend for it), batch with all threads, and single queries."""
        if purpose is None:
            gt, allowed = gt_all, None
        else:
            gt = subsets[purpose][exact_topk(a.x[subsets[purpose]], q, K)]
            allowed = set(subsets[purpose].tolist())

        def run(qs: np.ndarray, threads: int) -> list[list[int]]:
            if allowed is None:
                return list(raw.knn_query(qs, k=K, num_threads=threads)[0].tolist())
            return naive_filter(raw, qs, allowed, threads)

        t1, found = timed(lambda: run(q, 1))
        few = q[: min(len(q), 100)]
        tn, _ = timed(lambda: run(few, -1))
        lat = time_each(lambda v: run(v[None, :], 1), few)
        return {"qps": nf / t1, "qps_all_threads": len(few) / tn,
                "recall_at_10": recall_at_k(found, gt),
                "p50_us": float(np.percentile(lat, 50)) * 1e6,
                "unfilled_rows": sum(1 for r in found if not r)}

    out: dict[str, Any] = {"sizes": sizes, "probes": nf, "enrol_subsets_s": enrol_subsets}
    for purpose in ("all", "p10", "p02"):
        qps, rec, p50 = bio(purpose)
        out[f"store_{purpose}"] = {"qps": qps, "recall_at_10": rec, "p50_us": p50}
        log(f"  store {purpose}: {qps:.0f} QPS, recall {rec:.4f}, p50 {p50:.0f} us")
    for purpose in (None, "p10", "p02"):
        key = f"naive_{purpose or 'all'}"
        out[key] = r = naive(purpose)
        log(f"  hnswlib filter= {purpose or 'none'}: {r['qps']:.0f} QPS (1 thread; "
            f"{r['qps_all_threads']:.0f} with all), recall {r['recall_at_10']:.4f}, "
            f"p50 {r['p50_us']:.0f} us")
    for purpose in ("p10", "p02"):
        s, u = out[f"store_{purpose}"], out["store_all"]
        out[f"store_{purpose}_vs_all"] = {"qps_ratio": s["qps"] / u["qps"],
                                          "recall_ratio": s["recall_at_10"] / u["recall_at_10"],
                                          "p50_ratio": s["p50_us"] / u["p50_us"]}
        nv, nu = out[f"naive_{purpose}"], out["naive_all"]
        out[f"naive_{purpose}_vs_all"] = {"qps_ratio": nv["qps"] / nu["qps"],
                                          "recall_ratio": nv["recall_at_10"] / nu["recall_at_10"],
                                          "p50_ratio": nv["p50_us"] / nu["p50_us"]}
    res["A_filter"] = out


# --- part 2 -----------------------------------------------------------------------------


def part2(args: argparse.Namespace, root: Path, res: dict[str, Any]) -> None:
    b = data_b(args.dim, args.n, args.nq_rank1)
    log("part 2: raw hnswlib build (B)")
    raw_t, raw_c, raw = raw_build_cpu(b.x)
    found = raw.knn_query(b.q, k=K)[0]
    raw_rank1 = float((found[:, 0] // SAMPLES_B == b.q_ident).mean())
    raw_sweep = raw_rank1_sweep(raw, b.q, lambda top: top // SAMPLES_B == b.q_ident)
    del raw
    gc.collect()
    log(f"  raw add_items {raw_t:.1f} s; enroll_many (B)")
    store = new_store(root, "B", args.dim, ("bench",))
    enrol_t, enrol_c, ids = timed_cpu(lambda: store.enroll_many(
        b.x, subject_ids=b.subject_ids, purposes=["bench"], actor=ACTOR))
    log(f"  enroll_many {enrol_t:.1f} s  (x{enrol_t / raw_t:.3f}; CPU {enrol_c:.1f} s vs "
        f"{raw_c:.1f} s, x{enrol_c / raw_c:.3f})")
    res["B_build"] = {"raw_add_items_s": raw_t, "enroll_many_s": enrol_t,
                      "ratio": enrol_t / raw_t, "raw_add_items_cpu_s": raw_c,
                      "enroll_many_cpu_s": enrol_c, "cpu_ratio": enrol_c / raw_c}

    ident = np.asarray([int(s[2:]) for s in b.subject_ids])
    row = rows_of(ids)
    out = store.search_many(b.q, purpose="bench", k=K, actor=ACTOR, mode=INV)
    top = [row[r.candidates[0].record_id] if r.candidates else -1 for r in out]
    bio_rank1 = float(np.mean([t >= 0 and ident[t] == i for t, i in zip(top, b.q_ident,
                                                                         strict=True)]))
    ident_out = store.search_many(b.q, purpose="bench", k=K, actor=ACTOR)
    thr = store.policy.purpose("bench").match_threshold
    bio_fnir_t = 1 - float(np.mean([bool(r.candidates) and ident[row[r.candidates[0].record_id]]
                                     == i for r, i in zip(ident_out, b.q_ident, strict=True)]))
    exact_fnir_t = 1 - float(np.mean(b.exact_rank1 & (b.exact_top1_sim >= thr)))
    res["B_rank1"] = {"probes": len(b.q), "identities": len(b.x) // SAMPLES_B,
                      "samples_per_identity": SAMPLES_B, "exact": float(b.exact_rank1.mean()),
                      "raw_hnswlib": raw_rank1, "store": bio_rank1,
                      "store_minus_exact": bio_rank1 - float(b.exact_rank1.mean()),
                      "raw_minus_exact": raw_rank1 - float(b.exact_rank1.mean()),
                      "threshold": thr, "fnir_at_threshold_exact": exact_fnir_t,
                      "fnir_at_threshold_store": bio_fnir_t}
    log(f"  rank-1 exact {b.exact_rank1.mean():.4f} raw {raw_rank1:.4f} store {bio_rank1:.4f}")

    close_t, _ = timed(store.close)
    snap = root / "B" / SNAPSHOT_FILE
    snap_mb = snap.stat().st_size / 2**20 if snap.exists() else None
    # rank-1 per ef: raw (above) and the store re-opened from its snapshot with ef_search=ef
    # (the store asks hnswlib for 3k+10 labels, so it searches with ef = max(ef, 40))
    store_sweep = []
    for ef in rank1_efs():
        if ef == ef_default():
            store_sweep.append({"ef": ef, "rank1": bio_rank1})
            continue
        s = open_store(root, "B", ef)
        t, out_ef = timed(lambda s=s: s.search_many(b.q, purpose="bench", k=K, actor=ACTOR,
                                                    mode=INV))
        s.close()
        hit = [bool(r.candidates) and ident[row[r.candidates[0].record_id]] == i
               for r, i in zip(out_ef, b.q_ident, strict=True)]
        store_sweep.append({"ef": ef, "rank1": float(np.mean(hit)), "qps": len(b.q) / t})
    exact_b = float(b.exact_rank1.mean())

    def smallest(sweep: list[dict[str, float]]) -> int | None:
        ok = [p["ef"] for p in sweep if p["rank1"] >= exact_b - 0.001]
        return min(ok) if ok else None

    res["B_rank1_per_ef"] = {"exact": exact_b, "raw": raw_sweep, "store": store_sweep,
                             "smallest_ef_within_0.1pt_raw": smallest(raw_sweep),
                             "smallest_ef_within_0.1pt_store": smallest(store_sweep)}
    log("  rank-1 per ef (B): raw " + ", ".join(f"{p['ef']}: {p['rank1']:.4f}"
                                                for p in raw_sweep)
        + "; store " + ", ".join(f"{p['ef']}: {p['rank1']:.4f}" for p in store_sweep))
    opens = []
    for _ in range(args.rounds):
        t, s = timed(lambda: open_store(root, "B"))
        s.close()
        opens.append(t)
    log(f"  open with snapshot {median(opens):.2f} s (snapshot {snap_mb} MiB); "
        "open without it (rebuild)")
    shutil.move(snap, snap.with_suffix(".bak"))
    rebuild_t, rebuild_c, s = timed_cpu(lambda: open_store(root, "B"))
    nrec = s.stats().indexed
    if args.profile:
        res["B_profile_rebuild_index"] = profile_calls(s.rebuild_index)
    s.close()
    shutil.move(snap.with_suffix(".bak"), snap)
    res["B_open"] = {"close_with_snapshot_s": close_t, "snapshot_mib": snap_mb,
                     "open_snapshot_s": median(opens), "open_snapshot_runs_s": opens,
                     "open_rebuild_s": rebuild_t, "indexed": nrec,
                     "open_rebuild_cpu_s": rebuild_c, "raw_add_items_cpu_s": raw_c,
                     "rebuild_vs_raw_build_cpu": rebuild_c / raw_c,
                     "rebuild_vs_raw_build": rebuild_t / raw_t,
                     "rebuild_vs_open_snapshot": rebuild_t / median(opens)}
    log(f"  rebuild {rebuild_t:.1f} s (x{rebuild_t / raw_t:.3f} raw build, "
        f"x{rebuild_t / median(opens):.0f} snapshot open)")

    rss = {}
    for kind in ("raw", "open-snapshot", "open-rebuild"):
        log(f"  RSS subprocess: {kind}")
        if kind == "open-rebuild":
            shutil.move(snap, snap.with_suffix(".bak"))
        try:
            rss[kind] = rss_subprocess(kind, args, root)
        finally:
            if kind == "open-rebuild":
                shutil.move(snap.with_suffix(".bak"), snap)
    base = rss["raw"]
    rss["ratios"] = {
        f"{k}_peak_vs_raw_peak": rss[k]["peak_mb"] / base["peak_mb"]
        for k in ("open-snapshot", "open-rebuild")} | {
        f"{k}_steady_vs_raw_index_only": (rss[k]["after_mb"] - rss[k]["baseline_mb"])
        / (base["index_only_mb"] - base["baseline_mb"]) for k in ("open-snapshot",
                                                                  "open-rebuild")}
    res["B_rss"] = rss


def rss_subprocess(kind: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--dim", str(args.dim), "--n",
           str(args.n), "--nq-rank1", str(args.nq_rank1), "--root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def rss_worker(args: argparse.Namespace) -> dict[str, Any]:
    # both imported before the baseline, in every kind of worker
    import hnswlib  # noqa: F401

    import biotemplate  # noqa: F401

    root = Path(args.root)
    if args.worker == "raw":
        base = rss_mb()
        b = data_b(args.dim, args.n, args.nq_rank1)
        x = b.x
        del b
        gc.collect()
        t, _, _index = raw_build_cpu(x)
        out = {"baseline_mb": base, "vectors_mb": x.nbytes / 2**20, "build_s": t}
        out["after_mb"] = rss_mb()
        del x
        gc.collect()
        out["index_only_mb"] = rss_mb()
        out["peak_mb"] = peak_rss_mb()
        return out
    base = rss_mb()
    t, store = timed(lambda: open_store(root, "B"))
    gc.collect()
    out = {"baseline_mb": base, "open_s": t, "after_mb": rss_mb(), "peak_mb": peak_rss_mb(),
           "indexed": store.stats().indexed}
    store.close()
    return out


# --- main -------------------------------------------------------------------------------


# --- the combined table (RESULTS.md) ------------------------------------------------------


def _get(res: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(res, dict) or key not in res:
            return None
        res = res[key]
    return res


def combined(runs: dict[int, dict[str, Any]]) -> str:
    """Every target, one column per dimension, as Markdown: the table of RESULTS.md."""
    dims = sorted(runs)
    rows: list[list[str]] = []

    def row(name: str, goal: str, values: dict[int, tuple[str, bool | None]], why: str = "",
            only: int | None = None) -> None:
        cells = [values[d][0] if d in values else "—" for d in dims]
        judged = [v[1] for d, v in values.items() if v[1] is not None
                  and (only is None or d == only)]
        if not judged:
            verdict = "(report)"
        elif all(judged):
            verdict = "**met**"
        else:
            missed = [str(d) for d, v in values.items() if v[1] is False
                      and (only is None or d == only)]
            verdict = "**not met**" + (f" (d={', '.join(missed)})" if len(dims) > 1 else "")
        rows.append([name, goal, *cells, verdict, why])

    def each(fn: Callable[[dict[str, Any]], tuple[str, bool | None] | None]
             ) -> dict[int, tuple[str, bool | None]]:
        out = {}
        for d in dims:
            try:
                got = fn(runs[d])
            except (KeyError, TypeError, ZeroDivisionError):
                got = None
            if got is not None:
                out[d] = got
        return out

    def overhead(key: str) -> Callable[[dict[str, Any]], tuple[str, bool]]:
        def fn(r: dict[str, Any]) -> tuple[str, bool]:
            lat = r[key]
            inv, ide = lat["overhead_investigation_us"], lat["overhead_identification_us"]
            return (f"{inv:.0f} us ({lat['store_search_investigation']['p50_us']:.0f} vs "
                    f"{lat['raw_knn_k10']['p50_us']:.0f}); identification {ide:.0f}",
                    inv <= 150)
        return fn

    small_n = next((_get(runs[d], "small", "n") for d in dims if _get(runs[d], "small")), None)
    n = runs[dims[0]]["n"]
    if small_n:
        row(f"per-search overhead, N={small_n:,}: store p50 - raw p50 (k=10, investigation)",
            "≤ 150 us", each(overhead("small")), "split and what-if below")
    row(f"per-search overhead, N={n:,}", "≤ 150 us", each(overhead("A_single")),
        "split below; hnswlib itself runs slower between Python steps")
    row(f"search p50 / raw knn_query p50, N={n:,}", "≤ 1.2x at d=512", each(lambda r: (
        f"{r['A_single']['ratio_investigation_vs_raw_k10']['ratio_median']:.2f}x",
        r["A_single"]["ratio_investigation_vs_raw_k10"]["ratio_median"] <= 1.2)), only=512)
    row(f"search_many QPS / batch knn_query QPS, N={n:,}", "≥ 0.9x", each(lambda r: (
        f"{r['A_batch']['ratio_median']:.2f}x ({r['A_batch']['store_qps']:.0f} vs "
        f"{r['A_batch']['raw_qps']:.0f})", r["A_batch"]["ratio_median"] >= 0.9)),
        "Python per probe beside the index's threads (profile: A_profile_search_many)")
    row("removal per record (the index's share of a purge of 10%)", "≤ 0.3 ms at d=512",
        each(lambda r: (f"{r['purge']['purge']['index_ms_per_record']:.4f} ms "
                        f"(repair after it: {r['purge']['purge']['repair_ms_per_record']:.1f}"
                        " ms a record, in the background)",
                        r["purge"]["purge"]["index_ms_per_record"] <= 0.3)),
        "bytes zeroed in place; links re-linked in the background")
    row("removal of one record (delete(): the index's share, p50)", "(report)", each(lambda r: (
        f"{r['purge']['delete']['index_share']['p50_ms']:.2f} ms (whole call "
        f"{r['purge']['delete']['whole']['p50_ms']:.1f} ms)", None)),
        "the rest: SQLite commit, keyring save, fsyncs")

    def stall(r: dict[str, Any]) -> tuple[str, bool]:
        sd = r["purge"]["search_during"]
        worst = max(sd["purge"].get("max_ms", 0), sd["repair"].get("max_ms", 0))
        return (f"max {worst:.0f} ms; p99 {sd['purge'].get('p99_ms', 0):.0f} ms during the "
                f"call, {sd['repair'].get('p99_ms', 0):.0f} ms during the repair (before: "
                f"{sd['before'].get('p99_ms', 0):.0f})", worst <= 100)
    row("longest search stall during a purge of 10% (and its repair)", "≤ 100 ms",
        each(stall), "see bench_purge.py")
    row("open from snapshot vs rebuild", "≥ 100x faster", each(lambda r: (
        f"{r['B_open']['rebuild_vs_open_snapshot']:.0f}x ({r['B_open']['open_snapshot_s']:.2f} "
        f"vs {r['B_open']['open_rebuild_s']:.1f} s)",
        r["B_open"]["rebuild_vs_open_snapshot"] >= 100)))
    row("peak RSS, open from snapshot / raw build", "≤ 1.3x", each(lambda r: (
        f"{r['B_rss']['ratios']['open-snapshot_peak_vs_raw_peak']:.2f}x "
        f"({r['B_rss']['open-snapshot']['peak_mb']:.0f} vs {r['B_rss']['raw']['peak_mb']:.0f} MB)",
        r["B_rss"]["ratios"]["open-snapshot_peak_vs_raw_peak"] <= 1.3)))
    row("peak RSS, open by rebuild / raw build", "≤ 1.3x (issue 4)", each(lambda r: (
        f"{r['B_rss']['ratios']['open-rebuild_peak_vs_raw_peak']:.2f}x",
        r["B_rss"]["ratios"]["open-rebuild_peak_vs_raw_peak"] <= 1.3)))
    row("rank-1 vs exact, B (4 samples/id)", "within 0.1 pt", each(lambda r: (
        f"{(r['B_rank1']['store'] - r['B_rank1']['exact']) * 100:+.2f} pt "
        f"({r['B_rank1']['store']:.4f})",
        abs(r["B_rank1"]["store"] - r["B_rank1"]["exact"]) <= 0.001)))
    row("rank-1 vs exact, A (1 sample/id)", "within 0.1 pt", each(lambda r: (
        f"{(r['A_batch']['rank1_store'] - r['A_batch']['rank1_exact']) * 100:+.2f} pt "
        f"({r['A_batch']['rank1_store']:.4f})",
        abs(r["A_batch"]["rank1_store"] - r["A_batch"]["rank1_exact"]) <= 0.001)))
    row("filtered 10%: QPS / recall vs unfiltered", "≥ 0.5x / ≥ 0.95x", each(lambda r: (
        f"{r['A_filter']['store_p10_vs_all']['qps_ratio']:.2f}x / "
        f"{r['A_filter']['store_p10_vs_all']['recall_ratio']:.3f}x",
        r["A_filter"]["store_p10_vs_all"]["qps_ratio"] >= 0.5
        and r["A_filter"]["store_p10_vs_all"]["recall_ratio"] >= 0.95)))
    row("filtered 2%: recall vs unfiltered", "≥ 0.95x", each(lambda r: (
        f"{r['A_filter']['store_p02_vs_all']['recall_ratio']:.3f}x",
        r["A_filter"]["store_p02_vs_all"]["recall_ratio"] >= 0.95)))
    row("rebuild (open without snapshot) / raw build", "≤ 1.1x", each(lambda r: (
        f"{r['B_open']['rebuild_vs_raw_build']:.2f}x (CPU "
        f"{r['B_open']['rebuild_vs_raw_build_cpu']:.2f}x)",
        r["B_open"]["rebuild_vs_raw_build"] <= 1.1)))
    for key in ("A", "B"):
        row(f"enroll_many / add_items ({key})", "≤ 1.2x", each(lambda r, key=key: (
            f"{r[f'{key}_build']['ratio']:.2f}x (CPU {r[f'{key}_build']['cpu_ratio']:.2f}x)",
            r[f"{key}_build"]["ratio"] <= 1.2)))
    head = ["target", "goal", *(f"d = {d}" for d in dims), "verdict", "note"]
    out = [md(rows, head)]
    splits = []
    for key, label in (("small", f"N={small_n:,}" if small_n else ""), ("A_single", f"N={n:,}")):
        for d in dims:
            sp = _get(runs[d], key, "split_investigation_us")
            if sp:
                splits.append((f"d={d}, {label}", sp, _get(runs[d], key, "what_if")))
    if splits:
        steps = [*dict.fromkeys(k for _, sp, _ in splits for k in sp if k != "total (mean)"),
                 "total (mean)"]
        srows = [[step, *(f"{sp.get(step, 0):.0f}" for _, sp, _ in splits)] for step in steps]
        out.append("Where a search's time goes (us per search, mean of 300, investigation, "
                   "k=10; wrappers add ~1 us a step):\n\n"
                   + md(srows, ["step", *(name for name, _, _ in splits)]))
        names = ["shipped", "no audit append", "no confirmation", "neither"]
        wrows = [[v, *(f"{wi[v]['overhead_us']:.0f}" if wi else "—" for _, _, wi in splits)]
                 for v in names]
        out.append("Overhead (store p50 - raw p50, us) with steps replaced by no-ops, for "
                   "comparison only (not the shipped code):\n\n"
                   + md(wrows, ["variant", *(name for name, _, _ in splits)]))
    first = runs[dims[0]]
    took = ", ".join(f"d={d}: {runs[d]['elapsed_s'] / 60:.0f} min" for d in dims)
    loads = ", ".join(f"d={d}: {runs[d].get('load', {}).get('start', ['?'])[0]:.1f}"
                      f"→{runs[d].get('load', {}).get('end', ['?'])[0]:.1f}"
                      if runs[d].get("load") else f"d={d}: ?" for d in dims)
    out.insert(0, f"N = {n:,}, M = {first['M']}, ef = auto_ef(N) = {first['ef_search']}, k = "
               f"{first['k']}; source {first['source']['biotemplate_sha256']} (HEAD "
               f"{first['source']['git_head'][:7]}, dirty: "
               f"{first['source']['biotemplate_dirty']}); 1-min load average {loads}; "
               f"run time {took}")
    return "\n\n".join(out)


def load_runs(dims: list[int], n: int) -> dict[int, dict[str, Any]]:
    runs = {}
    for d in dims:
        path = results_dir() / f"targets_d{d}_n{n}.json"
        if path.exists():
            runs[d] = json.loads(path.read_text())
    return runs


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512],
                   help="template dimensions, one run each")
    p.add_argument("--n", type=int, default=100_000,
                   help="records (A: n identities x 1; B: n/4 identities x 4)")
    p.add_argument("--small-n", type=int, default=20_000,
                   help="the per-search overhead is also measured at this N (0: not)")
    p.add_argument("--purge-dim", type=int, default=512,
                   help="the dimension the purge part (bench_purge.py) runs at (0: none)")
    p.add_argument("--nq", type=int, default=2000, help="mated probes of data set A")
    p.add_argument("--nq-rank1", type=int, default=5000, help="mated probes of data set B")
    p.add_argument("--single", type=int, default=1000, help="probes timed one by one")
    p.add_argument("--filter-queries", type=int, default=500,
                   help="probes of the filtered-search test (at most 1%% of n)")
    p.add_argument("--rounds", type=int, default=3, help="alternating passes per timing")
    p.add_argument("--parts", default="0,1,2,3",
                   help="0: overhead at --small-n, 1: data set A, 2: data set B, 3: purge")
    p.add_argument("--profile", action="store_true", help="cProfile search and rebuild")
    p.add_argument("--report", action="store_true",
                   help="print the combined Markdown tables of the runs' JSON and exit")
    add_results_dir_arg(p)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)  # RSS workers
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    configure(args.n, args.results_dir)
    if args.worker:
        print(json.dumps(rss_worker(args)))
        return
    if args.report:
        print(combined(load_runs(args.dims, args.n)))
        return
    args.small_n = min(args.small_n, args.n)
    for dim in args.dims:
        args.dim = dim
        res: dict[str, Any] = {"dim": dim, "n": args.n, "M": M,
                               "ef_construction": EF_CONSTRUCTION, "ef_search": ef_default(),
                               "k": K, "source": source_digest(),
                               "load": {"start": os.getloadavg()}}
        DATA.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="targets-", dir=DATA))
        t0 = time.perf_counter()
        try:
            if "0" in args.parts and args.small_n:
                overhead_small(args, root, res)
            if "1" in args.parts:
                part1(args, root, res)
            if "2" in args.parts:
                part2(args, root, res)
            if "3" in args.parts and dim == args.purge_dim:
                res["purge"] = purge(args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        res["load"]["end"] = os.getloadavg()
        res["elapsed_s"] = time.perf_counter() - t0
        for key in ("A_profile_search", "A_profile_search_many", "B_profile_rebuild_index"):
            if key in res:
                print(f"\n--- {key} (cProfile, by tottime)\n{res[key]}")
        path = write_json(f"targets_d{dim}_n{args.n}", res)
        log(f"wrote {shown(path)}")
    print(combined(load_runs(args.dims, args.n)))
    try:
        from plot import plot_targets

        log(f"wrote {shown(plot_targets(args.n, results_dir()))}")
    except ImportError:
        log("no matplotlib (the plot extra): targets_n*.png not drawn")


def purge(args: argparse.Namespace) -> dict[str, Any]:
    """bench_purge.py in its own process (its store, its memory), read back."""
    out = Path(tempfile.mkdtemp(prefix="purge-", dir=DATA))
    try:
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_purge.py")),
                        "--n", str(args.n), "--dim", str(args.dim), "--label", "targets",
                        "--results-dir", str(out)], check=True, timeout=7200)
        found: dict[str, Any] = json.loads(
            (out / f"purge_d{args.dim}_n{args.n}_targets.json").read_text())
        return found
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
