"""Does the index miss what exact search would find? Measured on the store's own data.

The public methods are :meth:`TemplateStore.index_health` and
:meth:`TemplateStore.tune_index`; this module orders them over the store's parts.

**Why.** Above ``exact_cutoff`` live records a purpose is searched through an HNSW graph
whose search beam ``ef`` trades speed for misses: a mate that exact search would return
and the graph does not is a false negative the threshold did not cause. ``auto_ef`` is a
curve fitted once on synthetic data; a real model's gallery may need far less (searches
slower than they need be) or more (silent misses). Only the store's own templates can say.

**How a health check measures.** ``sample`` live records of the purpose are drawn at
random; each is perturbed as a second capture of the same face would be: isotropic
Gaussian noise scaled so that the expected cosine between the probe and the enrolled
template equals the purpose's threshold (clipped to [0.2, 0.99]), the hardest mate the
purpose still accepts. Exact search over every live template of the purpose (in memory,
in chunks, in the index) gives the truth: the mate is *found* when it is the best subject
and scores at or above the threshold. The graph is then searched as a one-candidate
search would search it (k = 1, the narrowest beam any search uses, so the reading holds
for every k), and the **added miss rate** is the fraction of found mates it does not
return at or above the threshold, with a 95 % Wilson interval. Latency is the graph's
mean CPU time per probe on one thread (CPU time, so that other load on the machine does
not inflate it; a full ``search`` adds ~0.5 ms of validation, confirmation and audit:
benchmarks/RESULTS.md).

**How tuning picks.** The same probes are searched at each ef of a ladder (16 ... 8192,
below the live count). An ef *meets* the target when the upper end of the 95 % Wilson
interval of its added miss rate is at or under it (so the default sample, 10 / target
probes, leaves ~5 / target found mates: 3.84 / target are needed to show the target with
no miss at all); the choice is the smallest ef that meets it with the next ef meeting it
too (one lucky reading does not decide). It is saved sealed in
``records.db`` (setting ``index``: ef, live count and M per purpose) with its audit entry,
used at once and on every open, and grows with the sub-index like ``auto_ef``'s curve
between tunings (``index.tuned_ef``); after more than 2x growth ``index_health`` and
``stats()`` flag it (``retune``). A fixed ``IndexParams(ef_search=...)`` wins over it, so
tuning refuses to run beside one. A larger M cannot be measured without building a
second graph; the report *advises* it when the target is not met, or when the chosen ef
is >= 256 on a graph of M < 32, from the synthetic measurements in RESULTS.md ("Choosing
ef", "M=16 or M=32": M=32 needed 4-5x less ef than M=16 and 2.5x less graph CPU at the
tuned ef, for a ~2x slower build and +20-25 % memory at d=128; it is the default).

**What stays private.** Probes are made from decrypted templates the index already
holds in memory, scrubbed (zeroed) when the measurement ends; nothing is written but
the efs; audit entries and reports carry counts, rates and efs only.

**Cost.** Exact search is O(sample x live x d), the trials O(ladder x sample x ef):
~1 min at 100k records (d=512, 6,000 probes). Mutations wait for the whole call;
searches wait only while a trial ef is set, 256 probes at a time (ms to a second).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._calls import Parts
from .errors import InvalidInput
from .evaluation import Rate, wilson
from .index import Hit, TunedEf, auto_ef, retune_due
from .policy import Purpose
from .validation import normalised

__all__ = ["IndexHealth", "PurposeHealth", "PurposeTuning", "Trial", "TuneReport",
           "index_health", "second_capture", "tune_index"]

LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
          4096, 6144, 8192)
LARGER_M_EF = 256  # from here on, M=32 was ~2.5x cheaper per search than M=16 (synthetic)
MAX_SAMPLE = 100_000


@dataclass(frozen=True, slots=True)
class Trial:
    """The graph at one ef against exact search, on one set of probes."""

    ef: int
    misses: int  # mates exact search found that the graph did not return
    found: int  # mates exact search found (the trials' denominator)
    rate: float  # misses / found (0.0 when nothing was found)
    graph_us: float  # mean graph CPU time per probe, one thread


@dataclass(frozen=True, slots=True)
class PurposeHealth:
    """One purpose's index against exact search. For a purpose searched exactly
    (``ef_source == "exact"``) nothing can be missed: no probe is drawn, ``added_miss``
    and ``graph_us`` are None."""

    purpose: str
    live: int
    ef: int
    ef_source: str  # "exact", "fixed", "tuned" or "auto"
    probes: int
    probe_score: float  # the expected cosine of a probe with its enrolled template
    found: int
    added_miss: Rate | None
    graph_us: float | None
    tuned_ef: int | None  # the ef measured by the last tuning (before growth)
    tuned_live: int | None
    stale: bool  # grown more than 2x since that tuning: run tune_index again
    warning: str | None


@dataclass(frozen=True, slots=True)
class IndexHealth:
    """What :meth:`TemplateStore.index_health` measured, per purpose."""

    purposes: tuple[PurposeHealth, ...]
    audit_seq: int

    @property
    def stale(self) -> bool:
        """Whether some purpose has outgrown its tuning."""
        return any(h.stale for h in self.purposes)

    def summary(self) -> str:
        """One line per purpose, for a terminal."""
        lines = []
        for h in self.purposes:
            if h.added_miss is None:
                what = "searched exactly" if h.ef_source == "exact" else "nothing measured"
            else:
                m = h.added_miss
                what = (f"added miss {m.value:.4f} ({m.errors}/{m.trials}, 95% CI up to "
                        f"{m.high:.4f}), graph {h.graph_us or 0:.0f} us/probe")
            lines.append(f"{h.purpose}: {h.live} live, ef {h.ef} ({h.ef_source}): {what}")
            if h.warning:
                lines.append(f"  warning: {h.warning}")
        return "\n".join(lines)

    def of(self, purpose: str) -> PurposeHealth:
        """Raises: KeyError: no such purpose in the report."""
        for h in self.purposes:
            if h.purpose == purpose:
                return h
        raise KeyError(purpose)


@dataclass(frozen=True, slots=True)
class PurposeTuning:
    """The ef chosen for one purpose, with every trial that chose it."""

    purpose: str
    live: int
    ef_before: int
    source_before: str
    auto_ef: int
    ef: int  # chosen (saved)
    met: bool  # the target was met at 95 % (else: the best ef tried, and a warning)
    added_miss: Rate | None  # at the chosen ef (None: no mate found, nothing measured)
    before: Trial  # the ef in use before tuning, on the same probes
    trials: tuple[Trial, ...]
    larger_m_advised: bool
    warning: str | None


@dataclass(frozen=True, slots=True)
class TuneReport:
    """What :meth:`TemplateStore.tune_index` chose and saved."""

    target_added_miss: float
    probes: int
    purposes: tuple[PurposeTuning, ...]
    audit_seq: int

    def summary(self) -> str:
        """One line per purpose tuned, for a terminal."""
        lines = [f"target added miss {self.target_added_miss:g}, {self.probes} probes"]
        for t in self.purposes:
            got = "-" if t.added_miss is None else f"{t.added_miss.value:.4f}"
            lines.append(f"{t.purpose}: ef {t.ef_before} ({t.source_before}, added miss "
                         f"{t.before.rate:.4f}) -> {t.ef} (added miss {got}; "
                         f"{'met' if t.met else 'NOT met'}; auto_ef {t.auto_ef})"
                         + ("; a larger M would likely be cheaper" if t.larger_m_advised
                            else ""))
            if t.warning:
                lines.append(f"  warning: {t.warning}")
        return "\n".join(lines)

    def of(self, purpose: str) -> PurposeTuning:
        """Raises: KeyError: the purpose was not tuned (searched exactly, or not asked)."""
        for t in self.purposes:
            if t.purpose == purpose:
                return t
        raise KeyError(purpose)


def probe_score(threshold: float) -> float:
    """The expected probe-to-template cosine a health check perturbs to."""
    return min(0.99, max(0.2, threshold))


def second_capture(units: NDArray[np.float32], score: float,
                   rng: np.random.Generator) -> NDArray[np.float32]:
    """Unit templates perturbed like a second capture: isotropic noise of per-coordinate
    sigma = sqrt((1/score^2 - 1) / d), so that cos(probe, template) ~ 1 / sqrt(1 +
    d sigma^2) = ``score``. The noisy intermediate is zeroed before it is freed."""
    sigma = math.sqrt((1.0 / score**2 - 1.0) / units.shape[1])
    noisy = units + rng.standard_normal(units.shape, dtype=np.float32) * np.float32(sigma)
    try:
        return normalised(noisy)
    finally:
        noisy.fill(0)


@contextmanager
def _probes(p: Parts, purpose: str, threshold: float, n: int, rng: np.random.Generator,
            ) -> Iterator[tuple[NDArray[np.float32], list[bytes], NDArray[np.bool_]]]:
    """(probes, their mates' subject refs, which mates exact search finds); the probes
    are zeroed on exit."""
    vectors, refs = p.gallery.sample_live(purpose, n, rng)
    try:
        probes = second_capture(vectors, probe_score(threshold), rng)
    finally:
        vectors.fill(0)
    try:
        truth = p.gallery.best_exact(probes, purpose, p.clock.now_us())
        yield probes, refs, _hits_mate(truth, refs, threshold)
    finally:
        probes.fill(0)


def _hits_mate(hits: Sequence[Hit | None], refs: list[bytes], threshold: float,
               ) -> NDArray[np.bool_]:
    """Which hits are the probe's mate (its subject) at or above the threshold."""
    return np.array([h is not None and h.subject_ref == ref and h.score >= threshold
                     for h, ref in zip(hits, refs, strict=True)], dtype=bool)


def _trial(p: Parts, purpose: str, probes: NDArray[np.float32], refs: list[bytes],
           found: NDArray[np.bool_], threshold: float, ef: int | None, ef_used: int) -> Trial:
    hits, seconds = p.gallery.best_graph(probes, purpose, p.clock.now_us(), ef)
    misses = int((found & ~_hits_mate(hits, refs, threshold)).sum())
    total = int(found.sum())
    return Trial(ef=ef_used, misses=misses, found=total, rate=misses / total if total else 0.0,
                 graph_us=1e6 * seconds / max(1, len(refs)))


def meets(trial: Trial, target: float) -> bool:
    """Whether a trial shows the added miss rate at or under ``target`` with 95 %
    confidence: the upper end of its Wilson interval, not the point estimate (a tuning
    that met the target only on average missed 4x the target on fresh probes)."""
    return trial.found > 0 and wilson(trial.misses, trial.found)[1] <= target


def _sample(sample: object, default: int) -> int:
    if sample is None:
        return default
    if isinstance(sample, bool) or not isinstance(sample, int) or not 1 <= sample <= MAX_SAMPLE:
        raise InvalidInput(f"sample must be an int between 1 and {MAX_SAMPLE}")
    return sample


def _seed(seed: object) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidInput("seed must be a non-negative int or None")
    return seed


def _rules(p: Parts, purpose: str | None) -> list[Purpose]:
    """The purposes to measure: the one named (PolicyViolation if unknown), or every
    purpose of the policy that has a sub-index."""
    policy = p.vault.policy
    if purpose is not None:
        return [policy.purpose(purpose)]
    return [policy.purposes[name] for name in sorted(p.gallery.live_per_purpose())
            if name in policy.purposes]


def index_health(p: Parts, purpose: str | None, sample: int, actor: str,
                 seed: int | None) -> IndexHealth:
    """The ordering of :meth:`TemplateStore.index_health`."""
    with p.audited("index-health", actor, purpose=purpose, sample=sample) as f:
        n = _sample(sample, 1000)
        rng = np.random.default_rng(_seed(seed))
        out: list[PurposeHealth] = []
        with p.lock:  # no rebuild swaps the index, no mutation, while it is measured
            for rule in _rules(p, purpose):
                out.append(_health(p, rule, n, rng))
            fields = {h.purpose: {"live": h.live, "ef": h.ef, "source": h.ef_source,
                                  "found": h.found,
                                  "misses": h.added_miss.errors if h.added_miss else 0,
                                  "stale": h.stale} for h in out}
            seq = p.trail.append("index-health", actor=str(actor), purposes=fields, **f)
        return IndexHealth(purposes=tuple(out), audit_seq=seq)


def _health(p: Parts, rule: Purpose, n: int, rng: np.random.Generator) -> PurposeHealth:
    ef, source, live = p.gallery.ef_of(rule.name)
    tuned = p.gallery.tuned.get(rule.name)
    stale = tuned is not None and retune_due(tuned, live)
    warning = (f"the sub-index grew from {tuned.live} to {live} live records since it was "
               "tuned: run tune_index again" if stale and tuned is not None else None)
    health = PurposeHealth(
        purpose=rule.name, live=live, ef=ef, ef_source=source, probes=0,
        probe_score=probe_score(rule.match_threshold), found=0, added_miss=None,
        graph_us=None, tuned_ef=tuned.ef if tuned else None,
        tuned_live=tuned.live if tuned else None, stale=stale, warning=warning)
    if source == "exact":
        return health
    with _probes(p, rule.name, rule.match_threshold, n, rng) as (probes, refs, found):
        trial = _trial(p, rule.name, probes, refs, found, rule.match_threshold, None, ef)
    if not trial.found:
        warning = "exact search found no mate among the probes: no rate can be measured"
    return dataclasses.replace(
        health, probes=n, found=trial.found, graph_us=trial.graph_us, warning=warning,
        added_miss=Rate.of(trial.misses, trial.found) if trial.found else None)


def tune_index(p: Parts, target: float, purpose: str | None, sample: int | None, actor: str,
               seed: int | None) -> TuneReport:
    """The ordering of :meth:`TemplateStore.tune_index`."""
    with p.audited("tune-index", actor, purpose=purpose, sample=sample) as f:
        if (isinstance(target, bool) or not isinstance(target, int | float)
                or not 0.0 < float(target) < 1.0):
            raise InvalidInput("target_added_miss must be a number strictly between 0 and 1")
        target = float(target)
        # about half the probes find their mate at or above the threshold (those count);
        # with no miss, 3.84 / target of them are needed to show the target at 95 %
        n = _sample(sample, min(MAX_SAMPLE, math.ceil(10 / target)))
        rng = np.random.default_rng(_seed(seed))
        with p.lock:
            rules = _rules(p, purpose)
            graphs = [(rule, p.gallery.ef_of(rule.name)) for rule in rules]
            if any(source == "fixed" for _, (_, source, _) in graphs):
                raise InvalidInput("this store was opened with IndexParams(ef_search=...), "
                                   "which fixes ef and would override a tuning: reopen "
                                   "without it to tune")
            tuned = [_tune(p, rule, n, rng, target, ef, source, live)
                     for rule, (ef, source, live) in graphs if source != "exact"]
            table = p.gallery.tuned if purpose is not None else {}
            m = p.gallery.params.M
            measured = [t for t in tuned if t.added_miss is not None]
            # each tuning names the graph it was measured on (a snapshot keeps its M)
            table.update({t.purpose: TunedEf(t.ef, t.live, p.gallery.graph_m(t.purpose))
                          for t in measured})
            fields = {t.purpose: {"ef": t.ef, "live": t.live, "met": t.met,
                                  "misses": t.added_miss.errors, "found": t.added_miss.trials,
                                  "ef_before": t.ef_before, "M": p.gallery.graph_m(t.purpose)}
                      for t in measured if t.added_miss is not None}
            with p.mutation():
                p.vault.save_index_tuning(table)
                seq = p.trail.append("tune-index", actor=str(actor), target=target, probes=n,
                                     M=m, purposes=fields, **f)
            p.gallery.use_tuning(table)
        return TuneReport(target_added_miss=target, probes=n, purposes=tuple(tuned),
                          audit_seq=seq)


def _tune(p: Parts, rule: Purpose, n: int, rng: np.random.Generator, target: float,
          ef_before: int, source: str, live: int) -> PurposeTuning:
    t = rule.match_threshold
    with _probes(p, rule.name, t, n, rng) as (probes, refs, found):
        before = _trial(p, rule.name, probes, refs, found, t, None, ef_before)
        if not before.found:
            return PurposeTuning(
                purpose=rule.name, live=live, ef_before=ef_before, source_before=source,
                auto_ef=auto_ef(live), ef=ef_before, met=False, added_miss=None,
                before=before, trials=(), larger_m_advised=False,
                warning="exact search found no mate among the probes (is the purpose's "
                        "threshold above what its own templates reach?): ef left as it was")
        trials: list[Trial] = []
        chosen: Trial | None = None
        for ef in [e for e in LADDER if e < live] or [LADDER[0]]:
            trial = _trial(p, rule.name, probes, refs, found, t, ef, ef)
            trials.append(trial)
            if not meets(trial, target):
                chosen = None
            elif chosen is None:
                chosen = trial
            else:
                break  # two efs in a row meet the target: the first of them is chosen
    met = chosen is not None
    pick = chosen or min(trials, key=lambda x: (x.rate, -x.ef))
    warnings = []
    m = p.gallery.graph_m(rule.name)
    if not met:
        warnings.append(f"no ef up to {trials[-1].ef} kept the added miss rate at or under "
                        f"{target:g} (best: {pick.rate:.4g} at ef={pick.ef}): rebuild with a "
                        f"larger M (IndexParams(M={2 * m}), then rebuild_index)")
    if wilson(0, pick.found)[1] > target:
        warnings.append(f"{pick.found} mates found among {n} probes cannot show a rate under "
                        f"{target:g} at 95 % even with no miss (about {math.ceil(3.84 / target)} "
                        "are needed): raise sample")
    return PurposeTuning(purpose=rule.name, live=live, ef_before=ef_before,
                         source_before=source, auto_ef=auto_ef(live), ef=pick.ef, met=met,
                         added_miss=Rate.of(pick.misses, pick.found),
                         before=before, trials=tuple(trials),
                         # measured: M=16 -> 32 at ef >= 256; beyond 32, only a miss
                         larger_m_advised=(pick.ef >= LARGER_M_EF and m < 32) or not met,
                         warning="; ".join(warnings) or None)
