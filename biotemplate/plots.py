"""PNG plots of :mod:`biotemplate.evaluation` results (the ``plot`` extra: matplotlib).

matplotlib is imported when a plot is drawn, never by ``import biotemplate``; without it
the call says which extra to install. Figures are drawn on a private ``Figure`` (no
pyplot, no global backend state, safe in a server) into memory and written atomically
(``_files.atomic_replace``: a temp file beside the target, renamed over it), so a half
written PNG never exists. A plot holds rates and score histograms only, no template.

- :func:`plot_det`: a DET curve, FNMR against FMR (or FNIR against FPIR for
  :class:`~biotemplate.evaluation.IdentificationRates`), both axes logarithmic as NIST
  FRTE draws them; rates of exactly 0 cannot be drawn on a log axis and are left out.
- :func:`plot_scores`: mated and non-mated score histograms (each normalised to its own
  area, so a small mated set stays visible) with the threshold marked.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import _files
from .errors import BiotemplateError, InvalidInput
from .evaluation import DetCurve, IdentificationRates, check_scores

__all__ = ["plot_det", "plot_scores"]

_POINTS = 600  # per axis: enough for a smooth curve, small enough for a small PNG
EXTRA = "pip install 'biotemplate[plot]'"


def _figure(width: float = 6.0, height: float = 4.5) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BiotemplateError(f"plots need matplotlib: {EXTRA}") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    try:
        _files.atomic_replace(out, buffer.getvalue())
    except OSError as exc:
        raise BiotemplateError(f"cannot write the plot to {out} ({exc.strerror})") from None
    return out


def _thinned(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of a few hundred points spread evenly on both log axes (a DET curve of 10^7
    impostor scores has 10^7 points; a PNG needs ~1,000)."""
    keep: set[int] = {0, x.size - 1}
    for values in (x, y):
        positive = values[values > 0]
        if not positive.size:
            continue
        grid = np.logspace(np.log10(positive.min()), 0, _POINTS)
        order = np.argsort(values, kind="stable")
        found = np.searchsorted(values[order], grid, side="left").clip(0, values.size - 1)
        keep.update(order[found].tolist())
    return np.asarray(sorted(keep))


Curve = DetCurve | IdentificationRates


def _axes_of(curve: Curve) -> tuple[np.ndarray, np.ndarray, tuple[str, str], int, int, str]:
    """(x, y, axis names, x trials, y trials, what the counts are) of one curve."""
    if isinstance(curve, DetCurve):
        return (curve.fmr, curve.fnmr, ("FMR", "FNMR"), curve.nonmated, curve.mated,
                f"{curve.mated} mated, {curve.nonmated} non-mated comparisons")
    if isinstance(curve, IdentificationRates):
        return (curve.fpir, curve.fnir, ("FPIR", "FNIR"), curve.nonmated, curve.mated,
                f"N={curve.gallery}, R={curve.rank}; {curve.mated} mated, "
                f"{curve.nonmated} non-mated searches")
    raise InvalidInput("plot_det takes DetCurve or IdentificationRates values")


def plot_det(curves: Curve | Mapping[str, Curve], path: str | os.PathLike[str], *,
             title: str | None = None, threshold: float | None = None) -> Path:
    """Write a DET plot as PNG: FNMR against FMR (ISO/IEC 19795-1) for a
    :class:`DetCurve`, FNIR against FPIR (NIST FRTE 1:N) for
    :class:`IdentificationRates`, both axes logarithmic. ``curves`` is one curve or a
    mapping of legend label to curve (all of one kind), e.g. two models side by side.
    ``threshold`` marks that operating point on each curve.

    A rate of exactly 0 has no place on a log axis: it is drawn at half the resolution
    of its set (0.5 / trials), on a dotted line, and the caption says so.

    Returns: the path written.

    Raises:
        BiotemplateError: matplotlib is missing (install the ``plot`` extra) or the file
            cannot be written. InvalidInput: not DetCurve / IdentificationRates values,
            or both kinds mixed.
    """
    named = dict(curves) if isinstance(curves, Mapping) else {"": curves}
    if not named:
        raise InvalidInput("plot_det needs at least one curve")
    kinds = {type(c) for c in named.values()}
    if len(kinds) > 1:
        raise InvalidInput("plot_det: draw verification and identification curves apart")
    fig = _figure()
    ax = fig.add_subplot()
    details, floored = [], False
    for n, (label, curve) in enumerate(named.items()):
        x, y, names, x_trials, y_trials, detail = _axes_of(curve)
        details.append(detail)
        x_floor, y_floor = 0.5 / x_trials, 0.5 / y_trials
        idx = _thinned(x, y)
        xs, ys = np.maximum(x[idx], x_floor), np.maximum(y[idx], y_floor)
        floored = floored or bool(((x[idx] == 0) | (y[idx] == 0)).any())
        ax.plot(xs, ys, lw=1.6, color=f"C{n}", label=label or None)
        if threshold is not None:
            i = int(np.searchsorted(curve.thresholds, threshold, side="left"))
            px, py = (x[i], y[i]) if i < curve.thresholds.size else (0.0, 1.0)
            ax.plot([max(px, x_floor)], [max(py, y_floor)], "o", color=f"C{n}", ms=6,
                    label=f"{label + ': ' if label else ''}t = {threshold:.4f} "
                          f"({names[0]} {px:.2g}, {names[1]} {py:.2g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{names[0]} (false {'match' if names[0] == 'FMR' else 'positive'} rate)")
    ax.set_ylabel(f"{names[1]} (false {'non-match' if names[1] == 'FNMR' else 'negative'} "
                  "rate)")
    caption = title or "DET: " + "; ".join(dict.fromkeys(details))
    if floored:
        caption += "\n(a rate of 0 is drawn at 0.5 / trials)"
    ax.set_title(caption, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scores(mated: object, nonmated: object, path: str | os.PathLike[str], *,
                threshold: float | None = None, title: str | None = None,
                bins: int = 100) -> Path:
    """Write mated and non-mated score histograms as PNG, the threshold as a vertical line.

    Returns: the path written.

    Raises:
        BiotemplateError: matplotlib is missing or the file cannot be written.
        InvalidInput: a score set is empty or has NaN; bins < 2.
    """
    m, nm = check_scores(mated, "mated"), check_scores(nonmated, "nonmated")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise InvalidInput("bins must be an int >= 2")
    finite = np.concatenate([m[np.isfinite(m)], nm[np.isfinite(nm)]])
    if not finite.size:
        raise InvalidInput("no finite score to draw")
    edges = np.linspace(float(finite.min()), float(finite.max()), bins + 1)
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(nm[np.isfinite(nm)], bins=edges, density=True, alpha=0.55, color="C0",
            label=f"non-mated ({nm.size})")
    ax.hist(m[np.isfinite(m)], bins=edges, density=True, alpha=0.55, color="C1",
            label=f"mated ({m.size})")
    if threshold is not None:
        ax.axvline(threshold, color="C3", lw=1.4, label=f"threshold {threshold:.4f}")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(title or "Score distributions", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
