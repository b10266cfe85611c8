"""Side by side: biotemplate vs raw hnswlib vs faiss IndexHNSWFlat vs chromadb (vs exact).

Who runs it: anyone choosing between biotemplate and a plain vector index, or checking
what the store's encryption, policy and audit cost against one. Needs the ``bench`` extra
(faiss-cpu, chromadb, matplotlib); ~4 min at d=128 and ~9 min at d=512 for N=100k on 2
cores::

    .venv/bin/python benchmarks/bench_compare.py --dim 128 --n 100000
    .venv/bin/python benchmarks/bench_compare.py --dim 512 --n 100000
    .venv/bin/python benchmarks/bench_compare.py --dim 128 --n 100000 --report  # tables only

Every system gets the same vectors (data set "A" of common.py: n identities x 1 sample,
mated probes as queries) and the same M / ef_construction / ef (the store's default for N,
auto_ef(N)), and runs in its own subprocess so that its peak RSS is its own. Per system:
build (enrol) time, single-query p50/p99 (k=10), batch QPS (all queries in one call),
recall@10 against exact search, rank-1 of the mated probes, peak RSS, and an ef sweep
(recall vs QPS) for the plot.

biotemplate is searched in "investigation" mode (up to k candidates, threshold ignored)
with max_candidates=100, so it returns the same k as the others; its queries run on the
index re-opened from its sealed snapshot, and each ef of the sweep is a re-open with
``IndexParams(ef_search=ef)``. Its search over-fetches 3k+10 = 40 labels, so hnswlib
searches it with ef = max(ef, 40). chromadb applies a new ef only in a fresh process, so
each ef of its sweep runs in one.

Writes ``compare_d{dim}_n{n}.json`` to --results-dir, then redraws the plot with plot.py
(``recall_qps_n{n}.png``, every dim of that n found there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    DATA,
    EF_CONSTRUCTION,
    FIXED_NOW,
    HERE,
    K,
    M,
    add_results_dir_arg,
    bench_policy,
    configure,
    data_a,
    ef_default,
    fmt,
    log,
    md,
    median,
    parser,
    peak_rss_mb,
    percentiles_us,
    recall_at_k,
    results_dir,
    rss_mb,
    shown,
    table,
    timed,
    write_json,
)

SYSTEMS = ("exact", "hnswlib", "biotemplate", "faiss", "chromadb")
DEFAULT_EFS = (32, 64, 128, 256, 512, 1024)


class System:
    """The interface each worker drives. ``query_*`` return row indices, best first."""

    name = "?"

    def build(self, x: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def set_ef(self, ef: int) -> None:
        raise NotImplementedError

    def query_one(self, v: np.ndarray) -> list[int]:
        raise NotImplementedError

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Exact(System):
    name = "exact"

    def build(self, x: np.ndarray) -> dict[str, Any]:
        self.x = x
        return {}

    def set_ef(self, ef: int) -> None:
        pass

    def query_one(self, v: np.ndarray) -> list[int]:
        sims = self.x @ v
        top = np.argpartition(-sims, K - 1)[:K]
        return top[np.argsort(-sims[top])].tolist()

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        from common import exact_topk

        return exact_topk(self.x, q, K).tolist()


class Hnsw(System):
    name = "hnswlib"

    def build(self, x: np.ndarray) -> dict[str, Any]:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=len(x), M=M, ef_construction=EF_CONSTRUCTION)
        self.index.add_items(x, np.arange(len(x)))
        return {}

    def set_ef(self, ef: int) -> None:
        self.index.set_ef(ef)

    def query_one(self, v: np.ndarray) -> list[int]:
        return self.index.knn_query(v, k=K)[0][0].tolist()

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        return self.index.knn_query(q, k=K)[0].tolist()


class Faiss(System):
    name = "faiss"

    def build(self, x: np.ndarray) -> dict[str, Any]:
        import faiss

        self.index = faiss.IndexHNSWFlat(x.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.add(x)
        return {"omp_threads": faiss.omp_get_max_threads()}

    def set_ef(self, ef: int) -> None:
        self.index.hnsw.efSearch = ef

    def query_one(self, v: np.ndarray) -> list[int]:
        return self.index.search(v[None, :], K)[1][0].tolist()

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        return self.index.search(q, K)[1].tolist()


class Chroma(System):
    """chromadb's embedded PersistentClient (durable, like biotemplate), embeddings given.

    chromadb 1.5 keeps a loaded collection's HNSW ef_search for the life of the process
    (``collection.modify`` is stored but not applied), so each ef of the sweep is measured
    in a fresh subprocess that re-opens the persisted collection after the modify.
    """

    name = "chromadb"

    def _client(self, path: Path) -> Any:
        import chromadb
        from chromadb.config import Settings

        return chromadb.PersistentClient(path=str(path),
                                         settings=Settings(anonymized_telemetry=False))

    def build(self, x: np.ndarray) -> dict[str, Any]:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-chroma-", dir=DATA))
        self.client = self._client(self.tmp)
        self.col = self.client.create_collection(
            "bench", embedding_function=None,
            configuration={"hnsw": {"space": "ip", "ef_construction": EF_CONSTRUCTION,
                                    "ef_search": ef_default(), "max_neighbors": M}})
        batch = self.client.get_max_batch_size()
        for s in range(0, len(x), batch):
            stop = min(len(x), s + batch)
            self.col.add(ids=[str(i) for i in range(s, stop)], embeddings=x[s:stop])
        return {"batch": batch, "configuration": self.col.configuration}

    def open_existing(self, path: Path) -> None:
        self.tmp = path
        self.client = self._client(path)
        self.col = self.client.get_collection("bench")

    def set_ef(self, ef: int) -> None:
        if ef != ef_default():
            raise RuntimeError("chromadb: ef changes need a fresh process (see sweep_point)")

    def sweep_point(self, ef: int, args: argparse.Namespace) -> dict[str, Any]:
        self.col.modify(configuration={"hnsw": {"ef_search": ef}})
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            target = Path(fh.name)
        cmd = [sys.executable, __file__, "--worker", "chromadb-sweep", "--out", str(target),
               "--dim", str(args.dim), "--n", str(args.n), "--nq", str(args.nq),
               "--repeats", str(args.repeats), "--path", str(self.tmp), "--efs", str(ef)]
        subprocess.run(cmd, timeout=args.timeout, check=True)
        out: dict[str, Any] = json.loads(target.read_text())
        target.unlink()
        return out

    def query_one(self, v: np.ndarray) -> list[int]:
        r = self.col.query(query_embeddings=[v], n_results=K, include=["distances"])
        return [int(i) for i in r["ids"][0]]

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        r = self.col.query(query_embeddings=q, n_results=K, include=["distances"])
        return [[int(i) for i in row] for row in r["ids"]]

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def chroma_sweep_worker(args: argparse.Namespace) -> dict[str, Any]:
    data = data_a(args.dim, args.n, args.nq)
    sysm = Chroma()
    sysm.open_existing(Path(args.path))
    return sweep_point(sysm, data, args.efs[0], args.repeats, set_ef=False)


def sweep_point(sysm: System, data: Any, ef: int, repeats: int, *,
                set_ef: bool = True) -> dict[str, Any]:
    if set_ef:
        sysm.set_ef(ef)
    sysm.query_batch(data.q[:100])  # warm-up (after a re-open)
    ts, res = [], None
    for _ in range(max(1, repeats - 1)):
        t, res = timed(lambda: sysm.query_batch(data.q))
        ts.append(t)
    assert res is not None
    first = np.array([r[0] if r else -1 for r in res])
    return {"ef": ef, "qps": len(data.q) / median(ts), "recall_at_10": recall_at_k(res, data.gt),
            "rank1": float((first == data.q_ident).mean())}


class Bio(System):
    name = "biotemplate"

    def build(self, x: np.ndarray) -> dict[str, Any]:
        import biotemplate as bt

        self.bt = bt
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-store-", dir=DATA))
        self.keys = bt.FileKeyProvider.generate(self.tmp / "master.key")
        self.path = self.tmp / "store"
        self.store = bt.TemplateStore.create(
            self.path, dim=x.shape[1], model="bench-v1", policy=bench_policy(),
            key_provider=self.keys, clock=lambda: FIXED_NOW,
            index_params=bt.IndexParams(M=M, ef_construction=EF_CONSTRUCTION,
                                        ef_search=ef_default()))
        c0 = time.process_time()
        t, ids = timed(lambda: self.store.enroll_many(
            x, subject_ids=[f"S{i:07d}" for i in range(len(x))], purposes=["bench"],
            actor="bench"))
        self.enrol_s, self.enrol_cpu_s = t, time.process_time() - c0
        self.row = {rid: i for i, rid in enumerate(ids)}
        self.extra = {"enrol_peak_rss_mb": peak_rss_mb()}
        self.extra["close_with_snapshot_s"], _ = timed(self.store.close)
        self.extra["open_from_snapshot_s"], _ = timed(lambda: self._open(ef_default()))
        return self.extra

    def _open(self, ef: int) -> None:
        self.store = self.bt.TemplateStore.open(
            self.path, key_provider=self.keys, clock=lambda: FIXED_NOW,
            snapshot_on_close=False,
            index_params=self.bt.IndexParams(M=M, ef_construction=EF_CONSTRUCTION,
                                              ef_search=ef))

    def set_ef(self, ef: int) -> None:
        self.store.close()
        self._open(ef)

    def query_one(self, v: np.ndarray) -> list[int]:
        res = self.store.search(v, purpose="bench", k=K, actor="bench", mode="investigation")
        return [self.row[c.record_id] for c in res.candidates]

    def query_batch(self, q: np.ndarray) -> list[list[int]]:
        res = self.store.search_many(q, purpose="bench", k=K, actor="bench",
                                     mode="investigation")
        return [[self.row[c.record_id] for c in r.candidates] for r in res]

    def close(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


IMPL: dict[str, Callable[[], System]] = {"exact": Exact, "hnswlib": Hnsw, "faiss": Faiss,
                                          "chromadb": Chroma, "biotemplate": Bio}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import biotemplate  # noqa: F401  (in every system's baseline RSS, as it always was)

    data = data_a(args.dim, args.n, args.nq)
    sysm = IMPL[args.worker]()
    out: dict[str, Any] = {"system": args.worker, "rss_before_build_mb": rss_mb()}
    t0, c0 = time.perf_counter(), time.process_time()
    out.update(sysm.build(data.x) or {})
    out["build_s"] = getattr(sysm, "enrol_s", time.perf_counter() - t0)
    out["build_cpu_s"] = getattr(sysm, "enrol_cpu_s", time.process_time() - c0)
    out["rss_after_build_mb"] = rss_mb()
    out["peak_rss_after_build_mb"] = peak_rss_mb()
    sysm.set_ef(ef_default())

    singles = data.q[: args.single]
    for v in singles[:50]:  # warm-up
        sysm.query_one(v)
    lat, top1 = [], []
    for v in singles:
        t, found = timed(lambda v=v: sysm.query_one(v))
        lat.append(t)
        top1.append(found[0] if found else -1)
    out["single"] = percentiles_us(lat)

    times, found = [], None
    for _ in range(args.repeats):
        t, found = timed(lambda: sysm.query_batch(data.q))
        times.append(t)
    assert found is not None
    out["batch_qps"] = len(data.q) / median(times)
    out["batch_times_s"] = times
    out["recall_at_10"] = recall_at_k(found, data.gt)
    first = np.array([r[0] if r else -1 for r in found])
    out["rank1"] = float((first == data.q_ident).mean())
    out["rank1_exact"] = float(data.exact_rank1.mean())
    out["extra_fnir_rank1"] = out["rank1_exact"] - out["rank1"]

    sweep = []
    if args.worker != "exact":
        for ef in args.efs:
            if isinstance(sysm, Chroma):
                point = sysm.sweep_point(ef, args)
            else:
                point = sweep_point(sysm, data, ef, args.repeats)
            sweep.append(point)
            log(f"  {args.worker} ef={ef}: {point['qps']:.0f} QPS, "
                f"recall@10 {point['recall_at_10']:.4f}")
    out["sweep"] = sweep
    out["peak_rss_mb"] = peak_rss_mb()
    sysm.close()
    return out


def run_worker(system: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        target = Path(fh.name)
    cmd = [sys.executable, __file__, "--worker", system, "--out", str(target),
           "--dim", str(args.dim), "--n", str(args.n), "--nq", str(args.nq),
           "--single", str(args.single), "--repeats", str(args.repeats),
           "--efs", ",".join(map(str, args.efs))]
    log(f"{system}: starting")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        log(f"{system}: FAILED (exit {proc.returncode})")
        target.unlink(missing_ok=True)
        return {"system": system, "error": f"worker exited {proc.returncode}"}
    out: dict[str, Any] = json.loads(target.read_text())
    target.unlink()
    log(f"{system}: done in {time.perf_counter() - t0:.0f} s")
    return out


def report(path: Path) -> str:
    """One run's JSON as Markdown: the main table at ef_default and the ef sweep."""
    res = json.loads(path.read_text())
    rows = []
    for s in res["systems"]:
        if "error" in s:
            rows.append([s["system"], "failed: " + s["error"]] + ["-"] * 9)
            continue
        rows.append([s["system"], fmt(s["build_s"], ".1f"), fmt(s.get("build_cpu_s"), ".1f"),
                     fmt(s["single"]["p50_us"], ".0f"), fmt(s["single"]["p99_us"], ".0f"),
                     fmt(s["batch_qps"], ".0f"), fmt(s["recall_at_10"], ".4f"),
                     fmt(s["rank1"], ".4f"), fmt(s["extra_fnir_rank1"] * 100, "+.2f"),
                     fmt(s["peak_rss_mb"], ".0f"),
                     fmt(s["rss_after_build_mb"] - s["rss_before_build_mb"], ".0f")])
    main_table = (f"**d = {res['dim']}, N = {res['n']:,}** (M={res['M']}, "
                  f"ef_construction={res['ef_construction']}, ef={res['ef_search']}, "
                  f"k={res['k']}, {res['nq']} mated probes, {res['single']} timed singly)\n\n"
                  + md(rows, ["system", "build / enrol s", "build CPU s", "single p50 us",
                              "single p99 us", "batch QPS", "recall@10", "rank-1",
                              "extra FNIR (pt)", "peak RSS MB", "RSS growth MB"]))
    sweep = [[s["system"], str(pt["ef"]), fmt(pt["qps"], ".0f"), fmt(pt["recall_at_10"], ".4f"),
              fmt(pt.get("rank1"), ".4f")]
             for s in res["systems"] for pt in s.get("sweep") or []]
    if not sweep:
        return main_table
    return (main_table + "\n\n" + f"ef sweep, d={res['dim']}:\n\n"
            + md(sweep, ["system", "ef", "batch QPS", "recall@10", "rank-1"]))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dim", type=int, default=128, help="template dimension")
    p.add_argument("--n", type=int, default=10_000, help="identities (1 sample each)")
    p.add_argument("--nq", type=int, default=2000, help="mated probes (batch, recall)")
    p.add_argument("--single", type=int, default=1000, help="probes timed one by one")
    p.add_argument("--repeats", type=int, default=3, help="batch passes (median)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    p.add_argument("--efs", default=",".join(map(str, DEFAULT_EFS)), help="the ef sweep")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    p.add_argument("--report", action="store_true",
                   help="print the Markdown tables of compare_d{dim}_n{n}.json and exit")
    add_results_dir_arg(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    configure(args.n, args.results_dir)
    args.efs = [int(e) for e in str(args.efs).split(",")]

    if args.worker:
        result = chroma_sweep_worker(args) if args.worker == "chromadb-sweep" else worker(args)
        Path(args.out).write_text(json.dumps(result, default=float))
        return
    if args.report:
        print(report(results_dir() / f"compare_d{args.dim}_n{args.n}.json"))
        return

    log(f"data set A: d={args.dim} n={args.n} (generated and cached on first use)")
    t, _ = timed(lambda: data_a(args.dim, args.n, args.nq))
    log(f"data ready in {t:.1f} s")
    rows = [run_worker(s, args) for s in args.systems.split(",")]
    flat = []
    for r in rows:
        if "error" in r:
            flat.append({"system": r["system"], "build_s": None})
            continue
        flat.append({"system": r["system"], "build_s": r["build_s"],
                     "p50": r["single"]["p50_us"], "p99": r["single"]["p99_us"],
                     "qps": r["batch_qps"], "recall": r["recall_at_10"], "rank1": r["rank1"],
                     "fnir": r["extra_fnir_rank1"] * 100, "rss": r["peak_rss_mb"],
                     "rss_idx": r["rss_after_build_mb"] - r["rss_before_build_mb"]})
    print(f"\nd={args.dim}  N={args.n}  M={M} ef_construction={EF_CONSTRUCTION} "
          f"ef={ef_default()} k={K}  queries={args.nq} (single: {args.single})")
    print(table(flat, [("system", "system", ""), ("build_s", "build s", ".1f"),
                       ("p50", "p50 us", ".0f"), ("p99", "p99 us", ".0f"),
                       ("qps", "batch QPS", ".0f"), ("recall", "recall@10", ".4f"),
                       ("rank1", "rank-1", ".4f"), ("fnir", "extra FNIR %", ".2f"),
                       ("rss", "peak RSS MB", ".0f"), ("rss_idx", "RSS after-before MB", ".0f")]))
    path = write_json(f"compare_d{args.dim}_n{args.n}",
                      {"dim": args.dim, "n": args.n, "nq": args.nq, "single": args.single,
                       "M": M, "ef_construction": EF_CONSTRUCTION, "ef_search": ef_default(),
                       "k": K, "systems": rows})
    print(f"\nwrote {shown(path)}")
    # the plot is its own script (run, not imported: scripts share only common.py)
    plot = subprocess.run([sys.executable, str(HERE / "plot.py"), "--n", str(args.n),
                           "--results-dir", str(results_dir())], check=False)
    if plot.returncode != 0:
        print(f"no plot (plot.py exited {plot.returncode})")


if __name__ == "__main__":
    main()
