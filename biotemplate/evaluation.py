"""Accuracy of a face model and of a store, measured by the standard definitions.

A threshold belongs to a model (and, for 1:N search, to a gallery size): the same 0.6 that
suits one model accepts every stranger with another. This module measures, from a labelled
set of the model's own templates, what a threshold does, and picks one for a target.
numpy only; the plots are in :mod:`biotemplate.plots` (the ``plot`` extra).

**Decision rule.** Everywhere here, as in the store: a comparison *matches* when its
score (cosine similarity) is **at or above** the threshold. Ties at the threshold match.

**Verification (1:1)**, ISO/IEC 19795-1:2021 (biometric performance testing and
reporting, Part 1), "mated" and "non-mated" comparison trials:

- **FMR(t)**, false match rate: the proportion of non-mated (impostor) comparisons whose
  score is >= t;
- **FNMR(t)**, false non-match rate: the proportion of mated (genuine) comparisons whose
  score is < t;
- **DET curve**: FNMR against FMR as t runs over every distinct score;
- **EER**, equal error rate: where FMR and FNMR are equal (see :func:`eer` for the
  discrete rule used).

**Identification (1:N)**, NIST FRTE 1:N (NIST IR 8271, "Face Recognition Vendor Test
Part 2: Identification"), open-set, with N enrolled subjects, candidate lists of length R
and threshold T:

- **FPIR(N, T)**, false positive identification rate: the fraction of *non-mated*
  searches (the person is not enrolled) that return one or more candidates at or above T;
- **FNIR(N, R, T)**, false negative identification rate: the fraction of *mated*
  searches whose mate is not returned at rank <= R with a score at or above T.

Confidence intervals are **Wilson score intervals** (95 %), closed-form and numpy-only
(Clopper-Pearson needs the beta quantile). They assume independent trials; impostor
pairs built from one set are not (each template appears in many), so treat the interval
as optimistic. The **rule of three** sizes the sets: with zero errors in n trials the
95 % upper bound on the true rate is about 3/n, so a target rate r needs >= 3/r trials.

Nothing here logs, and errors never quote a score, a template or a label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import NDArray

from .errors import InvalidInput, InvalidTemplate
from .validation import as_templates, normalised

if TYPE_CHECKING:  # only for the annotation: this module does not need a store to import
    from .store import TemplateStore

__all__ = [
    "DetCurve",
    "Eer",
    "Evaluation",
    "IdentificationRates",
    "Rate",
    "Threshold",
    "det",
    "eer",
    "evaluate",
    "identification_rates",
    "label_codes",
    "threshold_for",
    "verification_scores",
    "wilson",
]

Scores = NDArray[np.float64]
_Z95 = 1.959963984540054  # the standard normal quantile of 0.975
_BLOCK = 1024  # rows per block of the score matrix: block x n float32 at a time


# --- counts and intervals -------------------------------------------------------------


def wilson(errors: int, trials: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``errors / trials`` (95 % by
    default). Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty
    at zero errors: its upper end is then about z^2 / trials (3.84 / n; cf. the rule of
    three's 3 / n).

    Raises:
        InvalidInput: ``trials`` < 1 or ``errors`` outside [0, trials].
    """
    if trials < 1 or not 0 <= errors <= trials:
        raise InvalidInput("wilson: need trials >= 1 and 0 <= errors <= trials")
    z2 = z * z
    centre = (errors + z2 / 2) / (trials + z2)
    half = z * math.sqrt(errors * (trials - errors) / trials + z2 / 4) / (trials + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Rate:
    """An error rate measured as ``errors`` out of ``trials``, with its 95 % Wilson
    interval [``low``, ``high``]."""

    errors: int
    trials: int
    value: float
    low: float
    high: float

    @classmethod
    def of(cls, errors: int, trials: int) -> Rate:
        """Raises: InvalidInput: ``trials`` < 1 or ``errors`` outside [0, trials]."""
        low, high = wilson(errors, trials)
        return cls(errors=int(errors), trials=int(trials), value=errors / trials,
                   low=low, high=high)


def rule_of_three(rate: float) -> int:
    """Trials needed before zero errors bound the true rate at ``rate`` (95 %): 3 / rate."""
    return math.ceil(3.0 / rate - 1e-9)


# --- input checks (messages never quote values: scores and labels may be sensitive) ---


def check_scores(values: object, name: str) -> Scores:
    """A 1-D, non-empty float64 array without NaN or +inf (-inf is allowed: it is "no
    candidate" in a search)."""
    if isinstance(values, str | bytes):
        raise InvalidInput(f"{name} must be a 1-D array of scores, not a string")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a 1-D array of numbers") from None
    if arr.ndim != 1:
        raise InvalidInput(f"{name} must be 1-D, got {arr.ndim} dimensions")
    if arr.size == 0:
        raise InvalidInput(f"{name} is empty: a rate over no comparisons is undefined")
    if np.isnan(arr).any():
        raise InvalidInput(f"{name} contains NaN")
    if np.isposinf(arr).any():
        raise InvalidInput(f"{name} contains +inf")
    return arr


def float32_above(score: float) -> float:
    """The smallest float32 value strictly above ``score``. Thresholds are float32 values,
    the precision the index scores in, so that a threshold compares the same with float32
    scores (numpy compares a float32 array with a Python float in float32) and float64."""
    candidate = np.float32(score)
    if float(candidate) <= score:
        candidate = np.nextafter(candidate, np.float32(np.inf))
    return float(candidate)


def check_target(rate: object, name: str) -> float:
    """A target rate: a finite number strictly between 0 and 1.

    Raises:
        InvalidInput: anything else.
    """
    if (isinstance(rate, bool) or not isinstance(rate, int | float | np.floating)
            or not math.isfinite(float(rate)) or not 0.0 < float(rate) < 1.0):
        raise InvalidInput(f"{name} must be a number strictly between 0 and 1")
    return float(rate)


def label_codes(labels: object, n: int) -> NDArray[np.int64]:
    """Labels (one per template: str or int, e.g. a person's id) as integer codes, in
    order of first appearance.

    Raises:
        InvalidInput: not a sequence of length ``n`` of str or int (never quoted).
    """
    if isinstance(labels, str | bytes) or not isinstance(labels, Sequence | np.ndarray):
        raise InvalidInput("labels must be a sequence (one str or int per template)")
    if len(labels) != n:
        raise InvalidInput(f"{len(labels)} labels for {n} templates")
    index: dict[Any, int] = {}
    codes = np.empty(n, dtype=np.int64)
    for i, label in enumerate(labels):
        if isinstance(label, np.generic):
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise InvalidInput(f"labels[{i}] must be a str or int, got "
                               f"{type(label).__name__}")
        codes[i] = index.setdefault(label, len(index))
    return codes


def unit_rows(templates: object) -> NDArray[np.float32]:
    """Templates as unit float32 rows, shape (n >= 2, d), checked like the store checks.

    Raises:
        InvalidTemplate: not a 2-D real array of at least two rows; NaN/inf; a zero row.
    """
    try:
        shape = np.shape(cast(Any, templates))
    except (TypeError, ValueError):
        raise InvalidTemplate("templates must be a 2-D array (one template per row)") from None
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
        raise InvalidTemplate(f"templates must be a 2-D array of at least 2 rows, got shape "
                              f"{shape}")
    return normalised(as_templates(templates, int(shape[1])))


# --- verification ---------------------------------------------------------------------


def verification_scores(templates: object, labels: object, *, block: int = _BLOCK,
                        ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Cosine scores of every pair of templates, split into mated and non-mated
    (ISO/IEC 19795-1 mated / non-mated comparison trials; each unordered pair once, no
    template compared with itself).

    Memory-bounded: the score matrix is computed ``block`` rows at a time (block x n
    float32), and the two outputs are allocated once at their final size, n(n-1)/2
    float32 scores in all (50 MB for 5,000 templates). Scores are float32, as the index
    computes them; a threshold picked from them compares the same way in the store.

    Args:
        templates: shape (n, d), n >= 2; normalised here (raw embeddings are fine).
        labels: one str or int per row; rows with equal labels are the same person.

    Returns:
        ``(mated, nonmated)``, each 1-D float32, in row-major order of the upper triangle.
        Either may be empty (every label distinct; a single label).

    Raises:
        InvalidTemplate: bad templates. InvalidInput: bad labels or block.
    """
    units = unit_rows(templates)
    n = units.shape[0]
    codes = label_codes(labels, n)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InvalidInput("block must be a positive int")
    counts = np.bincount(codes).astype(np.int64)
    n_mated = int((counts * (counts - 1) // 2).sum())
    mated = np.empty(n_mated, dtype=np.float32)
    nonmated = np.empty(n * (n - 1) // 2 - n_mated, dtype=np.float32)
    m_at = nm_at = 0
    for lo in range(0, n - 1, block):
        hi = min(n - 1, lo + block)
        sims = units[lo:hi] @ units[lo:].T  # rows lo..hi-1 against columns lo..n-1
        cols = np.arange(lo, n)
        upper = cols[None, :] > np.arange(lo, hi)[:, None]  # j > i only
        same = codes[lo:hi, None] == codes[None, lo:]
        take_m, take_nm = sims[upper & same], sims[upper & ~same]
        mated[m_at:m_at + take_m.size] = take_m
        nonmated[nm_at:nm_at + take_nm.size] = take_nm
        m_at, nm_at = m_at + take_m.size, nm_at + take_nm.size
    return mated, nonmated


@dataclass(frozen=True, slots=True)
class Threshold:
    """The threshold :func:`threshold_for` picked, and what it rests on.

    ``threshold`` is the lowest value at which the false-match (or false-positive) rate
    on the given scores is at most ``target``; ``rate`` is that rate as achieved
    (``false_matches / scores``, <= ``target``). ``needed`` is the number of scores the
    rule of three asks for (3 / target); ``warning`` says so when ``scores`` is fewer:
    the target is then not supported, whatever ``rate`` shows.
    """

    threshold: float
    target: float
    rate: float
    false_matches: int
    scores: int
    needed: int
    warning: str | None

    @property
    def supported(self) -> bool:
        """Whether there are enough scores for the target (rule of three)."""
        return self.warning is None


def threshold_for(nonmated: object, fmr: float) -> Threshold:
    """The lowest threshold t with FMR(t) <= ``fmr`` on these non-mated scores (ISO/IEC
    19795-1 FMR, decision ``score >= t``).

    With the scores sorted high to low, s(1) >= s(2) >= ..., and m the largest count with
    m / n <= fmr, every t above s(m+1) lets at most m scores match, and no t at or below
    it does; so t is the next float32 value above s(m+1) (thresholds are float32, the
    index's precision: :func:`float32_above`). Ties are handled by that rule: scores equal
    to s(m+1) all fall below t, even if fewer than m false matches remain.

    Given the highest score of each *non-mated search* instead (-inf for a search with
    no candidate), the same rule gives the threshold for a target FPIR (NIST FRTE).

    Raises:
        InvalidInput: ``nonmated`` empty, not 1-D or has NaN; ``fmr`` not in (0, 1).
    """
    scores = check_scores(nonmated, "nonmated")
    target = check_target(fmr, "fmr")
    n = scores.size
    m = min(n - 1, math.floor(target * n))  # then fix float rounding of target * n
    while m + 1 <= n - 1 and (m + 1) / n <= target:
        m += 1
    while m > 0 and m / n > target:
        m -= 1
    ordered = np.sort(scores)[::-1]
    threshold = float32_above(float(ordered[m]))
    false = int(n - np.searchsorted(ordered[::-1], threshold, side="left"))
    needed = rule_of_three(target)
    warning = None
    if n < needed:
        warning = (f"{n} non-mated scores cannot support a target of {target:g}: the rule "
                   f"of three needs at least {needed} (3 / target); with fewer, zero "
                   f"errors bound the true rate only at {3.0 / n:.2g}")
    return Threshold(threshold=threshold, target=target, rate=false / n, false_matches=false,
                     scores=n, needed=needed, warning=warning)


@dataclass(frozen=True, slots=True, eq=False)
class DetCurve:
    """A detection error trade-off curve (ISO/IEC 19795-1): at each of ``thresholds``
    (every distinct score, ascending), FMR and FNMR under ``score >= threshold``.
    The arrays are read-only."""

    thresholds: Scores
    fmr: Scores
    fnmr: Scores
    mated: int
    nonmated: int

    def __repr__(self) -> str:  # one line, not a million rates
        return (f"DetCurve({self.thresholds.size} thresholds, mated={self.mated}, "
                f"nonmated={self.nonmated})")

    def at(self, threshold: float) -> tuple[float, float]:
        """(FMR, FNMR) at any threshold, not only the curve's own points."""
        i = int(np.searchsorted(self.thresholds, threshold, side="left"))
        if i < self.thresholds.size:
            return float(self.fmr[i]), float(self.fnmr[i])
        return 0.0, 1.0  # above every score: nothing matches


def _rates(mated: Scores, nonmated: Scores, thresholds: Scores) -> tuple[Scores, Scores]:
    m, nm = np.sort(mated), np.sort(nonmated)
    fmr = (nm.size - np.searchsorted(nm, thresholds, side="left")) / nm.size
    fnmr = np.searchsorted(m, thresholds, side="left") / m.size
    return fmr.astype(np.float64), fnmr.astype(np.float64)


def det(mated: object, nonmated: object) -> DetCurve:
    """The DET curve of these scores: FMR(t) = #{non-mated >= t} / #non-mated and
    FNMR(t) = #{mated < t} / #mated (ISO/IEC 19795-1), at every distinct score t.

    Raises:
        InvalidInput: either set empty, not 1-D, or has NaN.
    """
    m, nm = check_scores(mated, "mated"), check_scores(nonmated, "nonmated")
    thresholds = np.unique(np.concatenate([m, nm]))
    fmr, fnmr = _rates(m, nm, thresholds)
    for arr in (thresholds, fmr, fnmr):
        arr.setflags(write=False)
    return DetCurve(thresholds=thresholds, fmr=fmr, fnmr=fnmr, mated=m.size, nonmated=nm.size)


@dataclass(frozen=True, slots=True)
class Eer:
    """The equal error rate and where it lies (see :func:`eer`)."""

    rate: float
    threshold: float
    fmr: float
    fnmr: float


def eer(mated: object, nonmated: object) -> Eer:
    """The equal error rate (ISO/IEC 19795-1: the rate at which FMR equals FNMR).

    On finite sets the two curves are steps and rarely meet exactly, so the rule here is:
    among the DET thresholds, take the t minimising |FMR(t) - FNMR(t)| (ties: the smaller
    ``(FMR + FNMR) / 2``, then the lower t), and report ``rate = (FMR(t) + FNMR(t)) / 2``
    with both rates at t.

    Raises:
        InvalidInput: either set empty, not 1-D, or has NaN.
    """
    curve = det(mated, nonmated)
    mean = (curve.fmr + curve.fnmr) / 2
    i = int(np.lexsort((curve.thresholds, mean, np.abs(curve.fmr - curve.fnmr)))[0])
    return Eer(rate=float(mean[i]), threshold=float(curve.thresholds[i]),
               fmr=float(curve.fmr[i]), fnmr=float(curve.fnmr[i]))


@dataclass(frozen=True, slots=True, eq=False)
class Evaluation:
    """Everything :func:`evaluate` measured on a labelled set (what ``biotemplate
    evaluate`` prints). ``fnmr``, ``eer`` and ``det`` are None when no label appears
    twice (no mated pair). ``mated`` and ``nonmated`` are the scores themselves (for
    ``plots.plot_scores``; left out of the repr)."""

    templates: int
    subjects: int
    threshold: Threshold
    fmr: Rate
    fnmr: Rate | None
    eer: Eer | None
    det: DetCurve | None
    mated: NDArray[np.float32] = field(repr=False)
    nonmated: NDArray[np.float32] = field(repr=False)

    def summary(self) -> str:
        """A few lines for a terminal: counts, the threshold, the rates at it, the EER."""
        t = self.threshold
        lines = [f"{self.templates} templates of {self.subjects} subjects: "
                 f"{0 if self.det is None else self.det.mated} mated and {t.scores} "
                 "non-mated pairs",
                 f"threshold for FMR <= {t.target:g}: {t.threshold:.6f}",
                 f"  FMR  {self.fmr.value:.6f} ({self.fmr.errors}/{self.fmr.trials}, 95% CI "
                 f"{self.fmr.low:.6f}-{self.fmr.high:.6f})"]
        if self.fnmr is not None:
            lines.append(f"  FNMR {self.fnmr.value:.6f} ({self.fnmr.errors}/{self.fnmr.trials}, "
                         f"95% CI {self.fnmr.low:.6f}-{self.fnmr.high:.6f})")
        if self.eer is not None:
            lines.append(f"EER {self.eer.rate:.6f} at {self.eer.threshold:.6f}")
        if t.warning:
            lines.append(f"warning: {t.warning}")
        if self.fnmr is None:
            lines.append("warning: no label appears twice: FNMR, EER and DET need mated pairs")
        return "\n".join(lines)


def evaluate(templates: object, labels: object, *, target_fmr: float = 1e-3) -> Evaluation:
    """One call from a labelled set to a threshold: :func:`verification_scores`, then
    :func:`threshold_for` at ``target_fmr``, the FMR and FNMR there with Wilson
    intervals, :func:`eer` and :func:`det` (draw it with ``plots.plot_det``).

    Raises:
        InvalidTemplate: bad templates. InvalidInput: bad labels or target; every
            template has the same label (no non-mated pair).
    """
    target = check_target(target_fmr, "target_fmr")
    mated, nonmated = verification_scores(templates, labels)
    if not nonmated.size:
        raise InvalidInput("every template has the same label: no non-mated pair")
    chosen = threshold_for(nonmated, target)
    curve = det(mated, nonmated) if mated.size else None
    codes = label_codes(labels, len(cast(Sequence[object], labels)))  # checked above
    return Evaluation(
        templates=len(codes), subjects=int(codes.max()) + 1, threshold=chosen,
        fmr=Rate.of(chosen.false_matches, chosen.scores),
        fnmr=Rate.of(int((mated < chosen.threshold).sum()), mated.size) if mated.size
        else None,
        eer=eer(mated, nonmated) if mated.size else None, det=curve, mated=mated,
        nonmated=nonmated)


# --- identification through a store -------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class IdentificationRates:
    """FPIR(N, T) and FNIR(N, R, T) (NIST FRTE 1:N) at each of ``thresholds``, measured
    by real searches of ``purpose`` (one audited search per probe: ``audit_seqs``, in
    probe order). ``gallery`` is N, the purpose's live records when the searches ran;
    ``rank`` is R, the candidate-list length. The arrays are read-only."""

    purpose: str
    thresholds: Scores
    fpir: Scores
    fnir: Scores
    mated: int
    nonmated: int
    rank: int
    gallery: int
    audit_seqs: tuple[int, ...]


def identification_rates(store: TemplateStore, purpose: str, probes: object,
                         mate_ids: Sequence[str | None], thresholds: object, *, actor: str,
                         reason: str = "accuracy evaluation", k: int | None = None,
                         batch: int = 256) -> IdentificationRates:
    """Open-set identification rates of ``store``'s ``purpose`` at several thresholds, from
    one real search per probe (NIST FRTE 1:N definitions, see the module docstring).

    ``mate_ids[i]`` is the enrolled subject id of probe i's person (a *mated* search), or
    None when that person is not enrolled for the purpose (a *non-mated* search).

    How one search serves every threshold: each probe is searched once in
    "investigation" mode, which returns the best record of up to ``k`` subjects with
    their scores whatever the threshold. An "identification" search at threshold T
    returns exactly those candidates scoring >= T (the same index lookup, then the
    threshold filter), so for each T: a mated search is a miss (FNIR) when its mate is
    not among the candidates or scores < T; a non-mated search is a false positive
    (FPIR) when its best candidate scores >= T. If the purpose allows only
    "identification", its searches return nothing below the purpose's own threshold, so
    only thresholds at or above it can be evaluated (lower ones are refused).

    Every search is audited as usual (``actor``, ``reason``); ``k`` defaults to the
    purpose's ``max_candidates`` (R).

    Raises:
        InvalidInput: probes and mate_ids differ in length; no mated or no non-mated
            probe; thresholds empty or NaN; a threshold below the purpose's own when it
            allows only identification; bad k or batch.
        InvalidTemplate: a bad probe. PolicyViolation: unknown purpose, or one that
            allows neither search mode.
    """
    ts = check_scores(thresholds, "thresholds")
    units = normalised(as_templates(probes, store.dim))
    if isinstance(mate_ids, str) or not isinstance(mate_ids, Sequence):
        raise InvalidInput("mate_ids must be a sequence: a subject id or None per probe")
    if len(mate_ids) != units.shape[0]:
        raise InvalidInput(f"{len(mate_ids)} mate_ids for {units.shape[0]} probes")
    if not all(m is None or isinstance(m, str) for m in mate_ids):
        raise InvalidInput("each mate_id must be a subject id (str) or None")
    mated = np.array([m is not None for m in mate_ids])
    if mated.all() or not mated.any():
        raise InvalidInput("identification_rates needs both mated probes (FNIR) and "
                           "non-mated probes (mate_id None, FPIR)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidInput("batch must be a positive int")
    rule = store.policy.purposes.get(purpose) if isinstance(purpose, str) else None
    mode = "investigation" if rule is None or rule.allows_mode("investigation") \
        else "identification"
    if rule is not None and mode == "identification" and float(ts.min()) < rule.match_threshold:
        raise InvalidInput(f"purpose {purpose!r} allows only identification searches, which "
                           "return nothing below its match_threshold: thresholds below it "
                           "cannot be evaluated (allow investigation to measure them)")
    rank = k if k is not None else (rule.max_candidates if rule is not None else 10)
    best = np.full(units.shape[0], -np.inf)  # mated: the mate's score; non-mated: the top
    seqs: list[int] = []
    for lo in range(0, units.shape[0], batch):
        results = store.search_many(units[lo:lo + batch], purpose=purpose, k=rank,
                                    actor=actor, reason=reason, mode=mode)
        for i, result in enumerate(results, start=lo):
            seqs.append(result.audit_seq)
            mate = mate_ids[i]
            scores = [c.score for c in result.candidates
                      if mate is None or c.subject_id == mate]
            if scores:
                best[i] = max(scores)
    live = store.stats().purposes.get(purpose, {}).get("live", 0)
    fnir = (best[mated][None, :] < ts[:, None]).mean(axis=1)
    fpir = (best[~mated][None, :] >= ts[:, None]).mean(axis=1)
    for arr in (ts, fpir, fnir):
        arr.setflags(write=False)
    return IdentificationRates(purpose=purpose, thresholds=ts, fpir=fpir, fnir=fnir,
                               mated=int(mated.sum()), nonmated=int((~mated).sum()),
                               rank=min(rank, rule.max_candidates) if rule else rank,
                               gallery=int(live), audit_seqs=tuple(seqs))
