"""Choose a threshold for your own face model: measure it, calibrate a purpose, plot it.

Who it is for: developers who bring their own face model and must set a purpose's
threshold from their own labelled templates (``biotemplate evaluate`` / ``calibrate`` do
the same from a shell).

A threshold belongs to a model. The README's 0.55-0.60 suit its synthetic templates; with
dlib's 128-d embeddings they accept every stranger. This script does what a developer
with a labelled set of their model's templates does once per model:

1. scores every pair of the set (1:1) and picks the lowest threshold for a target
   false-match rate (FMR), with the equal error rate for reference;
2. calibrates a store's purpose on it: FMR over the pairs, and FPIR over real, audited
   1:N searches of the people not enrolled, then applies the proposal with set_policy;
3. measures open-set identification (FPIR/FNIR) before and after, through the store;
4. with --det, draws the DET curve and the score histograms (the ``plot`` extra).

Run as it is: synthetic face-like templates (no download, no faces). With the ``faces``
extra (``pip install 'biotemplate[faces]'``, then ``pip install --no-deps
face_recognition``) and a folder of photos, one sub-folder per person, it computes dlib
embeddings in memory instead:

    python examples/calibrate_threshold.py --images photos/ --target-fmr 1e-3 --det det.png

Nothing is written but the plots (and a temporary store, deleted at the end); names of
people (the sub-folders) are never printed.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

import biotemplate as bt
from biotemplate import evaluation as ev
from biotemplate.synthetic import make_gallery


def synthetic(people: int, samples: int, dim: int, genuine: float, seed: int,
              ) -> tuple[np.ndarray, list[str]]:
    """Face-like templates: several captures of each synthetic person."""
    g = make_gallery(people, samples, dim, genuine=genuine, seed=seed)
    return g.templates, g.subject_ids


def dlib_embeddings(folder: Path) -> tuple[np.ndarray, list[str]]:
    """128-d dlib embeddings of every photo holding exactly one face, labelled by folder."""
    import face_recognition  # the faces extra

    templates, labels = [], []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        for image in sorted(person.iterdir()):
            if image.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
                continue
            found = face_recognition.face_encodings(face_recognition.load_image_file(image))
            if len(found) == 1:
                templates.append(found[0])
                labels.append(person.name)
    return np.asarray(templates, dtype=np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, help="one sub-folder of photos per person "
                    "(needs the faces extra); default: synthetic templates")
    ap.add_argument("--target-fmr", type=float, default=1e-3)
    ap.add_argument("--target-fpir", type=float, default=1e-2)
    ap.add_argument("--det", type=Path, help="write the DET plot here (PNG; plot extra)")
    ap.add_argument("--scores", type=Path, help="write the score histograms here (PNG)")
    args = ap.parse_args()

    # --- 1. the model's own labelled templates: 1:1 rates ------------------------------
    if args.images:
        templates, labels = dlib_embeddings(args.images)
        model = "dlib-128"
    else:
        templates, labels = synthetic(300, 4, 512, genuine=0.7, seed=21)  # as the demo's
        model = "synthetic-512"
    people = sorted(set(labels))
    print(f"{len(templates)} templates of {len(people)} people, model {model}")
    mated, nonmated = ev.verification_scores(templates, labels)
    chosen = ev.threshold_for(nonmated, args.target_fmr)
    curve = ev.det(mated, nonmated)
    fmr, fnmr = curve.at(chosen.threshold)
    print(f"1:1  threshold for FMR <= {args.target_fmr:g}: {chosen.threshold:.4f} "
          f"(FMR {fmr:.2g}, FNMR {fnmr:.3f}; {chosen.scores} impostor pairs)")
    if chosen.warning:
        print(f"     warning: {chosen.warning}")
    at_readme = curve.at(0.55)
    print(f"     at the README's 0.55: FMR {at_readme[0]:.3f}, FNMR {at_readme[1]:.3f}; "
          f"EER {ev.eer(mated, nonmated).rate:.4f}")

    # --- 2. calibrate a purpose of a store ----------------------------------------------
    half = set(people[: len(people) // 2])  # enrolled; the other half are strangers
    first = {}
    for i, label in enumerate(labels):
        first.setdefault(label, i)
    gallery = [first[p] for p in sorted(half)]
    strangers = [i for i, label in enumerate(labels) if label not in half]
    mated_probes = [i for i, label in enumerate(labels) if label in half and i != first[label]]
    policy = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {"watchlist": {
        "max_retention": "30d", "modes": ["identification", "investigation"],
        "match_threshold": 0.55, "max_candidates": 20}}})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = bt.FileKeyProvider.generate(work / "master.key")
        now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
        with bt.TemplateStore.create(work / "store", dim=templates.shape[1], model=model,
                                     policy=policy, key_provider=keys,
                                     clock=lambda: now) as store:
            store.enroll_many(templates[gallery], subject_ids=[labels[i] for i in gallery],
                              purposes=["watchlist"], ttl=timedelta(days=30), actor="enrol")
            report = store.calibrate("watchlist", templates[strangers],
                                     [labels[i] for i in strangers],
                                     target_fmr=args.target_fmr,
                                     target_fpir=args.target_fpir, actor="calibration")
            fpir = report.fpir  # measured, since target_fpir was given
            assert fpir is not None
            print(f"1:N  calibrate: threshold {report.threshold:.4f} "
                  f"(was {report.current_threshold}); FPIR {fpir.value:.3f} "
                  f"over {report.searches} searches of N={report.gallery}, "
                  f"95% CI [{fpir.low:.3f}, {fpir.high:.3f}]")
            for warning in report.warnings:
                print(f"     warning: {warning}")

            # --- 3. identification before and after ---------------------------------------
            probe_rows = mated_probes + strangers
            mates = [labels[i] if i in set(mated_probes) else None for i in probe_rows]
            rates = ev.identification_rates(store, "watchlist", templates[probe_rows], mates,
                                            [0.55, report.threshold], actor="evaluation")
            for t, fpir, fnir in zip(rates.thresholds, rates.fpir, rates.fnir, strict=True):
                print(f"     at {t:.4f}: FPIR {fpir:.3f}, FNIR {fnir:.3f}")
            store.set_policy(report.apply_to(store.policy), actor="dpo",
                             reason=f"calibrated on {report.templates} templates")
            print(f"     applied: watchlist threshold is now "
                  f"{store.policy.purpose('watchlist').match_threshold:.4f}")

    # --- 4. plots -----------------------------------------------------------------------
    if args.det or args.scores:
        from biotemplate import plots

        if args.det:
            curves = {model: curve}
            if not args.images:  # the demo data is easy; show a harder capture beside it
                curves = {"synthetic demo data (genuine ~0.7)": curve}
                hard_t, hard_l = synthetic(300, 4, 512, genuine=0.25, seed=22)
                curves["same model, poor capture (genuine ~0.25)"] = ev.det(
                    *ev.verification_scores(hard_t, hard_l))
            plots.plot_det(curves, args.det, threshold=chosen.threshold)
            print(f"wrote {args.det}")
        if args.scores:
            plots.plot_scores(mated, nonmated, args.scores, threshold=chosen.threshold)
            print(f"wrote {args.scores}")


if __name__ == "__main__":
    main()
