"""The command line against a store on PostgreSQL: the location is the URL, nothing else
changes (the CLI is a thin layer over the same API)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "cli"))  # clihelp, the CLI suites' helper

from clihelp import run_cli, write_inputs

from biotemplate.synthetic import make_gallery


def test_the_main_commands_on_a_url(pg_url: str, tmp_path: Path) -> None:
    gallery = make_gallery(10, 2, 64, seed=5)
    write_inputs(tmp_path, gallery)
    key = ["--key-file", str(tmp_path / "k.key")]
    assert run_cli("keygen", str(tmp_path / "k.key")).code == 0
    done = run_cli("init", pg_url, "--dim", "64", "--model", "m", "--policy",
                   str(tmp_path / "policy.toml"), *key)
    assert done.code == 0 and "password" not in done.out
    assert run_cli("enroll", pg_url, "--templates", str(tmp_path / "gallery.npy"),
                   "--subject-ids", str(tmp_path / "ids.txt"), "--purpose", "watchlist",
                   "--ttl", "30d", "--source", "case-file", "--actor", "a", "--quiet",
                   *key).code == 0
    found = run_cli("search", pg_url, "--probe", str(tmp_path / "probe.npy"), "--purpose",
                    "watchlist", "--actor", "a", "--reason", "r", "--json", *key)
    assert found.code == 0
    assert found.json()["results"][0]["candidates"][0]["subject_id"] == "P-000003"
    assert run_cli("audit", "verify", pg_url).code == 0  # no master key
    report = run_cli("report", "retention", pg_url, "--json", *key)
    assert report.code == 0
    refused = run_cli("backup", pg_url, str(tmp_path / "bk"), "--actor", "a", *key)
    assert refused.code == 1 and "pg_dump" in refused.err
    assert not (tmp_path / "bk").exists()
