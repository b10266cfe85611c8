"""biotemplate.evaluation and biotemplate.plots: each metric against a case worked by hand
(ties at the threshold included), the errors for empty or malformed sets, threshold_for's
monotonicity (hypothesis), identification_rates against a brute-force count over the same
searches, and the PNG files."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import biotemplate as bt
from biotemplate import evaluation as ev
from biotemplate.synthetic import Gallery, make_gallery, non_mated, probes

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"

# Four 2-D templates: a and b are one person ("x"), c and d another ("y"); d is given
# unnormalised (length 5) to show that scores are cosines. By hand, pairs i < j:
# (a,b)=1.0 mated, (a,c)=0 , (a,d)=0.6, (b,c)=0, (b,d)=0.6, (c,d)=0.8 mated.
HAND = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
HAND_LABELS = ["x", "x", "y", "y"]


# --- verification_scores ----------------------------------------------------------------


def test_verification_scores_by_hand() -> None:
    mated, nonmated = ev.verification_scores(HAND, HAND_LABELS)
    assert mated.dtype == np.float32 and nonmated.dtype == np.float32
    np.testing.assert_allclose(mated, [1.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(nonmated, [0.0, 0.6, 0.0, 0.6], atol=1e-6)


def test_verification_scores_blocks_agree_with_the_full_matrix() -> None:
    g = make_gallery(20, 3, 16, seed=4)
    ids = [int(s[2:]) for s in g.subject_ids]  # int labels work as well as str
    unit = g.templates / np.linalg.norm(g.templates, axis=1, keepdims=True)
    full = unit @ unit.T
    i, j = np.triu_indices(len(ids), k=1)
    same = np.asarray(ids)[i] == np.asarray(ids)[j]
    for block in (1, 7, 1024):
        mated, nonmated = ev.verification_scores(g.templates, ids, block=block)
        np.testing.assert_allclose(mated, full[i, j][same], atol=1e-6)
        np.testing.assert_allclose(nonmated, full[i, j][~same], atol=1e-6)
    assert mated.size == 20 * 3 and nonmated.size == 60 * 59 // 2 - 60


def test_verification_scores_halves_may_be_empty() -> None:
    mated, nonmated = ev.verification_scores(HAND[:3], ["a", "b", "c"])
    assert mated.size == 0 and nonmated.size == 3
    mated, nonmated = ev.verification_scores(HAND[:3], ["a", "a", "a"])
    assert mated.size == 3 and nonmated.size == 0


@pytest.mark.parametrize(("templates", "labels", "error"), [
    (HAND, ["x", "x", "y"], bt.InvalidInput),  # one label short
    (HAND, "xxyy", bt.InvalidInput),  # a string is not a list of labels
    (HAND, ["x", "x", 1.5, "y"], bt.InvalidInput),  # a float label
    (HAND, ["x", "x", None, "y"], bt.InvalidInput),
    (HAND, ["x", True, "y", "y"], bt.InvalidInput),
    (HAND[0], ["x"], bt.InvalidTemplate),  # 1-D
    (HAND[:1], ["x"], bt.InvalidTemplate),  # a single template has no pair
    (np.array([[1.0, np.nan], [0.0, 1.0]]), ["x", "y"], bt.InvalidTemplate),
    (np.array([[0.0, 0.0], [0.0, 1.0]]), ["x", "y"], bt.InvalidTemplate),
    ("templates", ["x"], bt.InvalidTemplate),
])
def test_verification_scores_refuses_bad_input(templates: object, labels: object,
                                               error: type[Exception]) -> None:
    with pytest.raises(error):
        ev.verification_scores(templates, labels)


def test_errors_never_quote_a_label() -> None:
    with pytest.raises(bt.InvalidInput) as info:
        ev.verification_scores(HAND, ["SECRET-SUBJECT-7", "x", 2.5, "y"])
    assert "SECRET" not in str(info.value) and "2.5" not in str(info.value)


# --- threshold_for ----------------------------------------------------------------------

TEN = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def up(score: float) -> float:
    """The smallest float32 above ``score``, worked out by hand."""
    f = np.float32(score)
    return float(f if float(f) > score else np.nextafter(f, np.float32(2)))


def test_thresholds_are_float32_values_just_above_the_score() -> None:
    assert ev.float32_above(0.5) == float(np.nextafter(np.float32(0.5), np.float32(1)))
    assert ev.float32_above(0.8) == float(np.float32(0.8)) > 0.8  # rounds up already
    assert ev.float32_above(0.1) == float(np.float32(0.1)) > 0.1  # so does 0.1
    assert ev.float32_above(float(np.float32(0.1))) == float(
        np.nextafter(np.float32(0.1), np.float32(1)))  # a float32 score: one step up
    scores32 = np.float32([0.3, 0.5, 0.7])
    t = ev.threshold_for(scores32, 0.34)  # one of three may match
    as64 = scores32.astype(np.float64)
    assert (scores32 >= t.threshold).sum() == (as64 >= t.threshold).sum() == 1


@pytest.mark.parametrize(("fmr", "above", "matches"), [
    (0.2, 0.8, 2),  # 2 of 10 may match: t just above the 3rd highest (0.8)
    (0.25, 0.8, 2),  # 2.5 rounds down to 2
    (0.1, 0.9, 1),
    (0.05, 1.0, 0),  # none may match: t just above the highest
    (0.99, 0.1, 9),
])
def test_threshold_for_by_hand(fmr: float, above: float, matches: int) -> None:
    got = ev.threshold_for(TEN, fmr)
    assert got.threshold == up(above)
    assert got.false_matches == matches and got.rate == matches / 10 and got.scores == 10
    assert got.target == fmr and got.rate <= fmr


def test_threshold_for_ties_at_the_threshold_all_fall_below_it() -> None:
    # 2 of 4 may match, but the 1st..3rd highest are tied at 0.5: a threshold that lets
    # two of them match lets all three, so none may; the rate achieved is 0, not 0.5.
    got = ev.threshold_for([0.5, 0.1, 0.5, 0.5], 0.5)
    assert got.threshold == up(0.5) and got.false_matches == 0
    # and at exactly 0.5 all three match (decision: score >= threshold)
    assert sum(s >= 0.5 for s in [0.5, 0.1, 0.5, 0.5]) == 3
    got = ev.threshold_for([0.5, 0.1, 0.5, 0.5], 0.75)
    assert got.threshold == up(0.1) and got.false_matches == 3


def test_threshold_for_survives_float_rounding_of_the_count() -> None:
    scores = np.linspace(0, 1, 100)
    assert 0.29 * 100 < 29  # 28.999999999999996: a naive floor would allow 28
    assert ev.threshold_for(scores, 0.29).false_matches == 29


def test_threshold_for_rule_of_three() -> None:
    few = ev.threshold_for(TEN, 0.2)  # 3 / 0.2 = 15 scores needed
    assert few.needed == 15 and not few.supported
    assert few.warning is not None and "rule of three" in few.warning
    enough = ev.threshold_for(np.linspace(0, 1, 15), 0.2)
    assert enough.supported and enough.warning is None
    assert ev.threshold_for(np.linspace(0, 1, 3000), 1e-3).supported
    assert not ev.threshold_for(np.linspace(0, 1, 2999), 1e-3).supported


def test_threshold_for_with_search_tops_gives_an_fpir_threshold() -> None:
    # four non-mated searches, two with no candidate at all (-inf): FPIR 0.5 allows two
    got = ev.threshold_for([0.7, -np.inf, 0.4, -np.inf], 0.5)
    assert got.threshold == float(np.finfo(np.float32).min) and got.false_matches == 2


@pytest.mark.parametrize("scores", [[], [[0.1, 0.2]], [0.1, float("nan")], [0.1, float("inf")],
                                    "0.1", None])
def test_threshold_for_refuses_bad_scores(scores: object) -> None:
    with pytest.raises(bt.InvalidInput) as info:
        ev.threshold_for(scores, 0.1)
    if scores == []:
        assert "empty" in str(info.value)


@pytest.mark.parametrize("fmr", [0, 1, -0.1, 1.5, float("nan"), float("inf"), True, "0.1",
                                 None])
def test_threshold_for_refuses_fmr_outside_0_1(fmr: object) -> None:
    with pytest.raises(bt.InvalidInput, match="strictly between 0 and 1"):
        ev.threshold_for(TEN, fmr)  # type: ignore[arg-type]


finite = st.floats(min_value=-1, max_value=1, allow_nan=False, width=32)
rate = st.floats(min_value=1e-4, max_value=0.9999, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=60), rate, rate)
def test_threshold_for_is_monotone_in_fmr(scores: list[float], f1: float, f2: float) -> None:
    low, high = sorted((f1, f2))
    strict, loose = ev.threshold_for(scores, low), ev.threshold_for(scores, high)
    assert strict.threshold >= loose.threshold
    arr = np.asarray(scores)
    for got, target in ((strict, low), (loose, high)):
        assert (arr >= got.threshold).mean() == got.rate <= target
        below = np.nextafter(np.float32(got.threshold), np.float32(-2))  # one step down
        assert (arr >= float(below)).mean() > target  # fails: it is the lowest float32


# --- det and eer ------------------------------------------------------------------------

# By hand, with a tie at 0.4 between a mated and a non-mated score:
#   t     0.1  0.4  0.5  0.6  0.9
#   FMR   3/3  2/3  1/3  0    0      #{nonmated >= t} / 3
#   FNMR  0    0    1/3  1/3  2/3    #{mated < t} / 3
MATED, NONMATED = [0.9, 0.6, 0.4], [0.1, 0.4, 0.5]


def test_det_by_hand() -> None:
    curve = ev.det(MATED, NONMATED)
    np.testing.assert_array_equal(curve.thresholds, [0.1, 0.4, 0.5, 0.6, 0.9])
    np.testing.assert_allclose(curve.fmr, [1, 2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(curve.fnmr, [0, 0, 1 / 3, 1 / 3, 2 / 3])
    assert (curve.mated, curve.nonmated) == (3, 3)
    assert curve.at(0.45) == pytest.approx((1 / 3, 1 / 3))
    assert curve.at(0.4) == pytest.approx((2 / 3, 0))  # the tie: both sides match at 0.4
    assert curve.at(2.0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        curve.fmr[0] = 0.5  # read-only


def test_eer_by_hand() -> None:
    got = ev.eer(MATED, NONMATED)
    assert got == ev.Eer(rate=pytest.approx(1 / 3), threshold=0.5, fmr=pytest.approx(1 / 3),
                         fnmr=pytest.approx(1 / 3))
    # |FMR - FNMR| ties at t=0.5 (1 vs 1/2) and t=0.8 (0 vs 1/2): the smaller errors win
    tied = ev.eer([0.8, 0.2], [0.5])
    assert (tied.threshold, tied.rate) == (0.8, 0.25)
    perfect = ev.eer([0.9, 0.8], [0.1, 0.2])
    assert perfect.rate == 0.0 and perfect.threshold == 0.8


@pytest.mark.parametrize(("mated", "nonmated"), [([], [0.1]), ([0.1], []), ([np.nan], [0.1]),
                                                 ([[0.1]], [0.2])])
def test_det_and_eer_refuse_empty_or_bad_sets(mated: object, nonmated: object) -> None:
    for metric in (ev.det, ev.eer):
        with pytest.raises(bt.InvalidInput):
            metric(mated, nonmated)


def test_wilson_interval_known_values() -> None:
    # standard 95% Wilson intervals: 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634]
    assert ev.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert ev.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    r = ev.Rate.of(3, 1000)
    assert r.low < r.value == 0.003 < r.high
    with pytest.raises(bt.InvalidInput):
        ev.wilson(3, 0)


# --- identification_rates ---------------------------------------------------------------

THRESHOLDS = [0.2, 0.35, 0.5, 0.55, 0.65, 0.8]
WATCHLIST = "watchlist"


@pytest.fixture
def enrolled(store: bt.TemplateStore, gallery: Gallery) -> dict[str, str]:
    """The 50-identity gallery enrolled for the watchlist: record id -> subject id."""
    ids = store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                            purposes=[WATCHLIST], ttl=timedelta(days=30), source="case-file",
                            actor="enrol")
    return dict(zip(ids, gallery.subject_ids, strict=True))


def _probe_set(gallery: Gallery) -> tuple[np.ndarray, list[str | None]]:
    which = list(range(0, 50, 2))  # 25 mated probes
    mated = probes(gallery, which, seed=11)
    stranger = non_mated(gallery, 25, seed=12)
    mates: list[str | None] = [gallery.subject_ids[2 * i] for i in which]
    return np.vstack([mated, stranger]), mates + [None] * 25


def test_identification_rates_equal_a_brute_force_count(
        store: bt.TemplateStore, gallery: Gallery, enrolled: dict[str, str]) -> None:
    batch, mates = _probe_set(gallery)
    got = ev.identification_rates(store, WATCHLIST, batch, mates, THRESHOLDS, actor="eval",
                                  batch=7)
    assert (got.mated, got.nonmated, got.rank, got.gallery) == (25, 25, 20, 100)
    assert len(got.audit_seqs) == 50
    # 1. the same searches, read back from the audit trail (record ids and scores)
    fnir, fpir = [], []
    entries = [store.audit.get(seq) for seq in got.audit_seqs]
    assert all(e.event == "search" and e.fields["mode"] == "investigation"
               and e.fields["reason"] == "accuracy evaluation" for e in entries)
    every = [s for e in entries for s in e.fields["scores"]]
    assert min(abs(s - t) for s in every for t in THRESHOLDS) > 1e-5  # no tie to round
    for t in THRESHOLDS:
        misses = false_pos = 0
        for entry, mate in zip(entries, mates, strict=True):
            cands = [(enrolled[r], s) for r, s in zip(entry.fields["record_ids"],
                                                       entry.fields["scores"], strict=True)]
            if mate is None:
                false_pos += any(s >= t for _, s in cands)
            else:
                misses += not any(sid == mate and s >= t for sid, s in cands)
        fnir.append(misses / 25)
        fpir.append(false_pos / 25)
    np.testing.assert_array_equal(got.fnir, fnir)
    np.testing.assert_array_equal(got.fpir, fpir)
    # 2. identification-mode searches, one policy per threshold, give the same rates
    for i, t in enumerate(THRESHOLDS):
        rule = dataclasses.replace(store.policy.purpose(WATCHLIST), match_threshold=t)
        store.set_policy(bt.RetentionPolicy(epoch=store.policy.epoch, purposes={
            **store.policy.purposes, WATCHLIST: rule}), actor="dpo")
        results = store.search_many(batch, purpose=WATCHLIST, k=20, actor="eval")
        hits = [[c.subject_id for c in r.candidates] for r in results]
        assert got.fnir[i] == np.mean([m not in h for h, m in zip(hits, mates) if m])
        assert got.fpir[i] == np.mean([bool(h) for h, m in zip(hits, mates) if m is None])
    assert got.fnir[0] == 0.0 and got.fpir[-1] == 0.0  # the synthetic data is easy


def test_identification_rates_for_a_purpose_without_investigation(
        tmp_path: Path, keys: bt.FileKeyProvider, gallery: Gallery) -> None:
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"id": {
        "max_retention": "30d", "modes": ["identification"], "match_threshold": 0.5}}})
    with bt.TemplateStore.create(tmp_path / "s", dim=64, model="m", policy=policy,
                                 key_provider=keys) as store:
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, purposes=["id"],
                          ttl=timedelta(days=1), actor="enrol")
        batch, mates = _probe_set(gallery)
        with pytest.raises(bt.InvalidInput, match="only identification"):
            ev.identification_rates(store, "id", batch, mates, [0.4, 0.6], actor="eval")
        got = ev.identification_rates(store, "id", batch, mates, [0.5, 0.6], actor="eval")
        assert store.audit.get(got.audit_seqs[0]).fields["mode"] == "identification"
        assert got.fnir[0] == 0.0 and got.fpir[0] == 0.0


@pytest.mark.parametrize(("mates", "thresholds", "match"), [
    (["P-000000"] * 3, [0.5], "both mated"),
    ([None] * 3, [0.5], "both mated"),
    (["P-000000", None], [0.5], "2 mate_ids for 3 probes"),
    (["P-000000", None, 7], [0.5], "subject id"),
    (["P-000000", None, None], [], "empty"),
    (["P-000000", None, None], [np.nan], "NaN"),
])
def test_identification_rates_refuses_bad_input(
        store: bt.TemplateStore, gallery: Gallery, mates: list[object], thresholds: list[float],
        match: str) -> None:
    with pytest.raises(bt.InvalidInput, match=match):
        ev.identification_rates(store, WATCHLIST, gallery.templates[:3], mates,  # type: ignore[arg-type]
                                thresholds, actor="eval")


def test_identification_rates_unknown_purpose_is_refused_and_audited(
        store: bt.TemplateStore, gallery: Gallery) -> None:
    with pytest.raises(bt.PolicyViolation):
        ev.identification_rates(store, "nope", gallery.templates[:2], ["P-000000", None],
                                [0.5], actor="eval")
    last = store.audit.get(store.audit.verify().entries)
    assert last.event == "search" and last.outcome == "refused"


# --- plots --------------------------------------------------------------------------------


def test_plots_are_png_files(tmp_path: Path, store: bt.TemplateStore, gallery: Gallery,
                             enrolled: dict[str, str]) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    from biotemplate import plots

    mated, nonmated = ev.verification_scores(gallery.templates, gallery.subject_ids)
    hard = make_gallery(50, 3, 64, seed=9, genuine=0.3)
    hard_curve = ev.det(*ev.verification_scores(hard.templates, hard.subject_ids))
    batch, mates = _probe_set(gallery)
    rates = ev.identification_rates(store, WATCHLIST, batch, mates,
                                    np.linspace(0, 1, 41), actor="eval")
    written = [
        plots.plot_det(ev.det(mated, nonmated), tmp_path / "det.png", threshold=0.5),
        plots.plot_det({"easy": ev.det(mated, nonmated), "hard": hard_curve},
                       tmp_path / "two.png", threshold=0.3, title="two models"),
        plots.plot_det(rates, tmp_path / "fpir.png", threshold=0.55),
        plots.plot_scores(mated, nonmated, tmp_path / "scores.png", threshold=0.5),
    ]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG) and 1000 < len(data) < 300_000
    with pytest.raises(bt.InvalidInput):
        plots.plot_det({"a": hard_curve, "b": rates}, tmp_path / "mixed.png")
    with pytest.raises(bt.InvalidInput):
        plots.plot_scores([], nonmated, tmp_path / "empty.png")
    with pytest.raises(bt.BiotemplateError, match="cannot write"):
        plots.plot_scores(mated, nonmated, tmp_path / "no-such-dir" / "x.png")


def test_plots_without_matplotlib_name_the_extra() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None  # as if not installed\n"
            "import biotemplate\n"
            "from biotemplate import plots\n"
            "try:\n"
            "    plots.plot_scores([0.9], [0.1], 'x.png')\n"
            "except biotemplate.BiotemplateError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert "pip install 'biotemplate[plot]'" in out.stdout
    lazy = subprocess.run([sys.executable, "-c", "import sys, biotemplate.plots; "
                           "print('matplotlib' in sys.modules)"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert lazy.stdout.strip() == "False"


def test_rule_of_three_helper() -> None:
    assert ev.rule_of_three(1e-3) == 3000 and ev.rule_of_three(0.2) == 15
    assert math.isclose(3 / 0.003, 1000)


def test_evaluate_is_the_one_call_behind_the_evaluate_command() -> None:
    g = make_gallery(60, 3, 32, seed=8, genuine=0.4)
    got = ev.evaluate(g.templates, g.subject_ids, target_fmr=0.01)
    mated, nonmated = ev.verification_scores(g.templates, g.subject_ids)
    assert got.threshold == ev.threshold_for(nonmated, 0.01)
    assert (got.templates, got.subjects) == (180, 60)
    assert got.fmr.errors == got.threshold.false_matches and got.fmr.trials == nonmated.size
    assert got.fnmr is not None and got.fnmr.errors == int((mated < got.threshold.threshold).sum())
    assert got.eer == ev.eer(mated, nonmated) and got.det is not None
    np.testing.assert_array_equal(got.mated, mated)
    np.testing.assert_array_equal(got.nonmated, nonmated)
    assert "array" not in repr(got)
    text = got.summary()
    assert "threshold for FMR <= 0.01" in text and "EER" in text and "P-0" not in text
    single = ev.evaluate(g.templates[::3], g.subject_ids[::3], target_fmr=0.1)
    assert single.fnmr is None and single.det is None and "no label appears twice" in \
        single.summary()
    with pytest.raises(bt.InvalidInput, match="same label"):
        ev.evaluate(g.templates[:3], g.subject_ids[:3])
    with pytest.raises(bt.InvalidInput):
        ev.evaluate(g.templates, g.subject_ids, target_fmr=0)
