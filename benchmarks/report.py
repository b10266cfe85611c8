"""Markdown tables from the JSON in benchmarks/results/ (pasted into RESULTS.md).

    .venv/bin/python benchmarks/report.py --n 100000
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import RESULTS


def md(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def compare(n: int) -> str:
    parts = []
    for path in sorted(RESULTS.glob(f"compare_d*_n{n}.json"),
                       key=lambda p: int(p.stem.split("_d")[1].split("_")[0])):
        res = json.loads(path.read_text())
        rows = []
        for s in res["systems"]:
            if "error" in s:
                rows.append([s["system"], "failed: " + s["error"]] + ["-"] * 9)
                continue
            rows.append([s["system"], f(s["build_s"], ".1f"), f(s.get("build_cpu_s"), ".1f"),
                         f(s["single"]["p50_us"], ".0f"),
                         f(s["single"]["p99_us"], ".0f"), f(s["batch_qps"], ".0f"),
                         f(s["recall_at_10"], ".4f"), f(s["rank1"], ".4f"),
                         f(s["extra_fnir_rank1"] * 100, "+.2f"), f(s["peak_rss_mb"], ".0f"),
                         f(s["rss_after_build_mb"] - s["rss_before_build_mb"], ".0f")])
        parts.append(f"**d = {res['dim']}, N = {res['n']:,}** (M={res['M']}, "
                     f"ef_construction={res['ef_construction']}, ef={res['ef_search']}, "
                     f"k={res['k']}, {res['nq']} mated probes, {res['single']} timed singly)\n\n"
                     + md(rows, ["system", "build / enrol s", "build CPU s", "single p50 us",
                                 "single p99 us", "batch QPS", "recall@10", "rank-1",
                                 "extra FNIR (pt)",
                                 "peak RSS MB", "RSS growth MB"]))
        sweep_rows = []
        for s in res["systems"]:
            for pt in s.get("sweep") or []:
                sweep_rows.append([s["system"], str(pt["ef"]), f(pt["qps"], ".0f"),
                                   f(pt["recall_at_10"], ".4f"), f(pt.get("rank1"), ".4f")])
        if sweep_rows:
            parts.append(f"<details><summary>ef sweep, d={res['dim']}</summary>\n\n"
                         + md(sweep_rows, ["system", "ef", "batch QPS", "recall@10",
                                             "rank-1 (exact 1.0)"])
                         + "\n\n</details>")
    return "\n\n".join(parts)


def targets(n: int) -> str:
    parts = []
    for path in sorted(RESULTS.glob(f"targets_d*_n{n}.json"),
                       key=lambda p: int(p.stem.split("_d")[1].split("_")[0])):
        res = json.loads(path.read_text())
        rows = [[r["target"].strip(), r["goal"], r["measured"], r["met"]]
                for r in res["summary"]]
        parts.append(f"**d = {res['dim']}, N = {res['n']:,}** (source "
                     f"{res['source']['biotemplate_sha256']}, HEAD "
                     f"{res['source']['git_head'][:7]}, working tree dirty: "
                     f"{res['source']['biotemplate_dirty']}; run took "
                     f"{res['elapsed_s'] / 60:.1f} min)\n\n"
                     + md(rows, ["target", "goal", "measured", ""]))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    n = p.parse_args().n
    print(compare(n))
    print()
    print(targets(n))


if __name__ == "__main__":
    main()
