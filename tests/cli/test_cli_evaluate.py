"""``biotemplate evaluate`` and ``biotemplate calibrate`` as subprocesses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from clihelp import Site, run_cli

from biotemplate.synthetic import make_gallery

PNG = b"\x89PNG\r\n\x1a\n"


def labelled_set(folder: Path, seed: int) -> tuple[str, str]:
    people = make_gallery(40, 3, 64, seed=seed)
    np.save(folder / "set.npy", people.templates)
    (folder / "labels.txt").write_text("\n".join(people.subject_ids) + "\n")
    return str(folder / "set.npy"), str(folder / "labels.txt")


def test_evaluate_prints_a_threshold_and_writes_plots(tmp_path: Path) -> None:
    x, labels = labelled_set(tmp_path, 11)
    done = run_cli("evaluate", "--templates", x, "--labels", labels, "--target-fmr", "0.01",
                   "--json")
    assert done.code == 0
    out = done.json()
    assert out["threshold"]["target"] == 0.01 and out["fmr"]["value"] <= 0.01
    assert out["templates"] == 120 and out["subjects"] == 40
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib missing (the 'plot' extra): the plots are not drawn")
    done = run_cli("evaluate", "--templates", x, "--labels", labels, "--plot",
                   str(tmp_path / "det.png"), "--scores-plot", str(tmp_path / "s.png"))
    assert done.code == 0 and "threshold for FMR" in done.out
    for name in ("det.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_evaluate_refuses_bad_input(tmp_path: Path) -> None:
    x, labels = labelled_set(tmp_path, 12)
    assert run_cli("evaluate", "--templates", x, "--labels", labels,
                   "--target-fmr", "1.5").code == 2
    (tmp_path / "short.txt").write_text("a\nb\n")
    assert run_cli("evaluate", "--templates", x, "--labels",
                   str(tmp_path / "short.txt")).code == 1  # 120 rows, 2 labels
    assert run_cli("evaluate", "--templates", str(tmp_path / "none.npy"), "--labels",
                   labels).code == 1


def test_calibrate_proposes_then_applies_a_threshold(site: Site) -> None:
    x, labels = labelled_set(site.dir, 13)
    base = ["calibrate", str(site.store), "--purpose", "watchlist", "--templates", x,
            "--labels", labels, "--actor", "dpo", *site.key_args]
    assert run_cli(*base).code == 2  # no target
    done = run_cli(*base, "--target-fmr", "0.01", "--json")
    assert done.code == 0
    proposed = done.json()["report"]["threshold"]
    assert done.json()["applied"] is None
    done = run_cli(*base, "--target-fmr", "0.01", "--apply", "--reason", "calibrated")
    assert done.code == 0 and "applied" in done.out
    shown = run_cli("policy", "show", str(site.store), "--json", *site.key_args)
    assert abs(shown.json()["purposes"]["watchlist"]["match_threshold"] - proposed) < 1e-6
