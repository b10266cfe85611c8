"""The PostgreSQL backend with several instances (issue 10, point 7), against SQLite.

Every instance runs in an OS process of its own (this script re-started with ``--worker``,
driven over stdin/stdout); the parent only generates the data and keeps the clock. Phases
(``--phases``), each repeated ``--repeat`` times:

- ``enrol``: a fresh store on each backend (PostgreSQL schema ``bench_pg_<random>`` /
  SQLite folder), ``enroll_many`` in batches of ``--batch``; then, on that handle,
  ``--probes`` identification searches (k=10, mated probes) one at a time: p50/p99.
- ``join``: a new instance opens the PostgreSQL store: by rebuild (an empty
  ``snapshot_dir``), then from the sealed snapshot that instance wrote. Wall and CPU time,
  and the instance's RSS before/after the open (the memory per template of an index).
- ``lag``: instance A enrols one new subject at a time; instance B searches for it in a
  loop (1 ms apart) from before A starts. Lag = B's first hit minus A's acknowledgement
  (``time.time()`` in both processes, one host). Also A's ``enroll`` latency.
- ``qps``: 1, 2 and 4 instances search in a loop for ``--seconds``, started together.

Instances open from copies of one snapshot (each its own ``snapshot_dir``) and the default
``poll_interval`` (0.5 s). The schema is dropped at the end, also after an error. A call
that fails with a lost connection (another client ending our sessions) is retried and
listed under ``retries`` in the JSON; ``stored`` > ``records`` means a retried batch had
in fact committed.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pg.py --n 100000 --dim 128   # 19 min at load 6
    PYTHONPATH=. .venv/bin/python benchmarks/bench_pg.py --quick                # 10k, ~3 min
    PYTHONPATH=. .venv/bin/python benchmarks/bench_pg.py --n 20000 --dim 512 --phases join
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import common
import numpy as np

URL = os.environ.get("BIOTEMPLATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
PURPOSE, ACTOR, TTL = "watchlist", "bench", timedelta(days=365)
POLICY = {"epoch": "1d", "purposes": {PURPOSE: {
    "max_retention": "3y", "modes": ["identification", "investigation"],
    "match_threshold": 0.55, "max_candidates": 20}}}
PHASES = ("enrol", "join", "lag", "qps")
# Calls that failed with a lost connection and were retried, per worker. On a shared server
# another client may end our sessions (the test suite's pg_terminate_backend of every
# "biotemplate" connection does); the library then fails the call and reconnects on the next.
RETRIES: list[str] = []


def retried(what: str, fn: Any, *args: Any, tries: int = 5, **kw: Any) -> Any:
    """``fn(*args, **kw)``, again after a StorageError (a lost connection), up to ``tries``
    times."""
    import biotemplate as bt

    for attempt in range(tries):
        try:
            return fn(*args, **kw)
        except bt.StorageError as exc:
            RETRIES.append(f"{what}: {exc}")
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    raise AssertionError


# --- the worker: one instance in its own process ------------------------------------------


def worker() -> None:
    """Answer JSON commands from stdin, one line each, until ``exit``."""
    import biotemplate as bt

    store: Any = None
    base_rss = common.rss_mb()  # after importing biotemplate, numpy, hnswlib, psycopg
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "exit":
                return
            if op == "close":
                if store is not None:
                    store.close()
                store, out = None, True
            elif op == "build":
                store, out = _build(bt, **cmd)
            elif op == "open":
                keys = bt.FileKeyProvider(Path(cmd["key"]))
                c0, t0 = time.process_time(), time.perf_counter()
                store = retried("open", bt.TemplateStore.open, cmd["url"], key_provider=keys,
                                snapshot_dir=cmd.get("snapshot_dir"))
                t, c = time.perf_counter() - t0, time.process_time() - c0
                out = {"s": t, "cpu_s": c, "records": store.stats().indexed,
                       "rss_before_mb": base_rss, "rss_mb": common.rss_mb(),
                       "peak_rss_mb": common.peak_rss_mb()}
            elif op == "snapshot":
                t0 = time.perf_counter()
                retried("snapshot", store.snapshot)
                t = time.perf_counter() - t0
                out = {"s": t}
            elif op == "enroll_one":
                t0 = time.time()
                retried("enroll", store.enroll, np.asarray(cmd["template"], dtype=np.float32),
                        subject_id=cmd["subject"], purposes=[PURPOSE], ttl=TTL, actor=ACTOR)
                out = {"start": t0, "ack": time.time()}
            elif op == "wait_subject":
                out = _wait_subject(store, np.asarray(cmd["probe"], dtype=np.float32),
                                    cmd["subject"], cmd.get("timeout", 30.0))
            elif op == "search_loop":
                out = _search_loop(store, np.load(cmd["probes"]), cmd["start"], cmd["end"])
            else:
                raise ValueError(f"unknown op {op}")
            if isinstance(out, dict):
                out["retries"] = list(RETRIES)
            RETRIES.clear()
            answer: dict[str, Any] = {"ok": out}
        except Exception as exc:  # reported to the parent, which stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer, default=float), flush=True)


def _build(bt: Any, location: str, key: str, dim: int, data: str, probes: str,
           batch: int) -> tuple[Any, dict[str, Any]]:
    x = np.load(data)
    ids = [f"S{i:08d}" for i in range(len(x))]
    store = bt.TemplateStore.create(location, dim=dim, model="bench",
                                    policy=bt.RetentionPolicy.from_dict(POLICY),
                                    key_provider=bt.FileKeyProvider(Path(key)))
    per_batch = []
    c0, t0 = time.process_time(), time.perf_counter()
    for s in range(0, len(x), batch):
        t = time.perf_counter()
        retried("enroll_many", store.enroll_many, x[s:s + batch],
                subject_ids=ids[s:s + batch], purposes=[PURPOSE], ttl=TTL, actor=ACTOR)
        per_batch.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    q = np.load(probes)
    hits = 0
    lat = []
    for v in q:
        t = time.perf_counter()
        r = retried("search", store.search, v, purpose=PURPOSE, k=10, actor=ACTOR,
                    mode="identification")
        lat.append(time.perf_counter() - t)
        hits += bool(r.candidates)
    stored = retried("stats", store.stats).records
    return store, {"enrol_s": wall, "enrol_cpu_s": cpu, "records": len(x),
                   "stored": stored,  # != records: a retried batch had committed
                   "batch_p50_s": float(np.median(per_batch)),
                   "batch_max_s": float(np.max(per_batch)),
                   "search": common.percentiles_us(lat), "probes_with_candidate": hits}


def _wait_subject(store: Any, probe: np.ndarray, subject: str,
                  timeout: float) -> dict[str, Any]:
    deadline, polls = time.time() + timeout, 0
    while time.time() < deadline:
        polls += 1
        try:
            r = store.search(probe, purpose=PURPOSE, k=1, actor=ACTOR)
        except Exception as exc:  # a lost connection: the next call reconnects
            RETRIES.append(f"search: {exc}")
            continue
        if r.candidates and r.candidates[0].subject_id == subject:
            return {"found": time.time(), "polls": polls}
        time.sleep(0.001)
    return {"found": None, "polls": polls}


def _search_loop(store: Any, q: np.ndarray, start: float, end: float) -> dict[str, Any]:
    while time.time() < start:
        time.sleep(0.001)
    lat, i = [], 0
    c0 = time.process_time()
    while time.time() < end:
        t = time.perf_counter()
        try:
            store.search(q[i % len(q)], purpose=PURPOSE, k=10, actor=ACTOR,
                         mode="identification")
        except Exception as exc:  # a lost connection: not counted
            RETRIES.append(f"search: {exc}")
            continue
        lat.append(time.perf_counter() - t)
        i += 1
    return {"searches": i, "cpu_s": time.process_time() - c0, **common.percentiles_us(lat)}


# --- the parent ---------------------------------------------------------------------------


class Instance:
    """A worker process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, op: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.wait()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"worker {self.proc.pid}: {out['error']}")
        return out["ok"]

    def call(self, op: str, **kw: Any) -> Any:
        self.send(op, **kw)
        return self.answer()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("close")
                self.send("exit")
                self.proc.wait(timeout=120)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def phase_enrol(args: argparse.Namespace, work: Path, schemas: list[str],
                backends: tuple[str, ...] = ("sqlite", "pg")) -> tuple[list[dict[str, Any]], str]:
    """Build a store per backend and round; returns the rows and the last PostgreSQL URL
    (kept for the other phases)."""
    rows: list[dict[str, Any]] = []
    keep = ""
    for rep in range(args.repeat):
        for backend in (backends if rep % 2 == 0 else backends[::-1]):
            if backend == "pg":
                schema = f"bench_pg_{secrets.token_hex(4)}"
                schemas.append(schema)
                location = f"{URL}?schema={schema}"
            else:
                location = str(work / f"sqlite{rep}")
            common.log(f"enrol {backend} round {rep + 1}: {args.n} records, load {load()}")
            inst = Instance()
            try:
                out = inst.call("build", location=location, key=str(work / "k"), dim=args.dim,
                                data=str(work / "x.npy"), probes=str(work / "q.npy"),
                                batch=args.batch)
            finally:
                inst.stop()
            out.update(backend=backend, round=rep + 1, load=load())
            rows.append(out)
            common.log(f"  {out['records'] / out['enrol_s']:.0f} records/s, search p50 "
                       f"{out['search']['p50_us']:.0f} µs")
            if backend == "pg":
                if keep:  # keep the last store for the other phases
                    drop_schema(keep)
                keep = location
            else:
                shutil.rmtree(location, ignore_errors=True)
    return rows, keep


def phase_join(args: argparse.Namespace, work: Path, url: str) -> list[dict[str, Any]]:
    rows = []
    first = work / "snap0"
    for rep in range(args.repeat):
        snap = first if rep == 0 else work / f"snap_rebuild{rep}"
        snap.mkdir(exist_ok=True)
        inst = Instance()
        try:
            out = inst.call("open", url=url, key=str(work / "k"), snapshot_dir=str(snap))
            out["snapshot_write_s"] = inst.call("snapshot")["s"]
        finally:
            inst.stop()
        rows.append({"how": "rebuild", "round": rep + 1, "load": load(), **out})
        common.log(f"join by rebuild: {out['s']:.2f} s, "
                   f"RSS +{out['rss_mb'] - out['rss_before_mb']:.0f} MB")
    for rep in range(args.repeat):
        snap = work / f"snap_open{rep}"
        shutil.copytree(first, snap)
        inst = Instance()
        try:
            out = inst.call("open", url=url, key=str(work / "k"), snapshot_dir=str(snap))
        finally:
            inst.stop()
        rows.append({"how": "snapshot", "round": rep + 1, "load": load(), **out})
        common.log(f"join from snapshot: {out['s']:.2f} s, "
                   f"RSS +{out['rss_mb'] - out['rss_before_mb']:.0f} MB")
    return rows


def _instances(n: int, url: str, work: Path, tag: str) -> list[Instance]:
    """n instances opened from copies of the first snapshot (or by rebuild without one)."""
    out = []
    for i in range(n):
        snap = work / f"snap_{tag}{i}"
        if (work / "snap0").exists():
            shutil.copytree(work / "snap0", snap, dirs_exist_ok=True)
        else:
            snap.mkdir(exist_ok=True)
        inst = Instance()
        out.append(inst)
        inst.call("open", url=url, key=str(work / "k"), snapshot_dir=str(snap))
    return out


def phase_lag(args: argparse.Namespace, work: Path, url: str) -> list[dict[str, Any]]:
    from biotemplate.synthetic import make_gallery

    fresh = make_gallery(args.lag_enrolments * args.repeat, 1, args.dim, seed=99).templates
    a, b = _instances(2, url, work, "lag")
    rows = []
    try:
        for rep in range(args.repeat):
            common.log(f"lag round {rep + 1}: {args.lag_enrolments} enrolments, load {load()}")
            lags, enrol, polls = [], [], []
            for j in range(args.lag_enrolments):
                i = rep * args.lag_enrolments + j
                subject = f"NEW-{rep}-{j}"
                b.send("wait_subject", probe=fresh[i].tolist(), subject=subject)
                time.sleep(0.01)  # B is searching before A starts
                got = a.call("enroll_one", template=fresh[i].tolist(), subject=subject)
                seen = b.answer()
                if seen["found"] is None:
                    raise RuntimeError(f"instance B never found {subject}")
                lags.append(seen["found"] - got["ack"])
                enrol.append(got["ack"] - got["start"])
                polls.append(seen["polls"])
                time.sleep(0.02)
            lag_ms, enrol_ms = np.array(lags) * 1e3, np.array(enrol) * 1e3
            rows.append({"round": rep + 1, "load": load(), "n": len(lags),
                         "lag_p50_ms": float(np.percentile(lag_ms, 50)),
                         "lag_p99_ms": float(np.percentile(lag_ms, 99)),
                         "lag_max_ms": float(lag_ms.max()), "lag_min_ms": float(lag_ms.min()),
                         "enroll_p50_ms": float(np.percentile(enrol_ms, 50)),
                         "enroll_p99_ms": float(np.percentile(enrol_ms, 99)),
                         "polls_p50": float(np.median(polls)), "lags_ms": lag_ms.tolist()})
            r = rows[-1]
            common.log(f"  lag p50 {r['lag_p50_ms']:.1f} ms, p99 {r['lag_p99_ms']:.1f} ms, "
                       f"enroll p50 {r['enroll_p50_ms']:.1f} ms")
    finally:
        for inst in (a, b):
            inst.stop()
    return rows


def phase_qps(args: argparse.Namespace, work: Path, url: str) -> list[dict[str, Any]]:
    rows = []
    for n in (1, 2, 4):
        insts = _instances(n, url, work, f"qps{n}_")
        try:
            for rep in range(args.repeat):
                start = time.time() + 1.0
                for inst in insts:
                    inst.send("search_loop", probes=str(work / "q.npy"), start=start,
                              end=start + args.seconds)
                outs = [inst.answer() for inst in insts]
                total = sum(o["searches"] for o in outs)
                rows.append({"instances": n, "round": rep + 1, "load": load(),
                             "qps": total / args.seconds,
                             "p50_us": float(np.median([o["p50_us"] for o in outs])),
                             "p99_us": float(max(o["p99_us"] for o in outs)),
                             "client_cpu_s": sum(o["cpu_s"] for o in outs),
                             "per_instance": outs})
                common.log(f"qps {n} instance(s) round {rep + 1}: {total / args.seconds:.0f} "
                           f"QPS, load {load()}")
        finally:
            for inst in insts:
                inst.stop()
    return rows


def pg_versions() -> dict[str, str]:
    from importlib.metadata import version

    import psycopg

    with psycopg.connect(URL) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        settings = {k: conn.execute(f"SHOW {k}").fetchone()[0]
                    for k in ("shared_buffers", "synchronous_commit", "wal_writer_delay")}
    return {"postgresql": server, "psycopg": version("psycopg"),
            "psycopg-pool": version("psycopg-pool"), **settings}


def report(res: dict[str, Any]) -> None:
    n = res["n"]
    rows = []
    for b, name in (("sqlite", "SQLite"), ("pg", "PostgreSQL")):
        runs = [r for r in res.get("enrol", []) if r["backend"] == b]
        if runs:
            rows.append([f"enrol, {name} (records/s)",
                         " / ".join(f"{r['records'] / r['enrol_s']:.0f}" for r in runs)])
            rows.append([f"search p50 / p99, {name} (µs)",
                         " / ".join(f"{r['search']['p50_us']:.0f}-{r['search']['p99_us']:.0f}"
                                    for r in runs)])
    for how in ("rebuild", "snapshot"):
        runs = [r for r in res.get("join", []) if r["how"] == how]
        if runs:
            rows.append([f"join by {how} (s)", " / ".join(f"{r['s']:.2f}" for r in runs)])
            rows.append([f"  RSS after - before, per template (B, {how})", " / ".join(
                f"{(r['rss_mb'] - r['rss_before_mb']) * 2**20 / max(r['records'], 1):.0f}"
                for r in runs)])
    for r in res.get("lag", []):
        rows.append([f"lag p50 / p99 / max (ms), round {r['round']}",
                     f"{r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f} / {r['lag_max_ms']:.1f}"])
        rows.append([f"  single enroll p50 / p99 (ms), round {r['round']}",
                     f"{r['enroll_p50_ms']:.1f} / {r['enroll_p99_ms']:.1f}"])
    for k in (1, 2, 4):
        runs = [r for r in res.get("qps", []) if r["instances"] == k]
        if runs:
            rows.append([f"QPS, {k} instance(s) (p50 µs)", " / ".join(
                f"{r['qps']:.0f} ({r['p50_us']:.0f})" for r in runs)])
    print(f"N={n} d={res['dim']}, rounds separated by ' / '")
    print(common.md(rows, ["measure", "value per round"]))


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, default=100000, help="records (one per subject)")
    ap.add_argument("--dim", type=int, default=128, help="template dimension")
    ap.add_argument("--quick", action="store_true", help="N=10k, 5 s QPS loops, 50 enrolments")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of each measurement")
    ap.add_argument("--batch", type=int, default=1000, help="records per enroll_many")
    ap.add_argument("--probes", type=int, default=300, help="searches timed after enrolment")
    ap.add_argument("--lag-enrolments", type=int, default=100, help="per round")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each QPS loop")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    common.add_results_dir_arg(ap)
    args = ap.parse_args()
    if args.worker:
        worker()
        return
    if args.quick:
        args.n, args.seconds, args.lag_enrolments = 10000, 5.0, 50
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    common.configure(args.n, args.results_dir)

    import biotemplate as bt
    from biotemplate.synthetic import make_gallery, probes

    work = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    schemas: list[str] = []
    res: dict[str, Any] = {"n": args.n, "dim": args.dim, "pg": pg_versions(),
                           "source": common.source_digest(), "load_start": load()}
    try:
        common.log(f"data: {args.n} x {args.dim}")
        g = make_gallery(args.n, 1, args.dim, seed=1)
        np.save(work / "x.npy", g.templates)
        which = np.random.default_rng(2).choice(args.n, size=args.probes, replace=False)
        np.save(work / "q.npy", probes(g, which, seed=3))
        del g
        bt.FileKeyProvider.generate(work / "k")
        url = ""
        if "enrol" in phases:
            res["enrol"], url = phase_enrol(args, work, schemas)
        else:  # the other phases need a store: build it once, untimed
            once = argparse.Namespace(**{**vars(args), "repeat": 1})
            _, url = phase_enrol(once, work, schemas, backends=("pg",))
        if "join" in phases:
            res["join"] = phase_join(args, work, url)
        if "lag" in phases:
            res["lag"] = phase_lag(args, work, url)
        if "qps" in phases:
            res["qps"] = phase_qps(args, work, url)
    finally:
        for s in schemas:
            drop_schema(s)
        shutil.rmtree(work, ignore_errors=True)
    res["load_end"] = load()
    report(res)
    path = common.write_json(f"pg_d{args.dim}_n{args.n}", res)
    print(f"wrote {common.shown(path)}")


if __name__ == "__main__":
    main()
