"""Shared helpers for the biotemplate benchmarks: data sets, ground truth, timing, output.

Data sets (face-like, from ``biotemplate.synthetic`` with ``make_gallery``'s defaults: identity
directions in a random 100-dimensional subspace, genuine cosine ~0.7; cached as .npz under
benchmarks/data/, file names carry DATA_VERSION):

- "A" (recall): ``n`` identities x 1 sample, so one record is one subject and the store's
  one-candidate-per-subject rule cannot change a top-10. Queries are fresh mated probes
  of random identities. Ground truth: exact top-10 by inner product.
- "B" (rank-1): ``n // 4`` identities x 4 samples (``n`` records). Queries are fresh mated
  probes; rank-1 is a hit when the best record belongs to the probe's identity.

biotemplate is imported inside the functions that use it, so every script's --help works
without it (workers import it before their RSS baseline). Not a script: the benchmark scripts
(bench_targets, bench_compare, bench_1m, calibrate_ef, plot) import this module and nothing
else of each other. Everything here touches
biotemplate only through its public API (``biotemplate``, ``biotemplate.synthetic``,
``biotemplate.index.auto_ef``), except ``SNAPSHOT_FILE`` (see there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

# Part of every cache file name: bump it whenever biotemplate.synthetic changes what it
# generates, so stale vectors are never reused. "v2i100": identities in a random
# 100-dimensional subspace (make_gallery's default intrinsic=100; impostor cosine ~0 +- 0.1).
DATA_VERSION = "v2i100"

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"  # the committed results; --results-dir writes elsewhere

# The same HNSW parameters for every system (biotemplate's IndexParams defaults). ef is
# not a constant: by default the store searches an N-record sub-index with auto_ef(N), so
# every system is run at that ef (``ef_default``, set by ``configure`` from --n).
M, EF_CONSTRUCTION, K = 32, 200, 10  # M: the store default since issue 13 (was 16)
_N: int | None = None
_RESULTS_DIR: Path = RESULTS


def configure(n: int, results_dir: str | os.PathLike[str] | None = None) -> None:
    """Record the gallery size of this run (it sets the ef every system searches with) and
    where its JSON goes (default benchmarks/results/)."""
    global _N, _RESULTS_DIR
    _N = n
    _RESULTS_DIR = Path(results_dir) if results_dir else RESULTS


def results_dir() -> Path:
    return _RESULTS_DIR


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default unless it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the script's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def add_results_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", metavar="DIR",
                        help="folder of the result files: written by a run, read by --report "
                             "and plot.py (default: benchmarks/results/, the committed "
                             "results; use another folder for trial runs)")


def ef_default(n: int | None = None) -> int:
    """The ef biotemplate picks by default for a sub-index of ``n`` records (default:
    this run's N)."""
    from biotemplate.index import auto_ef

    if n is None and _N is None:
        raise RuntimeError("common.configure(n) was not called")
    return auto_ef(n if n is not None else int(_N or 0))


SAMPLES_B = 4
FIXED_NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
ACTOR = "bench"
INV = "investigation"  # search mode: k candidates, threshold ignored (like the others)

# The store's on-disk name for its sealed index snapshot. NOT public API: bench_targets
# moves it aside to time an open that must rebuild from the rows, and bench_1m reports its
# size. If the store's layout changes, change this name.
SNAPSHOT_FILE = "index.snapshot"


# --- data -------------------------------------------------------------------------------


@dataclass
class DataA:
    x: np.ndarray  # (n, d) float32 unit rows, row i = identity i
    q: np.ndarray  # (nq, d) mated probes
    q_ident: np.ndarray  # (nq,) identity (= row) of each probe
    gt: np.ndarray  # (nq, K) exact top-K rows
    exact_rank1: np.ndarray  # (nq,) bool: exact top-1 is the mated row


@dataclass
class DataB:
    x: np.ndarray  # (n, d) records, row i belongs to identity i // SAMPLES_B
    subject_ids: list[str]
    q: np.ndarray  # (nq, d) mated probes
    q_ident: np.ndarray
    exact_rank1: np.ndarray  # (nq,) bool
    exact_top1_sim: np.ndarray  # (nq,) score of the exact best record


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Exact top-k rows of ``x`` by inner product for every row of ``q`` (best first)."""
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ x.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
        out[s:s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def _cached(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    path = DATA / f"{name}_{DATA_VERSION}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    DATA.mkdir(parents=True, exist_ok=True)
    arrays = build()
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def data_a(dim: int, n: int, nq: int = 2000, seed: int = 11) -> DataA:
    def build() -> dict[str, np.ndarray]:
        from biotemplate.synthetic import make_gallery, probes

        g = make_gallery(n, 1, dim, seed=seed)
        which = np.random.default_rng(seed + 1).choice(n, size=nq, replace=False)
        q = probes(g, which, seed=seed + 2)
        gt = exact_topk(g.templates, q, K)
        return {"x": g.templates, "q": q, "q_ident": which, "gt": gt}

    a = _cached(f"A_d{dim}_n{n}_q{nq}_s{seed}", build)
    return DataA(x=a["x"], q=a["q"], q_ident=a["q_ident"], gt=a["gt"],
                 exact_rank1=a["gt"][:, 0] == a["q_ident"])


def data_b(dim: int, n: int, nq: int = 5000, seed: int = 21) -> DataB:
    ids = n // SAMPLES_B

    def build() -> dict[str, np.ndarray]:
        from biotemplate.synthetic import make_gallery, probes

        g = make_gallery(ids, SAMPLES_B, dim, seed=seed)
        which = np.random.default_rng(seed + 1).choice(ids, size=nq, replace=nq > ids)
        q = probes(g, which, seed=seed + 2)
        top1 = exact_topk(g.templates, q, 1)[:, 0]
        sim = np.einsum("ij,ij->i", q, g.templates[top1])
        return {"x": g.templates, "q": q, "q_ident": which, "top1": top1, "top1_sim": sim}

    b = _cached(f"B_d{dim}_n{n}_q{nq}_s{seed}", build)
    subject_ids = [f"P-{i // SAMPLES_B:07d}" for i in range(len(b["x"]))]
    return DataB(x=b["x"], subject_ids=subject_ids, q=b["q"], q_ident=b["q_ident"],
                 exact_rank1=b["top1"] // SAMPLES_B == b["q_ident"],
                 exact_top1_sim=b["top1_sim"])


def recall_at_k(found: Sequence[Sequence[int]] | np.ndarray, gt: np.ndarray) -> float:
    k = gt.shape[1]
    hits = sum(len(set(map(int, row[:k])) & set(map(int, g))) for row, g in zip(found, gt,
                                                                              strict=True))
    return hits / (k * len(gt))


# --- timing and memory ------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, CPU s of this process, result). CPU time (user+sys, all threads) is far
    less sensitive than wall time to the other jobs sharing the machine."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def percentiles_us(samples: Iterable[float]) -> dict[str, float]:
    a = np.asarray(list(samples)) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean())}


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far: VmHWM from /proc/self/status.

    Not ``getrusage().ru_maxrss``: on Linux that survives fork+exec, so a worker would
    report its parent's peak if the parent was bigger.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident set size (from /proc, no psutil needed)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- environment and output -------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "hnswlib", "cryptography", "pynacl", "faiss-cpu", "chromadb",
                 "msgpack", "biotemplate"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_json(name: str, payload: dict[str, Any]) -> Path:
    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"machine": machine(), "versions": versions(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "when": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Render rows as a fixed-width text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(
        row, widths, strict=True))) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def md(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table (the --report output pasted into RESULTS.md)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_policy(purposes: Sequence[str] = ("bench",)) -> Any:
    """A policy whose search purposes allow investigation and up to 100 candidates."""
    import biotemplate as bt

    return bt.RetentionPolicy.from_dict({
        "epoch": "1d",
        "purposes": {p: {"max_retention": "3y", "default_retention": "365d",
                         "modes": ["identification", "investigation"],
                         "match_threshold": 0.55, "max_candidates": 100}
                     for p in purposes},
    })


# --- the store and raw hnswlib, as bench_targets and bench_1m drive them -----------------


def clock() -> Any:
    return FIXED_NOW


def params(ef: int | None = None) -> Any:
    """The store's parameters; ef None: its default (auto_ef per sub-index size)."""
    import biotemplate as bt

    return bt.IndexParams(M=M, ef_construction=EF_CONSTRUCTION, ef_search=ef)


def raw_build_cpu(x: np.ndarray, ef: int | None = None) -> tuple[float, float, Any]:
    """A raw hnswlib index of ``x`` (labels = rows) at the store's M / ef_construction,
    searched at ``ef`` (default ``ef_default()``): (wall s, CPU s, index)."""
    import hnswlib

    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=M, ef_construction=EF_CONSTRUCTION)
    t, c, _ = timed_cpu(lambda: index.add_items(x, np.arange(len(x))))
    index.set_ef(ef if ef is not None else ef_default())
    return t, c, index


def new_store(root: Path, name: str, dim: int, purposes: tuple[str, ...]) -> Any:
    """A fresh store ``root/name`` (key file ``root/master.key``, shared by the stores of
    one run), fixed clock, the policy of ``bench_policy``."""
    import biotemplate as bt

    keys = bt.FileKeyProvider(root / "master.key")
    if not keys.path.exists():
        keys = bt.FileKeyProvider.generate(root / "master.key")
    return bt.TemplateStore.create(root / name, dim=dim, model="bench-v1",
                                   policy=bench_policy(purposes), key_provider=keys,
                                   clock=clock, index_params=params())


def open_store(root: Path, name: str, ef: int | None = None) -> Any:
    import biotemplate as bt

    return bt.TemplateStore.open(root / name, key_provider=bt.FileKeyProvider(root / "master.key"),
                                 clock=clock, index_params=params(ef), snapshot_on_close=False)


def rows_of(store_ids: list[str]) -> dict[str, int]:
    """record id -> row of the input array (enroll_many returns ids in input order)."""
    return {rid: i for i, rid in enumerate(store_ids)}


def time_each(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> list[float]:
    """Seconds per call of ``fn`` on each query, one at a time."""
    out = []
    for v in queries:
        t0 = time.perf_counter()
        fn(v)
        out.append(time.perf_counter() - t0)
    return out


def passes(methods: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Run each method's pass once per round, rotating the order; returns per-round p50s
    in microseconds."""
    p50: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            lat = methods[name]()
            p50[name].append(float(np.percentile(lat, 50)) * 1e6)
    return p50


def ratio_stats(num: list[float], den: list[float]) -> dict[str, Any]:
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return {"ratio_median": median(per_round), "per_round": per_round}


def source_digest() -> dict[str, str]:
    """Which library code was measured: git HEAD, whether biotemplate/ had uncommitted
    changes, and a hash of its .py files (the tree may change between runs)."""
    import biotemplate as bt

    pkg = Path(bt.__file__).parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(pkg), "status",
                            "--porcelain", "--", "."], capture_output=True, text=True,
                           check=False).stdout.strip()
    return {"git_head": head, "biotemplate_dirty": str(bool(dirty)),
            "biotemplate_sha256": h.hexdigest()[:16]}


# --- where a search's time goes ----------------------------------------------------------


class _Timed:
    """Forwards every attribute to ``inner``; ``name``'s calls are timed into ``into``."""

    def __init__(self, inner: Any, name: str, into: list[float]) -> None:
        self._inner, self._name, self._into = inner, name, into

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr != self._name:
            return value

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self._into.append(time.perf_counter() - t0)

        return timed_call


def search_split(store: Any, purpose: str, probes: np.ndarray, mode: str = INV,
                 k: int = K) -> dict[str, float]:
    """Mean µs per ``store.search`` spent in each step, from wrappers put around the
    functions and objects the search calls (and taken off again). NOT public API: it
    reaches into the store's parts, names as of issue 13; a step that is not found is
    left out. The wrappers add ~1 µs each; "other" is the total minus the named steps."""
    import biotemplate.matching as matching
    from biotemplate.audit import AuditTrail
    from biotemplate.backends.sqlite import SQLiteBackend
    from biotemplate.gallery import Gallery
    from biotemplate.index import TemplateIndex
    from biotemplate.vault import Vault

    spent: dict[str, list[float]] = {}
    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name, None)
        if real is None:
            return
        into = spent.setdefault(label, [])

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - t0)

        setattr(owner, name, timed_call)
        undo.append(lambda: setattr(owner, name, real))

    def proxy(owner: Any, attr: str, name: str, label: str) -> None:
        real = getattr(owner, attr)
        setattr(owner, attr, _Timed(real, name, spent.setdefault(label, [])))
        undo.append(lambda: setattr(owner, attr, real))

    parts = store._p
    wrap(matching, "search_rule", "validation")
    wrap(matching, "unit_template", "validation")
    wrap(TemplateIndex, "search_units", "index: total")
    for sub in parts.gallery._index._subs.values():
        proxy(sub, "index", "knn_query", "index: hnswlib knn_query")
    wrap(Gallery, "confirm", "confirmation: total")
    wrap(SQLiteBackend, "headers", "confirmation: SQL (backend.headers)")
    wrap(matching, "candidates", "candidates")
    wrap(Vault, "probe_digest", "probe digest (HMAC)")
    wrap(AuditTrail, "append", "audit append: total")
    wrap(AuditTrail, "_sign", "audit append: Ed25519 sign")  # mutations, and seals
    wrap(AuditTrail, "_mac_of", "audit append: HMAC (sealed later)")
    wrap(type(parts.gallery.baseline), "suspects", "confirmation: baseline check")
    proxy(parts.trail, "_conn", "execute", "audit append: SQL insert")
    totals = []
    try:
        for v in probes:
            t0 = time.perf_counter()
            store.search(v, purpose=purpose, k=k, actor=ACTOR, mode=mode)
            totals.append(time.perf_counter() - t0)
    finally:
        for step in reversed(undo):
            step()
    n = len(probes)
    out = {label: sum(v) / n * 1e6 for label, v in spent.items() if v}
    named = sum(out.get(x, 0.0) for x in ("validation", "index: total", "confirmation: total",
                                          "candidates", "probe digest (HMAC)",
                                          "audit append: total"))
    out["total (mean)"] = sum(totals) / n * 1e6
    out["other (matching, audited(), results)"] = out["total (mean)"] - named
    return out


def what_if(store: Any, raw: Any, purpose: str, probes: np.ndarray, rounds: int,
            mode: str = INV) -> dict[str, dict[str, float]]:
    """Per-search overhead (store p50 - raw ``knn_query(k=10)`` p50, µs, median of
    ``rounds`` interleaved rounds) of the shipped store and, for comparison only, with
    the audit append and/or the candidate confirmation replaced by no-ops: what the
    proposals for those two steps could save at most. NOT the shipped code."""
    from biotemplate.audit import AuditTrail
    from biotemplate.gallery import Gallery

    real_append, real_confirm = AuditTrail.append, Gallery.confirm
    counter = [0]

    def no_append(self: Any, *args: Any, **kwargs: Any) -> int:
        counter[0] += 1
        return counter[0]

    def no_confirm(self: Any, lists: Any, *args: Any) -> Any:
        return lists, 0

    variants = {"shipped": (real_append, real_confirm), "no audit append": (no_append,
                real_confirm), "no confirmation": (real_append, no_confirm),
                "neither": (no_append, no_confirm)}
    p50s: dict[str, list[float]] = {name: [] for name in variants}
    raw_p50: list[float] = []

    def search(v: np.ndarray) -> Any:
        return store.search(v, purpose=purpose, k=K, actor=ACTOR, mode=mode)

    try:
        for r in range(rounds):
            raw_p50.append(float(np.median(time_each(lambda v: raw.knn_query(v, k=K),
                                                     probes))) * 1e6)
            names = list(variants)
            for name in names[r % len(names):] + names[: r % len(names)]:
                AuditTrail.append, Gallery.confirm = variants[name]  # type: ignore[method-assign]
                p50s[name].append(float(np.median(time_each(search, probes))) * 1e6)
    finally:
        AuditTrail.append, Gallery.confirm = real_append, real_confirm  # type: ignore[method-assign]
    return {name: {"overhead_us": median([s - r for s, r in zip(v, raw_p50, strict=True)]),
                   "store_p50_us": median(v), "raw_p50_us": median(raw_p50)}
            for name, v in p50s.items()}
