"""Issue 9 (points 3 and 4): key updates stay cheap. The cost of enrolling a new subject
and of erasing one, at a small store and at a large one, and the size of the keyring.

Who runs it: anyone checking the "Subject keys" table of RESULTS.md, after a change to
enrolment, erasure, the keyring or the subject-key entries. ~8 min on 2 cores at the
default 1M subjects (most of it building the store), seconds at --subjects 20000::

    .venv/bin/python benchmarks/bench_keys.py                      # 1,000 and 1,000,000
    .venv/bin/python benchmarks/bench_keys.py --subjects 100000 --label v1   # see below

How the store is built: through the public API, ``enroll_many`` in batches of
``--batch`` new subjects, one record each, dim ``--dim`` (16: the templates' size does not
change what is measured, and the index build stays short). No shortcut is taken: every
subject has a sealed row, a subject-key entry and an index entry. Then, through the
public API again, with a fixed clock and nothing else running:

- ``enroll``: ``--trials`` calls, each enrolling one template of a new subject (its key is
  created and committed with its row; the audit entry is fsynced);
- ``erase_subject``: ``--trials`` calls, each erasing a different subject of the bulk
  (its bucket, ~N/1024 entries, is resealed under a new key; two keyring saves, the
  commit, the audit fsync and a WAL checkpoint).

p50 and p99 of each, the keyring and records.db sizes. Prints a Markdown table and writes
``keys_<label>.json`` to --results-dir.

``--label v1``: the same measurement of the code from before the subject keys moved out
of the keyring (every key in the keyring file, rewritten whole by each call): put that
code first on the path, e.g. ``git archive 936662e biotemplate | tar -x -C /tmp/v1`` then
``PYTHONPATH=/tmp/v1 python benchmarks/bench_keys.py --subjects 100000 --label v1``.
"""

from __future__ import annotations

import gc
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    ACTOR,
    add_results_dir_arg,
    configure,
    log,
    new_store,
    parser,
    percentiles_us,
    source_digest,
    write_json,
)


def build(root: Path, n: int, dim: int, batch: int, rng: np.random.Generator) -> Any:
    """A store of ``n`` subjects with one record each, enrolled through the public API."""
    store = new_store(root, f"keys-{n}", dim, ("bench",))
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        size = min(batch, n - start)
        store.enroll_many(rng.standard_normal((size, dim)).astype(np.float32),
                          subject_ids=[f"S-{i}" for i in range(start, start + size)],
                          purposes=["bench"], actor=ACTOR)
        if (start // batch) % 10 == 9:
            log(f"  {start + size:,} subjects, {time.perf_counter() - t0:.0f} s")
    return store, time.perf_counter() - t0


def measure(store: Any, n: int, dim: int, trials: int, rng: np.random.Generator,
            ) -> dict[str, Any]:
    gc.collect()
    enrol = []
    for i in range(trials):
        vec = rng.standard_normal(dim).astype(np.float32)
        t0 = time.perf_counter()
        store.enroll(vec, subject_id=f"NEW-{i}", purposes=["bench"], actor=ACTOR)
        enrol.append(time.perf_counter() - t0)
    gc.collect()
    erase = []
    for sid in random.Random(n).sample(range(n), trials):
        t0 = time.perf_counter()
        receipt = store.erase_subject(f"S-{sid}", actor=ACTOR, reason="benchmark")
        erase.append(time.perf_counter() - t0)
        assert receipt.records_erased == 1 and receipt.key_destroyed
    return {"enroll_new_subject": percentiles_us(enrol), "erase_subject": percentiles_us(erase)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--subjects", type=int, default=1_000_000, help="the large store")
    ap.add_argument("--small", type=int, default=1000, help="the small store (0: skip)")
    ap.add_argument("--trials", type=int, default=200, help="calls timed per operation")
    ap.add_argument("--dim", type=int, default=16, help="template dimension")
    ap.add_argument("--batch", type=int, default=10_000, help="subjects per enroll_many")
    ap.add_argument("--label", default="", help="result file keys_<label>.json "
                    "(default: the large size)")
    ap.add_argument("--workdir", help="where the stores are built (default: a temp dir, "
                    "removed at the end)")
    add_results_dir_arg(ap)
    args = ap.parse_args()
    configure(args.subjects, args.results_dir)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-keys-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rows = []
    try:
        for n in [x for x in (args.small, args.subjects) if x]:
            log(f"building a store of {n:,} subjects (dim {args.dim})")
            store, seconds = build(root, n, args.dim, args.batch, rng)
            result = measure(store, n, args.dim, args.trials, rng)
            folder = root / f"keys-{n}"
            stats = store.stats()
            store.close()
            rows.append({"subjects": n, "build_s": round(seconds, 1), **result,
                         "keyring_bytes": (folder / "keyring").stat().st_size,
                         "records_db_bytes": (folder / "records.db").stat().st_size,
                         "subjects_after": stats.subjects, "records_after": stats.records})
            shutil.rmtree(folder)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| subjects | enroll new subject p50 / p99 | erase_subject p50 / p99 "
          "| keyring | records.db | build |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, x = r["enroll_new_subject"], r["erase_subject"]
        print(f"| {r['subjects']:,} | {e['p50_us'] / 1000:.1f} / {e['p99_us'] / 1000:.1f} ms "
              f"| {x['p50_us'] / 1000:.1f} / {x['p99_us'] / 1000:.1f} ms "
              f"| {r['keyring_bytes'] / 1024:,.0f} KiB | {r['records_db_bytes'] / 2**20:,.0f} MiB "
              f"| {r['build_s']:.0f} s |")
    path = write_json(f"keys_{args.label or args.subjects}",
                      {"args": vars(args), "source": source_digest(), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
