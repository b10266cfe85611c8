"""What confirming each candidate against its row costs a search (issue 9, point 3).

Every candidate a search returns is first confirmed against its live row in records.db
(one ``SELECT ... WHERE record_id IN (...)`` for all of them, then a header-and-tag
fingerprint compared with the one taken when the record was indexed). This script times
the same searches with that step and with it replaced by a no-op, in one process, on one
store, alternating the two in rounds, and prints the p50/p99 of each and the difference.

Who runs it: a reviewer checking that the confirmation stays in tens of microseconds.

    .venv/bin/python benchmarks/bench_confirm.py --n 20000 --dim 128
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import common  # benchmarks/ is the script's folder, so it is on sys.path
import numpy as np


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, default=20000, help="records in the gallery")
    ap.add_argument("--dim", type=int, default=128, help="template dimension")
    ap.add_argument("--probes", type=int, default=300, help="searches per round and mode")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = ap.parse_args()

    import biotemplate as bt
    from biotemplate.gallery import Gallery
    from biotemplate.synthetic import make_gallery, probes

    gallery = make_gallery(args.n, 1, args.dim, seed=1)
    queries = probes(gallery, list(range(args.probes)), seed=2)
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"watchlist": {
        "max_retention": "3y", "modes": ["identification", "investigation"],
        "match_threshold": 0.55, "max_candidates": 20}}})
    work = Path(tempfile.mkdtemp(prefix="bench-confirm-"))
    keys = bt.FileKeyProvider.generate(work / "master.key")
    store = bt.TemplateStore.create(work / "store", dim=args.dim, model="bench",
                                    policy=policy, key_provider=keys)
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                      purposes=["watchlist"], ttl=timedelta(days=30), actor="bench")
    real = Gallery.confirm

    def skipped(self: Gallery, lists: list[list[object]]) -> tuple[list[list[object]], int]:
        return lists, 0

    times: dict[tuple[str, str], list[float]] = {}
    candidates: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for variant, fn in (("confirmed", real), ("skipped", skipped)):
            Gallery.confirm = fn  # type: ignore[method-assign]
            for mode, k in (("identification", 10), ("investigation", 10)):
                out = times.setdefault((variant, mode), [])
                for q in queries:
                    t0 = time.perf_counter()
                    res = store.search(q, purpose="watchlist", k=k, actor="bench", mode=mode)
                    out.append(time.perf_counter() - t0)
                    candidates.setdefault(mode, []).append(len(res.candidates))
    Gallery.confirm = real  # type: ignore[method-assign]
    store.close()

    rows = []
    for mode in ("identification", "investigation"):
        on, off = times[("confirmed", mode)], times[("skipped", mode)]
        p50_on, p50_off = statistics.median(on), statistics.median(off)
        rows.append([mode, f"{np.mean(candidates[mode]):.1f}",
                     f"{p50_off * 1e6:.0f}", f"{p50_on * 1e6:.0f}",
                     f"{(p50_on - p50_off) * 1e6:+.0f}",
                     f"{np.percentile(on, 99) * 1e6:.0f}"])
    print(f"N={args.n} d={args.dim}, {args.probes} probes x {args.rounds} rounds, k=10")
    print(common.md(rows, ["mode", "candidates/search", "p50 without (µs)",
                           "p50 with (µs)", "confirmation (µs)", "p99 with (µs)"]))


if __name__ == "__main__":
    main()
