"""Shared helpers for the biotemplate benchmarks: data sets, ground truth, timing, output.

Data sets (face-like, from ``biotemplate.synthetic`` with ``make_gallery``'s defaults: identity
directions in a random 100-dimensional subspace, genuine cosine ~0.7; cached as .npz under
benchmarks/data/, file names carry DATA_VERSION):

- "A" (recall): ``n`` identities x 1 sample, so one record is one subject and the store's
  one-candidate-per-subject rule cannot change a top-10. Queries are fresh mated probes
  of random identities. Ground truth: exact top-10 by inner product.
- "B" (rank-1): ``n // 4`` identities x 4 samples (``n`` records). Queries are fresh mated
  probes; rank-1 is a hit when the best record belongs to the probe's identity.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from biotemplate.synthetic import make_gallery, probes

# Part of every cache file name: bump it whenever biotemplate.synthetic changes what it
# generates, so stale vectors are never reused. "v2i100": identities in a random
# 100-dimensional subspace (make_gallery's default intrinsic=100; impostor cosine ~0 +- 0.1).
DATA_VERSION = "v2i100"

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"

# The same HNSW parameters for every system (biotemplate's IndexParams defaults). ef is
# not a constant: by default the store searches an N-record sub-index with auto_ef(N), so
# every system is run at that ef (``ef_default``, set by ``configure`` from --n).
M, EF_CONSTRUCTION, K = 16, 200, 10
_N: int | None = None


def configure(n: int) -> None:
    """Record the gallery size of this run: it sets the ef every system searches with."""
    global _N
    _N = n


def ef_default() -> int:
    """The ef biotemplate picks by default for a sub-index of this run's N records."""
    from biotemplate.index import auto_ef

    if _N is None:
        raise RuntimeError("common.configure(n) was not called")
    return auto_ef(_N)
SAMPLES_B = 4
FIXED_NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


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
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
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
