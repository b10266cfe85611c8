"""Where does TemplateStore.open from a sealed snapshot spend its time? (cProfile, CPU)

    .venv/bin/python benchmarks/diag_open.py --dim 512 --n 20000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from bench_targets import ACTOR, new_store, open_store
from common import DATA, data_b, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    b = data_b(args.dim, args.n, 500)
    DATA.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="diag-open-", dir=DATA))
    try:
        store = new_store(root, "B", args.dim, ("bench",))
        store.enroll_many(b.x, subject_ids=b.subject_ids, purposes=["bench"], actor=ACTOR)
        store.close()  # writes the sealed snapshot
        open_store(root, "B").close()  # warm the page cache
        prof = cProfile.Profile(time.process_time)
        t0 = time.perf_counter()
        prof.enable()
        s = open_store(root, "B")
        prof.disable()
        log(f"open from snapshot: {time.perf_counter() - t0:.2f} s wall (profiled)")
        s.close()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
        print(buf.getvalue())
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
        print(buf.getvalue())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
