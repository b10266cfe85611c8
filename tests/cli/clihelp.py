"""Helpers of the command-line suites (not a test module: pytest imports it from this
folder as ``clihelp``): run ``biotemplate`` as a subprocess, and build a site (a folder
with a store, its key file and input files) in-process to keep it fast.

Every run is checked for the promise every command makes: no traceback on stderr, and an
error is one line. Subprocesses import numpy, hnswlib and the crypto libraries (~0.4 s
each), so each test groups several commands on one site.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

import biotemplate as bt
from biotemplate.synthetic import Gallery, make_gallery, probes, strangers

ROOT = Path(__file__).resolve().parents[2]
DIM = 64
MODEL = "cli-test-v1"
POLICY_TOML = """\
epoch = "1d"

[purposes.border-verification]
max_retention = "12h"
default_retention = "12h"
modes = ["verification"]
match_threshold = 0.6

[purposes.watchlist]
max_retention = "3y"
modes = ["identification", "investigation"]
match_threshold = 0.55
max_candidates = 20
allowed_sources = ["enrolment-desk", "case-file"]

[purposes.rare]
max_retention = "30d"
default_retention = "7d"
modes = ["identification", "investigation", "verification"]
match_threshold = 0.55
"""


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            ) -> Done:
    """``python -m biotemplate.cli ARGS`` with this checkout first on the path."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", "biotemplate.cli", *args],
                          capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=180, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode != 0:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line
        assert done.stderr.startswith("biotemplate"), done.stderr
    return Done(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class Site:
    """A store of 10 identities x 2 samples (watchlist) plus 3 on "rare", with files."""

    dir: Path
    store: Path
    key: Path
    gallery: Gallery

    @property
    def key_args(self) -> list[str]:
        return ["--key-file", str(self.key)]

    def file(self, name: str) -> str:
        return str(self.dir / name)


def write_inputs(folder: Path, gallery: Gallery) -> None:
    (folder / "policy.toml").write_text(POLICY_TOML)
    np.save(folder / "gallery.npy", gallery.templates)
    (folder / "ids.txt").write_text("\n".join(gallery.subject_ids) + "\n")
    np.save(folder / "probe.npy", probes(gallery, [3], seed=9)[0])
    np.save(folder / "probes.npy", probes(gallery, [3, 5], seed=9))
    np.save(folder / "stranger.npy", strangers(1, DIM)[0])


def make_site(folder: Path) -> Site:
    gallery = make_gallery(10, 2, DIM, seed=4)
    write_inputs(folder, gallery)
    key = bt.FileKeyProvider.generate(folder / "master.key")
    policy = bt.RetentionPolicy.from_toml(folder / "policy.toml")
    store_dir = folder / "faces"
    with bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                 key_provider=key) as store:
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                          purposes=["watchlist"], ttl=timedelta(days=400),
                          source="case-file-1", actor="svc-enrol")
        store.enroll_many(gallery.templates[:6:2], subject_ids=gallery.subject_ids[:6:2],
                          purposes=["rare"], ttl=timedelta(days=20), actor="svc-enrol")
    return Site(folder, store_dir, folder / "master.key", gallery)
