"""Recall@10 vs batch QPS (the ef sweep of bench_compare), one panel per dimension.

Who runs it: bench_compare.py runs it after every comparison; run it by hand to redraw
``recall_qps_n{n}.png`` from the compare_d*_n{n}.json already in --results-dir (needs
matplotlib, from the ``bench`` extra)::

    .venv/bin/python benchmarks/plot.py --n 100000
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS, add_results_dir_arg, parser, shown

STYLE = {"hnswlib": ("tab:blue", "o"), "biotemplate": ("tab:red", "s"),
         "faiss": ("tab:green", "^"), "chromadb": ("tab:purple", "D")}


def plot_all(n: int, folder: Path = RESULTS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(folder.glob(f"compare_d*_n{n}.json"),
                   key=lambda p: int(p.stem.split("_d")[1].split("_")[0]))
    if not files:
        raise FileNotFoundError(f"no compare_d*_n{n}.json in {folder}")
    fig, axes = plt.subplots(1, len(files), figsize=(6.5 * len(files), 4.8), squeeze=False)
    for ax, path in zip(axes[0], files, strict=True):
        res = json.loads(path.read_text())
        for sysres in res["systems"]:
            sweep = sysres.get("sweep") or []
            if not sweep:
                continue
            color, marker = STYLE.get(sysres["system"], ("black", "x"))
            xs = [s["recall_at_10"] for s in sweep]
            ys = [s["qps"] for s in sweep]
            ax.plot(xs, ys, marker=marker, color=color, label=sysres["system"])
            for s in sweep:
                ax.annotate(str(s["ef"]), (s["recall_at_10"], s["qps"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3), color=color)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("batch QPS (2 cores, all queries in one call)")
        ax.set_title(f"d={res['dim']}, N={res['n']:,}, M={res['M']}, "
                     f"ef_construction={res['ef_construction']} (labels: ef)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Face-like synthetic templates: recall vs throughput (ef sweep)", fontsize=10)
    fig.tight_layout()
    out = folder / f"recall_qps_n{n}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=100_000, help="gallery size of the runs to plot")
    add_results_dir_arg(p)
    args = p.parse_args()
    try:
        out = plot_all(args.n, Path(args.results_dir))
    except (ImportError, FileNotFoundError) as exc:
        sys.exit(f"plot.py: {exc}")
    print(f"wrote {shown(out)}")


if __name__ == "__main__":
    main()
