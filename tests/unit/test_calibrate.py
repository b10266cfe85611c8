"""TemplateStore.calibrate: the proposed threshold for a target FMR and/or FPIR, the rates
and counts behind it, the policy it turns into, its audit entry (counts, no template, no
label), refusals; and, when the faces extra and photos are at hand, a real model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import biotemplate as bt
from biotemplate import evaluation as ev
from biotemplate.synthetic import Gallery, make_gallery

DIM, MODEL = 64, "test-model-v1"  # as conftest.py

ROOT = Path(__file__).resolve().parents[2]
WATCH = "watchlist"
TTL = timedelta(days=30)


@pytest.fixture
def population() -> Gallery:
    """People the store has not enrolled: 60 x 3 templates with some overlap between
    mated and non-mated scores (genuine ~0.4)."""
    return make_gallery(60, 3, DIM, seed=17, genuine=0.4, prefix="C-")


@pytest.fixture
def enrolled(store: bt.TemplateStore, gallery: Gallery) -> bt.TemplateStore:
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, purposes=[WATCH],
                      ttl=TTL, source="case-file", actor="enrol")
    return store


def non_mated_tops(store: bt.TemplateStore, pop: Gallery) -> np.ndarray:
    """By brute force: each template's best candidate among other subjects."""
    tops = []
    results = store.search_many(pop.templates, purpose=WATCH, k=20, actor="check",
                                mode="investigation")
    for result, label in zip(results, pop.subject_ids, strict=True):
        others = [c.score for c in result.candidates if c.subject_id != label]
        tops.append(max(others) if others else -np.inf)
    return np.asarray(tops)


def test_calibrate_for_a_target_fmr(enrolled: bt.TemplateStore, population: Gallery) -> None:
    report = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                target_fmr=0.01, actor="calibrator")
    mated, nonmated = ev.verification_scores(population.templates, population.subject_ids)
    assert report.threshold == ev.threshold_for(nonmated, 0.01).threshold
    assert (report.templates, report.subjects) == (180, 60)
    assert (report.mated_pairs, report.nonmated_pairs) == (mated.size, nonmated.size) \
        == (180, 180 * 179 // 2 - 180)
    assert report.model == MODEL and report.purpose == WATCH
    assert report.current_threshold == 0.55 and report.target_fmr == 0.01
    assert report.fpir is None and report.searches == 0 and report.gallery == 100
    fmr, fnmr = report.fmr, report.fnmr
    assert fmr is not None and fnmr is not None
    assert fmr.errors == int((nonmated >= report.threshold).sum()) and fmr.value <= 0.01
    assert fnmr.errors == int((mated < report.threshold).sum())
    assert fmr.low <= fmr.value <= fmr.high and fnmr.low <= fnmr.value <= fnmr.high
    assert report.warnings == ()  # 15,930 pairs support 0.01 (needs 300)
    text = report.summary()
    assert f"{report.threshold:.6f}" in text and "FMR" in text and "FPIR" not in text
    assert "C-0" not in text


def test_calibrate_for_a_target_fpir_searches_the_gallery(
        enrolled: bt.TemplateStore, population: Gallery) -> None:
    head = enrolled.audit.verify().entries
    report = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                target_fpir=0.05, actor="calibrator")
    # one real, audited search per template, by the calibrating actor
    searches = [enrolled.audit.get(s) for s in range(head + 1, head + 181)]
    assert all(e.event == "search" and e.actor == "calibrator"
               and e.fields["reason"] == "calibration" for e in searches)
    tops = non_mated_tops(enrolled, population)
    assert report.threshold == ev.threshold_for(tops, 0.05).threshold
    fpir = report.fpir
    assert fpir is not None and fpir.trials == report.searches == 180
    assert fpir.errors == int((tops >= report.threshold).sum()) and fpir.value <= 0.05
    assert report.fmr is not None and report.gallery == 100


def test_both_targets_take_the_stricter_threshold(
        enrolled: bt.TemplateStore, population: Gallery) -> None:
    both = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                              target_fmr=0.02, target_fpir=0.3, actor="calibrator")
    fmr_only = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                  target_fmr=0.02, actor="calibrator")
    fpir_only = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                   target_fpir=0.3, actor="calibrator")
    assert both.threshold == max(fmr_only.threshold, fpir_only.threshold)


def test_a_calibration_subject_enrolled_is_not_a_false_positive(
        enrolled: bt.TemplateStore, gallery: Gallery) -> None:
    # the gallery's own people, labelled by their subject ids: their mates are ignored,
    # so the threshold rests on the best *other* subject of each search
    report = enrolled.calibrate(WATCH, gallery.templates, gallery.subject_ids,
                                target_fpir=0.1, actor="calibrator")
    tops = non_mated_tops(enrolled, gallery)
    assert report.threshold == ev.threshold_for(tops, 0.1).threshold
    assert report.threshold < 0.5  # mates score ~0.7: they did not set it


def test_the_report_applies_through_set_policy(enrolled: bt.TemplateStore,
                                               population: Gallery) -> None:
    report = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                target_fmr=0.01, actor="calibrator")
    before = enrolled.policy
    proposed = report.apply_to(before)
    assert proposed.purpose(WATCH).match_threshold == report.threshold
    assert {n: p for n, p in proposed.purposes.items() if n != WATCH} == \
        {n: p for n, p in before.purposes.items() if n != WATCH}
    receipt = enrolled.set_policy(proposed, actor="dpo", reason="calibrated")
    assert enrolled.policy.purpose(WATCH).match_threshold == report.threshold
    assert enrolled.audit.get(receipt.audit_seq).event == "policy"
    other = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"x": {
        "max_retention": "1d", "modes": ["verification"], "match_threshold": 0.5}}})
    with pytest.raises(bt.PolicyViolation):
        report.apply_to(other)
    with pytest.raises(bt.InvalidPolicy):  # no threshold met the target: never applied
        dataclasses.replace(report, threshold=float(np.nextafter(1.0, 2.0))).apply_to(before)


def test_the_audit_entry_holds_counts_not_templates_or_labels(
        enrolled: bt.TemplateStore, population: Gallery) -> None:
    report = enrolled.calibrate(WATCH, population.templates, population.subject_ids,
                                target_fmr=0.01, target_fpir=0.05, actor="calibrator")
    entry = enrolled.audit.get(report.audit_seq)
    assert entry.event == "calibrate" and entry.outcome == "ok" and entry.actor == "calibrator"
    assert entry.fields["threshold"] == report.threshold
    assert entry.fields["templates"] == 180 and entry.fields["model"] == MODEL
    text = json.dumps(entry.fields, default=str)
    assert "C-0" not in text  # no label
    assert all(not isinstance(v, list | bytes) for v in entry.fields.values())  # no vector
    assert "C-0" not in repr(report)


def test_small_sets_carry_warnings(enrolled: bt.TemplateStore, population: Gallery) -> None:
    report = enrolled.calibrate(WATCH, population.templates[:30], population.subject_ids[:30],
                                target_fmr=1e-3, target_fpir=1e-2, actor="calibrator")
    joined = " ".join(report.warnings)
    assert "FMR: 405 non-mated scores cannot support" in joined  # 435 pairs - 10 x 3 mated
    assert "FPIR: 30 non-mated searches cannot support" in joined
    singles = enrolled.calibrate(WATCH, population.templates[::3], population.subject_ids[::3],
                                 target_fmr=0.1, actor="calibrator")
    assert singles.fnmr is None and any("no mated pairs" in w for w in singles.warnings)


def test_an_empty_gallery_is_flagged(store: bt.TemplateStore, population: Gallery) -> None:
    report = store.calibrate(WATCH, population.templates, population.subject_ids,
                             target_fpir=0.05, actor="calibrator")
    assert report.gallery == 0 and report.fpir is not None and report.fpir.errors == 0
    assert any("no live record" in w for w in report.warnings)


def test_identification_only_purposes_cannot_go_below_their_threshold(
        tmp_path: Path, keys: bt.FileKeyProvider, gallery: Gallery, population: Gallery,
) -> None:
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {
        "id": {"max_retention": "30d", "modes": ["identification"], "match_threshold": 0.6},
        "gate": {"max_retention": "1d", "modes": ["verification"], "match_threshold": 0.6}}})
    with bt.TemplateStore.create(tmp_path / "s", dim=DIM, model=MODEL, policy=policy,
                                 key_provider=keys) as store:
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, purposes=["id"],
                          ttl=TTL, actor="enrol")
        report = store.calibrate("id", population.templates, population.subject_ids,
                                 target_fpir=0.5, actor="calibrator")
        assert report.threshold == 0.6
        assert any("only identification" in w for w in report.warnings)
        with pytest.raises(bt.PolicyViolation, match="no 1:N search"):
            store.calibrate("gate", population.templates, population.subject_ids,
                            target_fpir=0.1, actor="calibrator")
        fmr = store.calibrate("gate", population.templates, population.subject_ids,
                              target_fmr=0.1, actor="calibrator")
        assert fmr.fmr is not None and fmr.fmr.value <= 0.1


@pytest.mark.parametrize(("purpose", "kwargs", "error"), [
    (WATCH, {}, bt.InvalidInput),  # no target
    (WATCH, {"target_fmr": 0.0}, bt.InvalidInput),
    (WATCH, {"target_fmr": 1.0}, bt.InvalidInput),
    (WATCH, {"target_fpir": float("nan")}, bt.InvalidInput),
    (WATCH, {"target_fmr": "0.1"}, bt.InvalidInput),
    ("unknown", {"target_fmr": 0.1}, bt.PolicyViolation),
    (WATCH, {"target_fmr": 0.1, "labels": ["C-1"] * 3}, bt.InvalidInput),  # one label short
    (WATCH, {"target_fmr": 0.1, "labels": ["C-1"] * 4}, bt.InvalidInput),  # one person
    (WATCH, {"target_fmr": 0.1, "templates": np.zeros((4, DIM))}, bt.InvalidTemplate),
    (WATCH, {"target_fmr": 0.1, "templates": np.ones((1, DIM)),
             "labels": ["C-1"]}, bt.InvalidInput),
])
def test_refusals_are_audited(store: bt.TemplateStore, population: Gallery, purpose: str,
                              kwargs: dict[str, object], error: type[Exception]) -> None:
    args = {"templates": population.templates[:4], "labels": population.subject_ids[:4],
            **kwargs}
    with pytest.raises(error):
        store.calibrate(purpose, args.pop("templates"), args.pop("labels"),  # type: ignore[arg-type]
                        actor="calibrator", **args)  # type: ignore[arg-type]
    last = store.audit.get(store.audit.verify().entries)
    assert last.event == "calibrate" and last.outcome == "refused"
    assert "C-0" not in json.dumps(last.fields, default=str)


def test_a_read_only_handle_refuses_calibration(
        store_dir: Path, store: bt.TemplateStore, keys: bt.FileKeyProvider,
        population: Gallery) -> None:
    with bt.TemplateStore.open(store_dir, key_provider=keys, read_only=True) as reader, \
            pytest.raises(bt.ReadOnlyStore):
        reader.calibrate(WATCH, population.templates, population.subject_ids, target_fmr=0.1,
                         actor="calibrator")


# --- a real model (dlib), only where the faces extra and photos are available -----------

FACES = os.environ.get("BIOTEMPLATE_FACE_IMAGES", "")


@pytest.mark.slow
def test_a_real_model_gets_its_own_threshold(tmp_path: Path) -> None:
    """dlib embeddings computed here from photos (one sub-folder per person), never
    stored: the threshold for FMR 1e-3 lands far above the README's synthetic 0.55."""
    if importlib.util.find_spec("face_recognition") is None:
        pytest.skip("needs the faces extra: pip install 'biotemplate[faces]'")
    if not FACES or not Path(FACES).is_dir():
        pytest.skip("set BIOTEMPLATE_FACE_IMAGES to a folder of photos, a sub-folder a person")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "calibrate_threshold.py"),
                          "--images", FACES, "--target-fmr", "1e-3",
                          "--det", str(tmp_path / "det.png")],
                         capture_output=True, text=True, timeout=3600, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("1:1"))
    threshold = float(line.split("threshold for FMR <= 0.001: ")[1].split()[0])
    assert threshold > 0.8  # cosine on dlib-128: ~0.92, where 0.55-0.60 accept everyone
    assert (tmp_path / "det.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
