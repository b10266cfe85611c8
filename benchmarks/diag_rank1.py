"""Rank-1 of mated probes vs ef and M for raw hnswlib (what biotemplate's defaults give).

    .venv/bin/python benchmarks/diag_rank1.py --dim 512 --n 100000 --ms 16,32

Data set A (one enrolled sample per identity) and B (four), the same probes as the other
benchmarks; exact search's rank-1 is the reference.
"""

from __future__ import annotations

import argparse
import sys

import hnswlib
import numpy as np
from common import EF_CONSTRUCTION, SAMPLES_B, data_a, data_b, table, timed, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--ms", default="16,32")
    p.add_argument("--efs", default="64,128,256,512,1024,2048")
    p.add_argument("--sets", default="A,B")
    args = p.parse_args()
    rows = []
    for which in args.sets.split(","):
        if which == "A":
            a = data_a(args.dim, args.n)
            x, q, truth = a.x, a.q, a.q_ident
            exact = float(a.exact_rank1.mean())

            def hit(found: np.ndarray, truth: np.ndarray = truth) -> np.ndarray:
                return found == truth
        else:
            b = data_b(args.dim, args.n)
            x, q, truth = b.x, b.q, b.q_ident
            exact = float(b.exact_rank1.mean())

            def hit(found: np.ndarray, truth: np.ndarray = truth) -> np.ndarray:
                return found // SAMPLES_B == truth
        for m in [int(v) for v in args.ms.split(",")]:
            index = hnswlib.Index(space="ip", dim=x.shape[1])
            index.init_index(max_elements=len(x), M=m, ef_construction=EF_CONSTRUCTION)
            build, _ = timed(lambda index=index, x=x: index.add_items(x, np.arange(len(x))))
            for ef in [int(v) for v in args.efs.split(",")]:
                index.set_ef(ef)
                t, found = timed(lambda index=index, q=q: index.knn_query(q, k=1)[0][:, 0])
                rows.append({"set": which, "M": m, "ef": ef, "build_s": build,
                             "qps": len(q) / t, "rank1": float(hit(found).mean()),
                             "rank1_exact": exact})
                print(rows[-1], file=sys.stderr, flush=True)
            del index
    print(table(rows, [("set", "set", ""), ("M", "M", "d"), ("ef", "ef", "d"),
                       ("build_s", "build s", ".0f"), ("qps", "batch QPS", ".0f"),
                       ("rank1", "rank-1", ".4f"), ("rank1_exact", "exact", ".4f")]))
    write_json(f"diag_rank1_d{args.dim}_n{args.n}", {"dim": args.dim, "n": args.n, "rows": rows})


if __name__ == "__main__":
    main()
