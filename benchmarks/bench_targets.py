"""Issue 4's targets: biotemplate vs raw hnswlib in the same process, on the same vectors,
with the same M / ef_construction / ef (the store's defaults: 16 / 200 / auto_ef(N)).

Who runs it: anyone checking the targets table of RESULTS.md, after a change to the
store's enrol, search, snapshot or rebuild paths. ~5 min at d=128 and ~10 min at d=512
for N=100k on 2 cores (a few seconds at --n 2000)::

    .venv/bin/python benchmarks/bench_targets.py --dim 128 --n 100000 --profile
    .venv/bin/python benchmarks/bench_targets.py --dim 512 --n 100000
    .venv/bin/python benchmarks/bench_targets.py --dim 128 --n 100000 --report  # table only

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

Prints the targets table (met / MISSED) and writes ``targets_d{dim}_n{n}.json`` to
--results-dir; ``--report`` prints that JSON's table as Markdown without running anything.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
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
    shown,
    source_digest,
    table,
    time_each,
    timed,
    timed_cpu,
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
    for v in single[:50]:
        raw.knn_query(v, k=K)
        store.search(v, purpose="all", k=K, actor=ACTOR, mode=INV)
    log("  single-query passes")
    p50 = passes({
        "raw_knn_k10": lambda: time_each(lambda v: raw.knn_query(v, k=K), single),
        "raw_knn_k40": lambda: time_each(lambda v: raw.knn_query(v, k=3 * K + 10), single),
        "store_search_investigation": lambda: time_each(
            lambda v: store.search(v, purpose="all", k=K, actor=ACTOR, mode=INV), single),
        "store_search_identification": lambda: time_each(
            lambda v: store.search(v, purpose="all", k=K, actor=ACTOR), single),
    }, args.rounds)
    lat = {name: {"p50_us_per_round": v, "p50_us": median(v)} for name, v in p50.items()}
    lat["ratio_investigation_vs_raw_k10"] = ratio_stats(p50["store_search_investigation"],
                                                        p50["raw_knn_k10"])
    lat["ratio_identification_vs_raw_k10"] = ratio_stats(p50["store_search_identification"],
                                                         p50["raw_knn_k10"])
    lat["ratio_raw_k40_vs_raw_k10"] = ratio_stats(p50["raw_knn_k40"], p50["raw_knn_k10"])
    # one more pass each for p99 (same probes); "p50_us" above stays the median of rounds
    lat["raw_knn_k10"]["extra_pass"] = percentiles_us(time_each(
        lambda v: raw.knn_query(v, k=K), single))
    lat["store_search_investigation"]["extra_pass"] = percentiles_us(time_each(
        lambda v: store.search(v, purpose="all", k=K, actor=ACTOR, mode=INV), single))
    res["A_single"] = lat
    log(f"  p50 raw {lat['raw_knn_k10']['p50_us']:.0f} us, store "
        f"{lat['store_search_investigation']['p50_us']:.0f} us "
        f"(x{lat['ratio_investigation_vs_raw_k10']['ratio_median']:.2f})")

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


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": name, "goal": target, "measured": measured,
                     "met": "n/a" if met is None else ("met" if met else "MISSED")})

    if "B_rank1" in res:
        r = res["B_rank1"]
        d = r["store"] - r["exact"]
        add("rank-1 mated (store vs exact)", "within 0.1 pt",
            f"{r['store']:.4f} vs {r['exact']:.4f} ({d * 100:+.2f} pt)", abs(d) <= 0.001)
    if "B_rank1_per_ef" in res:
        r = res["B_rank1_per_ef"]
        add("  rank-1 per ef (B), raw / store", "(report)",
            "; ".join(f"ef={p['ef']}: {p['rank1']:.4f}/{q['rank1']:.4f}"
                      for p, q in zip(r["raw"], r["store"], strict=True)), None)
        add("  smallest ef within 0.1 pt of exact (B), raw / store", "(report)",
            f"{r['smallest_ef_within_0.1pt_raw']} / {r['smallest_ef_within_0.1pt_store']}",
            None)
    if "A_rank1_per_ef_raw" in res:
        ex = res["A_batch"]["rank1_exact"]
        add("  rank-1 per ef (A, 1 sample/id), raw", f"(exact {ex:.4f})",
            "; ".join(f"ef={p['ef']}: {p['rank1']:.4f}" for p in res["A_rank1_per_ef_raw"]),
            None)
    if "A_single" in res:
        s = res["A_single"]["ratio_investigation_vs_raw_k10"]["ratio_median"]
        add("store.search p50 / knn_query(k=10) p50", "<= 1.2x", f"{s:.2f}x", s <= 1.2)
    if "A_batch" in res:
        s = res["A_batch"]["ratio_median"]
        add("search_many QPS / batch knn_query QPS", "(report)", f"{s:.2f}x", None)
    if "A_filter" in res:
        f = res["A_filter"]
        q10, r10 = f["store_p10_vs_all"]["qps_ratio"], f["store_p10_vs_all"]["recall_ratio"]
        r02 = f["store_p02_vs_all"]["recall_ratio"]
        add("filtered 10%: QPS vs unfiltered", ">= 0.5x", f"{q10:.2f}x", q10 >= 0.5)
        add("filtered 10%: recall vs unfiltered", ">= 0.95x", f"{r10:.3f}x", r10 >= 0.95)
        add("filtered 2%: recall vs unfiltered", ">= 0.95x", f"{r02:.3f}x", r02 >= 0.95)
        n10 = f["naive_p10_vs_all"]
        n02 = f["naive_p02_vs_all"]
        add("  naive filter= 10% (QPS, recall vs unfiltered)", "(compare)",
            f"{n10['qps_ratio']:.3f}x, {n10['recall_ratio']:.3f}x", None)
        add("  naive filter= 2% (QPS, recall vs unfiltered)", "(compare)",
            f"{n02['qps_ratio']:.3f}x, {n02['recall_ratio']:.3f}x", None)
    if "B_open" in res:
        o = res["B_open"]
        cpu = o.get("rebuild_vs_raw_build_cpu")
        add("rebuild (open w/o snapshot) / raw build", "<= 1.1x",
            f"{o['rebuild_vs_raw_build']:.3f}x wall" + (f", {cpu:.3f}x CPU" if cpu else ""),
            o["rebuild_vs_raw_build"] <= 1.1)
        add("open from snapshot vs rebuild", ">= 100x faster",
            f"{o['rebuild_vs_open_snapshot']:.0f}x ({o['open_snapshot_s']:.2f} s vs "
            f"{o['open_rebuild_s']:.1f} s)", o["rebuild_vs_open_snapshot"] >= 100)
    for key in ("A_build", "B_build"):
        if key in res:
            r, cpu = res[key]["ratio"], res[key].get("cpu_ratio")
            add(f"enroll_many / add_items ({key[0]})", "<= 1.2x",
                f"{r:.3f}x wall" + (f", {cpu:.3f}x CPU" if cpu else ""), r <= 1.2)
    if "B_rss" in res:
        r = res["B_rss"]["ratios"]
        s = r["open-snapshot_peak_vs_raw_peak"]
        add("peak RSS open (snapshot) / raw build", "<= 1.3x", f"{s:.2f}x", s <= 1.3)
        s = r["open-rebuild_peak_vs_raw_peak"]
        add("peak RSS open (rebuild) / raw build", "<= 1.3x", f"{s:.2f}x", s <= 1.3)
        s = r["open-snapshot_steady_vs_raw_index_only"]
        add("  steady RSS over baseline, open (snapshot) / raw index", "(report)",
            f"{s:.2f}x", None)
    return rows


def report(path: Path) -> str:
    """The targets table of one run's JSON, as Markdown (for RESULTS.md)."""
    res = json.loads(path.read_text())
    rows = [[r["target"].strip(), r["goal"], r["measured"], r["met"]] for r in res["summary"]]
    return (f"**d = {res['dim']}, N = {res['n']:,}** (source "
            f"{res['source']['biotemplate_sha256']}, HEAD {res['source']['git_head'][:7]}, "
            f"biotemplate/ dirty: {res['source']['biotemplate_dirty']}; run took "
            f"{res['elapsed_s'] / 60:.1f} min)\n\n" + md(rows, ["target", "goal", "measured", ""]))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dim", type=int, default=128, help="template dimension")
    p.add_argument("--n", type=int, default=10_000,
                   help="records (A: n identities x 1; B: n/4 identities x 4)")
    p.add_argument("--nq", type=int, default=2000, help="mated probes of data set A")
    p.add_argument("--nq-rank1", type=int, default=5000, help="mated probes of data set B")
    p.add_argument("--single", type=int, default=1000, help="probes timed one by one")
    p.add_argument("--filter-queries", type=int, default=500,
                   help="probes of the filtered-search test (at most 1%% of n)")
    p.add_argument("--rounds", type=int, default=3, help="alternating passes per timing")
    p.add_argument("--parts", default="1,2", help="1: data set A, 2: data set B")
    p.add_argument("--profile", action="store_true", help="cProfile search and rebuild")
    p.add_argument("--report", action="store_true",
                   help="print the Markdown table of targets_d{dim}_n{n}.json and exit")
    add_results_dir_arg(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    configure(args.n, args.results_dir)
    if args.worker:
        print(json.dumps(rss_worker(args)))
        return
    if args.report:
        print(report(results_dir() / f"targets_d{args.dim}_n{args.n}.json"))
        return

    res: dict[str, Any] = {"dim": args.dim, "n": args.n, "M": M,
                           "ef_construction": EF_CONSTRUCTION, "ef_search": ef_default(), "k": K,
                           "source": source_digest()}
    DATA.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="targets-", dir=DATA))
    t0 = time.perf_counter()
    try:
        if "1" in args.parts:
            part1(args, root, res)
        if "2" in args.parts:
            part2(args, root, res)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res["elapsed_s"] = time.perf_counter() - t0
    res["summary"] = summary(res)
    print(f"\nd={args.dim}  N={args.n}  M={M} ef_construction={EF_CONSTRUCTION} "
          f"ef={ef_default()} k={K}  (ratios: biotemplate / raw hnswlib, same process)")
    print(table(res["summary"], [("target", "target", ""), ("goal", "goal", ""),
                                 ("measured", "measured", ""), ("met", "", "")]))
    for key in ("A_profile_search", "A_profile_search_many", "B_profile_rebuild_index"):
        if key in res:
            print(f"\n--- {key} (cProfile, by tottime)\n{res[key]}")
    path = write_json(f"targets_d{args.dim}_n{args.n}", res)
    print(f"\nwrote {shown(path)}")


if __name__ == "__main__":
    main()
