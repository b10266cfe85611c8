"""What ``rotate_keys`` costs, beside a ``rebuild_index`` of the same store (issue 9).

``rotate_keys`` reseals every readable record, hold and subject-key entry under fresh keys
in one transaction; this script builds a store of N synthetic records (one per subject),
times a rebuild and then a rotation, and prints both. Who runs it: an operator planning a
rotation window.

    .venv/bin/python benchmarks/bench_rotation.py --n 20000 100000 --dim 128
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import common


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 100000],
                    help="store sizes (records)")
    ap.add_argument("--dim", type=int, default=128, help="template dimension")
    args = ap.parse_args()

    import biotemplate as bt
    from biotemplate.synthetic import make_gallery

    rows = []
    for n in args.n:
        gallery = make_gallery(n, 1, args.dim, seed=1)
        work = Path(tempfile.mkdtemp(prefix="bench-rotation-"))
        try:
            keys = bt.FileKeyProvider.generate(work / "master.key")
            store = bt.TemplateStore.create(work / "store", dim=args.dim, model="bench",
                                            policy=common.bench_policy(), key_provider=keys)
            store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                              purposes=["bench"], ttl=timedelta(days=30), actor="bench")
            t0 = time.perf_counter()
            store.rebuild_index()
            t1 = time.perf_counter()
            receipt = store.rotate_keys(actor="bench")
            t2 = time.perf_counter()
            store.close()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append([f"{n:,}", f"{t1 - t0:.1f} s", f"{t2 - t1:.1f} s",
                     f"{(t2 - t1) / max(receipt.records_resealed, 1) * 1e3:.2f} ms"])
    print(common.md(rows, ["records", "rebuild_index", "rotate_keys", "per record"]))


if __name__ == "__main__":
    main()
