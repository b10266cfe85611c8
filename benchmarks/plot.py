"""Two figures from the JSON already in --results-dir (matplotlib: the ``plot`` extra).

* ``recall_qps_n{n}.png``: recall@10 vs batch QPS (bench_compare's ef sweep), one panel
  per dimension; bench_compare.py draws it after every comparison.
* ``targets_n{n}.png``: where a search's time goes, step by step, next to raw hnswlib's
  ``knn_query`` (the per-search overhead target), for each dimension and gallery size of
  bench_targets.py's runs; bench_targets.py draws it after every run.

Who runs it: whoever wants to redraw them without measuring again::

    .venv/bin/python benchmarks/plot.py --n 100000             # both
    .venv/bin/python benchmarks/plot.py --n 100000 --targets   # the targets figure only
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


# the steps of common.search_split, bottom to top; "index: total" minus hnswlib is the
# index's own Python (locks, expiry filter, one record per subject)
_STEPS = [("validation", "validation", "tab:gray"),
          ("confirmation: total", "confirmation", "tab:olive"),
          ("index (Python)", "index: Python around hnswlib", "tab:orange"),
          ("candidates", "candidates", "tab:pink"),
          ("probe digest (HMAC)", "probe digest", "tab:cyan"),
          ("audit append: total", "audit entry (MAC'd, SQLite insert)", "tab:red"),
          ("other (matching, audited(), results)", "the rest (matching, results)",
           "tab:purple")]


def plot_targets(n: int, folder: Path = RESULTS) -> Path:
    """Stacked bars of the per-search split (µs) for every targets_d*_n{n}.json run, at
    its small N and at n, with raw knn_query's p50 as the first bar of each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(folder.glob(f"targets_d*_n{n}.json"),
                   key=lambda p: int(p.stem.split("_d")[1].split("_")[0]))
    if not files:
        raise FileNotFoundError(f"no targets_d*_n{n}.json in {folder}")
    bars: list[tuple[str, float, dict[str, float]]] = []  # label, raw p50, split
    for path in files:
        res = json.loads(path.read_text())
        for key in ("small", "A_single"):
            part = res.get(key)
            if not part or "split_investigation_us" not in part:
                continue
            split = dict(part["split_investigation_us"])
            split["index (Python)"] = (split.get("index: total", 0.0)
                                       - split.get("index: hnswlib knn_query", 0.0))
            size = part.get("n", res["n"])
            bars.append((f"d={res['dim']}\nN={size:,}", part["raw_knn_k10"]["p50_us"], split))
    fig, ax = plt.subplots(figsize=(2.2 * len(bars) + 3, 5))
    for i, (_, raw, split) in enumerate(bars):
        ax.bar(i - 0.2, raw, width=0.38, color="tab:blue",
               label="hnswlib knn_query (raw, p50)" if i == 0 else None)
        bottom = split.get("index: hnswlib knn_query", 0.0)
        ax.bar(i + 0.2, bottom, width=0.38, color="tab:blue", alpha=0.45,
               label="hnswlib inside the store (mean)" if i == 0 else None)
        for key, name, color in _STEPS:
            v = max(0.0, split.get(key, 0.0))
            ax.bar(i + 0.2, v, width=0.38, bottom=bottom, color=color,
                   label=name if i == 0 else None)
            bottom += v
        ax.annotate(f"steps +{bottom - split.get('index: hnswlib knn_query', 0.0):.0f} µs",
                    (i + 0.2, bottom), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("µs per search (k=10, investigation, one probe at a time)")
    ax.set_title("Where a search's time goes: raw hnswlib vs biotemplate "
                 "(audit entry, policy, confirmation included)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = folder / f"targets_n{n}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=100_000, help="gallery size of the runs to plot")
    p.add_argument("--targets", action="store_true", help="only the targets figure")
    add_results_dir_arg(p)
    args = p.parse_args()
    folder = Path(args.results_dir) if args.results_dir else RESULTS
    for draw in ((plot_targets,) if args.targets else (plot_all, plot_targets)):
        try:
            out = draw(args.n, folder)
        except (ImportError, FileNotFoundError) as exc:
            sys.exit(f"plot.py: {exc}")
        print(f"wrote {shown(out)}")


if __name__ == "__main__":
    main()
