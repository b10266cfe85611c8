"""``biotemplate`` commands on records, each run as a subprocess against a real store:
keygen, init, enroll, search, verify, export, erase, delete, hold place|release."""

from __future__ import annotations

import base64
import stat
import tomllib
from pathlib import Path

import numpy as np
from clihelp import DIM, ROOT, Site, run_cli, write_inputs

from biotemplate.synthetic import make_gallery


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["biotemplate"] == "biotemplate.cli:main"


def test_keygen_init_enroll_search_verify(tmp_path: Path) -> None:
    gallery = make_gallery(8, 2, DIM, seed=7)
    write_inputs(tmp_path, gallery)
    key, store = str(tmp_path / "k.key"), str(tmp_path / "faces")
    k = ["--key-file", key]

    done = run_cli("keygen", key, "--json")
    assert done.code == 0 and done.json() == {"key_file": key}
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    again = run_cli("keygen", key)  # never overwritten
    assert again.code == 1 and "KeyFileExists" in again.err

    done = run_cli("init", store, "--dim", str(DIM), "--model", "m-v1", "--policy",
                   str(tmp_path / "policy.toml"), *k, "--json")
    assert done.code == 0, done.err
    assert done.json()["purposes"] == ["border-verification", "rare", "watchlist"]
    assert len(done.json()["audit_public_key"]) == 64
    assert run_cli("init", store, "--dim", str(DIM), "--model", "m-v1", "--policy",
                   str(tmp_path / "policy.toml"), *k).code == 1  # StoreExists

    done = run_cli("enroll", store, "--templates", str(tmp_path / "gallery.npy"),
                   "--subject-ids", str(tmp_path / "ids.txt"), "--purpose", "watchlist",
                   "--purpose", "rare", "--ttl", "20d", "--source", "case-file-2",
                   "--actor", "svc", *k, "--json")
    assert done.code == 0, done.err
    assert done.json()["records"] == 16 and len(done.json()["record_ids"]) == 16
    assert done.err == ""  # no progress bar when stderr is not a terminal

    done = run_cli("search", store, "--probe", str(tmp_path / "probe.npy"), "--purpose",
                   "watchlist", "--actor", "analyst", "--reason", "case 1", *k, "--json")
    (res,) = done.json()["results"]
    assert res["decision"] is True and res["candidates"][0]["subject_id"] == "P-000003"
    assert res["mode"] == "identification" and res["audit_seq"] > 0

    text = run_cli("search", store, "--probe", str(tmp_path / "stranger.npy"), "--purpose",
                   "watchlist", "--actor", "analyst", *k)
    assert text.code == 0 and "decision no, 0 candidate(s)" in text.out  # open set

    done = run_cli("search", store, "--probe", str(tmp_path / "probes.npy"), "--purpose",
                   "watchlist", "--mode", "investigation", "--k", "3", "--actor", "analyst",
                   *k, "--json")
    results = done.json()["results"]
    assert len(results) == 2 and all(len(r["candidates"]) == 3 for r in results)
    assert [c["above_threshold"] for c in results[1]["candidates"]] == [True, False, False]

    done = run_cli("verify", store, "--probe", str(tmp_path / "probe.npy"), "--subject-id",
                   "P-000003", "--purpose", "rare", "--actor", "door-3", *k, "--json")
    assert done.code == 0 and done.json()["match"] is True
    assert "match: score" in run_cli("verify", store, "--probe", str(tmp_path / "probe.npy"),
                                     "--subject-id", "P-000003", "--purpose", "rare",
                                     "--actor", "door-3", *k).out
    # refused: the purpose allows no verification; not found: no such subject
    refused = run_cli("verify", store, "--probe", str(tmp_path / "probe.npy"), "--subject-id",
                      "P-000003", "--purpose", "watchlist", "--actor", "door-3", *k)
    assert refused.code == 1 and "PolicyViolation" in refused.err
    missing = run_cli("verify", store, "--probe", str(tmp_path / "probe.npy"), "--subject-id",
                      "Nobody-42", "--purpose", "rare", "--actor", "door-3", *k, "--json")
    assert missing.code == 1 and "RecordNotFound" in missing.err
    assert "Nobody-42" not in missing.err + missing.out  # errors never echo a subject id
    assert missing.json()["error"]["type"] == "RecordNotFound"


def test_enroll_refusals(site: Site) -> None:
    common = [str(site.store), "--subject-ids", site.file("ids.txt"), "--actor", "svc",
              *site.key_args]
    # a source the purpose does not allow: refused by the policy, nothing written
    done = run_cli("enroll", *common, "--templates", site.file("gallery.npy"), "--purpose",
                   "watchlist", "--ttl", "1d", "--source", "internet")
    assert done.code == 1 and "PolicyViolation" in done.err
    # a ttl over the purpose's limit
    done = run_cli("enroll", *common, "--templates", site.file("gallery.npy"), "--purpose",
                   "rare", "--ttl", "60d")
    assert done.code == 1 and "exceeds max_retention" in done.err
    # a malformed duration is bad usage
    done = run_cli("enroll", *common, "--templates", site.file("gallery.npy"), "--purpose",
                   "rare", "--ttl", "30 days")
    assert done.code == 2 and "invalid duration" in done.err
    # the ids do not match the rows; a template file that is not one; one template
    done = run_cli("enroll", *common, "--templates", site.file("probes.npy"), "--purpose",
                   "rare")
    assert done.code == 1 and "20 subject ids for 2 templates" in done.err
    done = run_cli("enroll", *common, "--templates", site.file("ids.txt"), "--purpose", "rare")
    assert done.code == 1 and "not a .npy array" in done.err
    done = run_cli("enroll", *common, "--templates", site.file("probe.npy"), "--purpose", "rare")
    assert done.code == 1 and "one template per row" in done.err
    # a blank line in the id file: named by its number, never by content
    (site.dir / "bad-ids.txt").write_text("P-1\n\nP-3\n")
    done = run_cli("enroll", str(site.store), "--subject-ids", site.file("bad-ids.txt"),
                   "--templates", site.file("gallery.npy"), "--purpose", "rare",
                   "--actor", "svc", *site.key_args)
    assert done.code == 1 and "line 2 is not a valid subject id" in done.err


def test_export_as_json_and_npy(site: Site) -> None:
    args = ["export", str(site.store), "P-000001", "--actor", "dpo", "--reason", "Art. 15 #9",
            *site.key_args]
    done = run_cli(*args)  # the JSON is the answer, in either mode
    doc = done.json()
    assert done.code == 0 and doc["subject_id"] == "P-000001" and doc["dim"] == DIM
    assert len(doc["records"]) == 3  # 2 watchlist + 1 rare
    stored = {tuple(np.round(t, 5)) for t in site.gallery.templates[2:4]}
    for rec in doc["records"]:
        vec = np.frombuffer(base64.b64decode(rec["template_base64"]), dtype="<f4")
        assert tuple(np.round(vec, 5)) in stored
        assert rec["expires_at"] > rec["created_at"]

    out = site.dir / "p1.npy"
    done = run_cli(*args, "--out", str(out), "--json")
    assert [r["template_row"] for r in done.json()["records"]] == [0, 1, 2]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds templates
    assert np.load(out).shape == (3, DIM)
    again = run_cli(*args, "--out", str(out))
    assert again.code == 1 and "never overwrites" in again.err
    assert run_cli(*args, "--out", str(site.dir / "q.npy"), "--quiet").out == ""

    nobody = run_cli("export", str(site.store), "Nobody", "--actor", "dpo", "--reason", "r",
                     *site.key_args)
    assert nobody.code == 0 and nobody.json()["records"] == []  # a valid answer
    assert run_cli("export", str(site.store), "P-000001", "--actor", "dpo",
                   *site.key_args).code == 2  # --reason is required


def test_hold_erase_delete(site: Site) -> None:
    k = site.key_args
    done = run_cli("hold", "place", str(site.store), "P-000004", "--actor", "legal",
                   "--reason", "case 7", *k, "--json")
    assert done.code == 0 and done.json()["records"] == 2 and done.json()["active"] is True
    refused = run_cli("erase", str(site.store), "P-000004", "--actor", "dpo", "--reason",
                      "req 1", *k)
    assert refused.code == 1 and "legal hold" in refused.err and "P-000004" not in refused.err
    assert run_cli("hold", "release", str(site.store), "P-000004", "--actor", "legal",
                   "--reason", "closed", *k).code == 0
    again = run_cli("hold", "release", str(site.store), "P-000004", "--actor", "legal",
                    "--reason", "closed", *k)
    assert again.code == 1 and "not under legal hold" in again.err
    nothing = run_cli("hold", "place", str(site.store), "Nobody", "--actor", "legal",
                      "--reason", "x", *k)
    assert nothing.code == 1 and "RecordNotFound" in nothing.err

    done = run_cli("erase", str(site.store), "P-000004", "--actor", "dpo", "--reason",
                   "req 1", *k, "--json")
    receipt = done.json()
    assert receipt["records_erased"] == 2 and receipt["key_destroyed"] is True
    assert len(receipt["subject_ref"]) == 64 and receipt["audit_seq"] > 0
    assert run_cli("erase", str(site.store), "P-000004", "--actor", "dpo", "--reason",
                   "req 1", *k, "--json").json()["records_erased"] == 0  # idempotent

    rid = run_cli("export", str(site.store), "P-000006", "--actor", "dpo", "--reason", "r",
                  *k).json()["records"][0]["record_id"]
    done = run_cli("delete", str(site.store), rid, "--actor", "dpo", "--reason", "dup", *k,
                   "--json")
    assert done.code == 0 and done.json()["record_id"] == rid
    gone = run_cli("delete", str(site.store), rid, "--actor", "dpo", "--reason", "dup", *k)
    assert gone.code == 1 and "RecordNotFound" in gone.err
    bad = run_cli("erase", str(site.store), "x" * 300, "--actor", "dpo", "--reason", "r", *k)
    assert bad.code == 2 and "x" * 20 not in bad.err  # a bad id is not echoed either
