"""``evaluate`` and ``calibrate``: a threshold measured on your own model's templates.

``evaluate`` needs no store: from a labelled set (``--templates X.npy``, one row per
template, and ``--labels L.txt``, one label per line naming the person of that row) it
computes the threshold for a target false-match rate, the rates there, the EER and
optionally a DET plot and a score-distribution plot (PNG; the ``plot`` extra).
``calibrate`` proposes a threshold for one purpose of a store (``TemplateStore.calibrate``:
FMR over the set's pairs and/or FPIR over real, audited searches of the purpose's live
gallery) and, with ``--apply``, sets it (``set_policy``, audited). The numbers come from
``biotemplate.evaluation`` and ``biotemplate.calibration``; nothing is computed here.
"""

from __future__ import annotations

import argparse

from biotemplate import evaluation

from .common import (
    CliError,
    Reply,
    Subparsers,
    UsageError,
    add_actor,
    add_command,
    add_key_options,
    add_reason,
    add_store,
    jsonable,
    opened,
    read_array,
    read_text,
)


def register(subparsers: Subparsers) -> None:
    p = add_command(subparsers, "evaluate", handler=_evaluate,
                    help="threshold, FMR/FNMR, EER and DET from a labelled set (no store)")
    _set_options(p)
    p.add_argument("--target-fmr", type=_rate, default=1e-3, metavar="RATE",
                   help="the false-match rate to reach (default 1e-3)")
    p.add_argument("--plot", metavar="DET.png", help="write the DET curve as PNG")
    p.add_argument("--scores-plot", metavar="SCORES.png",
                   help="write the mated / non-mated score histograms as PNG")

    p = add_command(subparsers, "calibrate", handler=_calibrate,
                    help="propose (and with --apply set) a purpose's threshold from a "
                         "labelled set of this store's model")
    add_store(p)
    p.add_argument("--purpose", required=True, help="the purpose to calibrate")
    _set_options(p)
    p.add_argument("--target-fmr", type=_rate, metavar="RATE",
                   help="false-match rate over the set's non-mated pairs (1:1)")
    p.add_argument("--target-fpir", type=_rate, metavar="RATE",
                   help="false-positive identification rate over searches of the "
                        "purpose's gallery by the set's people (1:N; they must not be "
                        "enrolled for it)")
    p.add_argument("--apply", action="store_true",
                   help="set the proposed threshold in the policy (audited)")
    add_actor(p)
    add_reason(p, required=False)
    add_key_options(p)


def _set_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", required=True, metavar="X.npy",
                   help="the labelled templates, one row each (.npy, float)")
    p.add_argument("--labels", required=True, metavar="L.txt",
                   help="one label per line: the person of the template in that row")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a rate is a number such as 1e-3") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError("a rate is strictly between 0 and 1")
    return value


def _labels(path: str) -> list[str]:
    lines = read_text(path, "--labels", limit=64 << 20).splitlines()
    if any(not line.strip() for line in lines):
        raise CliError(f"--labels {path}: every line must hold a label (no empty lines)")
    return [line.strip() for line in lines]


def _evaluate(args: argparse.Namespace) -> Reply:
    templates = read_array(args.templates, "--templates")
    report = evaluation.evaluate(templates, _labels(args.labels), target_fmr=args.target_fmr)
    written = []
    if args.plot or args.scores_plot:
        from biotemplate import plots  # matplotlib only when a plot is asked for

        if args.plot:
            if report.det is None:
                raise CliError("no label appears twice: there is no mated pair to plot")
            written.append(str(plots.plot_det(report.det, args.plot,
                                              threshold=report.threshold.threshold)))
        if args.scores_plot:
            written.append(str(plots.plot_scores(report.mated, report.nonmated,
                                                 args.scores_plot,
                                                 threshold=report.threshold.threshold)))
    data = jsonable({"templates": report.templates, "subjects": report.subjects,
                     "threshold": report.threshold, "fmr": report.fmr, "fnmr": report.fnmr,
                     "eer": report.eer, "plots": written})
    text = report.summary() + "".join(f"\nwrote {p}" for p in written)
    return Reply(data, text)


def _calibrate(args: argparse.Namespace) -> Reply:
    if args.target_fmr is None and args.target_fpir is None:
        raise UsageError("give --target-fmr, --target-fpir or both")
    templates = read_array(args.templates, "--templates")
    labels = _labels(args.labels)
    with opened(args) as store:
        report = store.calibrate(args.purpose, templates, labels, target_fmr=args.target_fmr,
                                 target_fpir=args.target_fpir, actor=args.actor)
        receipt = None
        if args.apply:
            receipt = store.set_policy(report.apply_to(store.policy), actor=args.actor,
                                       reason=args.reason)
    data = jsonable({"report": report, "applied": receipt})
    text = report.summary()
    if receipt is not None:
        text += f"\napplied: the policy now uses it (audit entry {receipt.audit_seq})"
    return Reply(data, text)
