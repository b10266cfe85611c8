"""Diagnosis: where does biotemplate's insert path lose time against one raw add_items?

    .venv/bin/python benchmarks/diag_insert.py --dim 128 --n 50000

Same vectors, same M / ef_construction, same process; wall and CPU time of:
raw add_items in one call; raw add_items in 10k and 4096-row calls; the same with
``allow_replace_deleted`` + ``replace_deleted=True`` (what biotemplate's index uses);
and biotemplate's TemplateIndex.add (the in-memory index alone, no crypto, no SQLite).
"""

from __future__ import annotations

import argparse
import sys

import hnswlib
import numpy as np
from common import EF_CONSTRUCTION, M, data_a, table, timed_cpu, write_json

from biotemplate.index import IndexParams, TemplateIndex


def raw(x: np.ndarray, chunk: int, replace: bool) -> tuple[float, float]:
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=M, ef_construction=EF_CONSTRUCTION,
                     allow_replace_deleted=replace)

    def go() -> None:
        for s in range(0, len(x), chunk):
            stop = min(len(x), s + chunk)
            index.add_items(x[s:stop], np.arange(s, stop), replace_deleted=replace)

    t, c, _ = timed_cpu(go)
    return t, c


def bio_index(x: np.ndarray) -> tuple[float, float]:
    index = TemplateIndex(x.shape[1], IndexParams(M=M, ef_construction=EF_CONSTRUCTION))
    n = len(x)
    ids = [f"{i:032x}" for i in range(n)]
    refs = [i.to_bytes(32, "big") for i in range(n)]
    t, c, _ = timed_cpu(lambda: index.add(ids, refs, [("all",)] * n, [2**62] * n, x))
    return t, c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    x = data_a(args.dim, args.n).x
    cases = {"raw, one call": lambda: raw(x, len(x), False),
             "raw, 10k-row calls": lambda: raw(x, 10_000, False),
             "raw, 4096-row calls": lambda: raw(x, 4096, False),
             "raw, one call, replace_deleted": lambda: raw(x, len(x), True),
             "raw, 10k-row calls, replace_deleted": lambda: raw(x, 10_000, True),
             "TemplateIndex.add": lambda: bio_index(x)}
    rows = []
    for r in range(args.rounds):
        for name, fn in cases.items():
            t, c = fn()
            rows.append({"case": name, "round": r, "wall_s": t, "cpu_s": c})
            print(f"{name}: wall {t:.1f} s, CPU {c:.1f} s", file=sys.stderr, flush=True)
    base = [r for r in rows if r["case"] == "raw, one call"]
    for r in rows:
        ref = base[r["round"]]
        r["wall_x"], r["cpu_x"] = r["wall_s"] / ref["wall_s"], r["cpu_s"] / ref["cpu_s"]
    print(table(rows, [("case", "case", ""), ("round", "round", "d"), ("wall_s", "wall s", ".1f"),
                       ("cpu_s", "CPU s", ".1f"), ("wall_x", "wall x", ".3f"),
                       ("cpu_x", "CPU x", ".3f")]))
    write_json(f"diag_insert_d{args.dim}_n{args.n}", {"dim": args.dim, "n": args.n,
                                                        "rows": rows})


if __name__ == "__main__":
    main()
