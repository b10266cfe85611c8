"""Calibrating a purpose's threshold on the model's own labelled templates.

The public method is :meth:`TemplateStore.calibrate`; this module orders it over the
store's parts. A threshold belongs to a model: the README's 0.55-0.60 suit the synthetic
demo data, while dlib's 128-d embeddings need about 0.92 before strangers stop matching.
Calibration turns a labelled set (several templates of each of many people, computed with
the store's model) into a proposed threshold for a target error rate:

- ``target_fmr`` (1:1, ISO/IEC 19795-1): every pair of the set is scored; the threshold
  is the lowest whose false-match rate over the non-mated pairs is at most the target
  (:func:`~biotemplate.evaluation.threshold_for`).
- ``target_fpir`` (1:N, NIST FRTE): every template is searched, as a real audited search
  (reason "calibration"), against the purpose's live gallery, as a *non-mated* search:
  the people of the set must not be enrolled for the purpose. A candidate whose subject id
  equals the template's label is left out (an enrolled calibration subject is not a false
  positive). The threshold is the lowest at which at most the target fraction of these
  searches return a candidate. FPIR grows with the gallery, so it is measured at the
  store's own N; calibrate again after large growth.

With both targets the stricter (higher) threshold is proposed. The report gives the rates
at it with 95 % Wilson intervals, the counts they rest on, warnings (the rule of three;
sets too small for the target) and the model, and :meth:`CalibrationReport.apply_to`
turns it into a policy for :meth:`TemplateStore.set_policy`, which audits the change.
Nothing is changed by calibrating. The audit entry holds counts, targets and rates: no
template, no label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from . import matching
from ._calls import Parts
from .errors import InvalidInput, PolicyViolation
from .evaluation import (
    Rate,
    check_target,
    label_codes,
    threshold_for,
    verification_scores,
)
from .policy import RetentionPolicy
from .validation import as_templates

__all__ = ["CalibrationReport", "calibrate"]


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    """A proposed threshold for one purpose and the measurements behind it.

    Rates are at ``threshold`` (decision: score >= threshold): ``fmr`` and ``fnmr`` over
    the set's non-mated and mated pairs, ``fpir`` over its searches of the purpose's
    ``gallery`` live records (None where not measured). ``warnings`` lists every reason
    to distrust the proposal; read them before applying it.
    """

    purpose: str
    model: str
    threshold: float
    current_threshold: float
    target_fmr: float | None
    target_fpir: float | None
    fmr: Rate | None
    fnmr: Rate | None
    fpir: Rate | None
    templates: int
    subjects: int
    mated_pairs: int
    nonmated_pairs: int
    searches: int
    gallery: int
    warnings: tuple[str, ...]
    audit_seq: int

    def summary(self) -> str:
        """A few lines for a terminal (what ``biotemplate calibrate`` prints)."""
        lines = [f"purpose {self.purpose}, model {self.model}: proposed threshold "
                 f"{self.threshold:.6f} (now {self.current_threshold:.6f})",
                 f"  {self.templates} templates of {self.subjects} subjects; "
                 f"{self.mated_pairs} mated, {self.nonmated_pairs} non-mated pairs; "
                 f"{self.searches} searches of N={self.gallery}"]
        for name, rate, target in (("FMR", self.fmr, self.target_fmr),
                                   ("FNMR", self.fnmr, None),
                                   ("FPIR", self.fpir, self.target_fpir)):
            if rate is not None:
                goal = f", target {target:g}" if target is not None else ""
                lines.append(f"  {name:<4} {rate.value:.6f} ({rate.errors}/{rate.trials}, "
                             f"95% CI {rate.low:.6f}-{rate.high:.6f}{goal})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def apply_to(self, policy: RetentionPolicy) -> RetentionPolicy:
        """``policy`` with this purpose's ``match_threshold`` set to the proposed one, for
        ``store.set_policy(report.apply_to(store.policy), actor=..., reason=...)``.

        Raises:
            PolicyViolation: ``policy`` has no such purpose.
            InvalidPolicy: the threshold is outside [-1, 1] (no threshold met the target).
        """
        rule = policy.purpose(self.purpose)
        updated = dataclasses.replace(rule, match_threshold=self.threshold)
        return RetentionPolicy(epoch=policy.epoch,
                               purposes={**policy.purposes, self.purpose: updated})


def calibrate(p: Parts, purpose: str, templates: object, labels: object,
              target_fmr: float | None, target_fpir: float | None,
              actor: str) -> CalibrationReport:
    """The ordering of :meth:`TemplateStore.calibrate`."""
    with p.audited("calibrate", actor, purpose=purpose) as f:
        rule = p.vault.policy.purpose(purpose)
        if target_fmr is None and target_fpir is None:
            raise InvalidInput("calibrate needs target_fmr, target_fpir or both")
        fmr_goal = None if target_fmr is None else check_target(target_fmr, "target_fmr")
        fpir_goal = None if target_fpir is None else check_target(target_fpir, "target_fpir")
        units = as_templates(templates, p.vault.dim)  # as a search takes them: same scores
        if units.shape[0] < 2:
            raise InvalidInput("calibrate needs at least two templates")
        codes = label_codes(labels, units.shape[0])
        mated, nonmated = verification_scores(units, codes.tolist())
        warnings: list[str] = []
        candidates: list[float] = []
        if fmr_goal is not None:
            if not nonmated.size:
                raise InvalidInput("every template has the same label: no non-mated pair "
                                   "to measure a false-match rate on")
            chosen = threshold_for(nonmated, fmr_goal)
            candidates.append(chosen.threshold)
            if chosen.warning:
                warnings.append(f"FMR: {chosen.warning}")
        tops: NDArray[np.float64] | None = None
        if fpir_goal is not None:
            tops, floor = _non_mated_tops(p, rule.name, units, labels, actor)
            chosen = threshold_for(tops, fpir_goal)
            value = chosen.threshold
            if floor is not None and value < floor:
                value = floor
                warnings.append(f"purpose {rule.name!r} allows only identification searches, "
                                "which return nothing below its current threshold: no lower "
                                "threshold can be proposed for FPIR")
            candidates.append(value)
            if chosen.warning:
                warnings.append(f"FPIR: {chosen.warning}".replace("non-mated scores",
                                                                  "non-mated searches"))
        threshold = max(candidates)
        gallery = p.gallery.live_per_purpose().get(rule.name, 0)
        warnings += _more_warnings(threshold, mated.size, tops is not None, gallery)
        fmr = Rate.of(int((nonmated >= threshold).sum()), nonmated.size) if nonmated.size \
            else None
        fnmr = Rate.of(int((mated < threshold).sum()), mated.size) if mated.size else None
        fpir = Rate.of(int((tops >= threshold).sum()), tops.size) if tops is not None else None
        report = CalibrationReport(
            purpose=rule.name, model=p.vault.model, threshold=threshold,
            current_threshold=rule.match_threshold, target_fmr=fmr_goal,
            target_fpir=fpir_goal, fmr=fmr, fnmr=fnmr, fpir=fpir,
            templates=int(units.shape[0]), subjects=int(codes.max()) + 1,
            mated_pairs=int(mated.size), nonmated_pairs=int(nonmated.size),
            searches=0 if tops is None else int(tops.size), gallery=int(gallery),
            warnings=tuple(warnings), audit_seq=0)
        units.fill(0)
        seq = p.trail.append("calibrate", actor=str(actor), **f, **_audit_fields(report))
        return dataclasses.replace(report, audit_seq=seq)


def _audit_fields(report: CalibrationReport) -> dict[str, Any]:
    """What the audit keeps of a calibration: counts, targets, the threshold and rates."""
    fields = {k: getattr(report, k) for k in (
        "model", "threshold", "current_threshold", "target_fmr", "target_fpir",
        "templates", "subjects", "mated_pairs", "nonmated_pairs", "searches", "gallery")}
    for name in ("fmr", "fnmr", "fpir"):
        rate = getattr(report, name)
        fields[name] = None if rate is None else rate.value
    fields["warnings"] = len(report.warnings)
    return fields


def _non_mated_tops(p: Parts, purpose: str, units: NDArray[np.float32], labels: object,
                    actor: str) -> tuple[NDArray[np.float64], float | None]:
    """Each template's best candidate score when searched as a non-mated probe (-inf for
    no candidate), and the lowest threshold those searches can see (None: any)."""
    rule = p.vault.policy.purpose(purpose)
    if rule.allows_mode("investigation"):
        mode, floor = "investigation", None
    elif rule.allows_mode("identification"):
        mode, floor = "identification", rule.match_threshold
    else:
        raise PolicyViolation(f"purpose {purpose!r} allows no 1:N search: FPIR cannot be "
                              "measured (use target_fmr)")
    names = [x.item() if isinstance(x, np.generic) else x
             for x in cast(Sequence[object], labels)]  # checked by label_codes
    results = matching.search(p, units, purpose, 2, actor, "calibration", mode, batch=True)
    tops = np.full(len(results), -np.inf)
    for i, result in enumerate(results):
        others = [c.score for c in result.candidates if c.subject_id != names[i]]
        if others:
            tops[i] = max(others)
    return tops, floor


def _more_warnings(threshold: float, mated: int, searched: bool, gallery: int) -> list[str]:
    out = []
    if threshold > 1.0:
        out.append("no threshold in [-1, 1] meets the target on these scores (apply_to "
                   "refuses it): the model cannot reach this rate on this set")
    if not mated:
        out.append("no label appears twice: there are no mated pairs, so FNMR at the "
                   "proposed threshold is unknown")
    if searched and not gallery:
        out.append("the purpose has no live record: its FPIR is 0 at any threshold and "
                   "says nothing; calibrate FPIR once the gallery is enrolled")
    return out
