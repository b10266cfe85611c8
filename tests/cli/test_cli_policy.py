"""``policy show|check|diff|apply`` and ``report retention`` as subprocesses: a tighter
policy shortens stored records (diff shows how many, apply does it), a looser one never
extends them, and the report reads a store that a running writer holds."""

from __future__ import annotations

import tomllib
from pathlib import Path

from clihelp import POLICY_TOML, Site, run_cli

import biotemplate as bt


def test_policy_show_and_check(site: Site) -> None:
    shown = run_cli("policy", "show", str(site.store), *site.key_args)
    assert shown.code == 0
    in_force = bt.RetentionPolicy.from_toml(site.file("policy.toml"))
    assert bt.RetentionPolicy.from_dict(tomllib.loads(shown.out)) == in_force
    as_json = run_cli("policy", "show", str(site.store), *site.key_args, "--json").json()
    assert bt.RetentionPolicy.from_dict(as_json) == in_force

    done = run_cli("policy", "check", site.file("policy.toml"), "--json")
    assert done.code == 0 and done.json()["valid"] is True
    (site.dir / "typo.toml").write_text(POLICY_TOML.replace("match_threshold = 0.6",
                                                            "match_treshold = 0.6"))
    bad = run_cli("policy", "check", site.file("typo.toml"))
    assert bad.code == 1 and "InvalidPolicy" in bad.err and "did you mean" in bad.err
    assert "typo.toml" in bad.err  # the file is named
    missing = run_cli("policy", "check", site.file("nope.toml"))
    assert missing.code == 1 and "cannot read policy file" in missing.err


def _write(site: Site, name: str, old: str, new: str) -> str:
    path = site.dir / name
    path.write_text(POLICY_TOML.replace(old, new))
    return str(path)


def test_tighter_policy_diff_apply_then_looser(site: Site) -> None:
    k = site.key_args
    tighter = _write(site, "tighter.toml", 'max_retention = "3y"', 'max_retention = "90d"')
    diff = run_cli("policy", "diff", str(site.store), tighter, *k, "--json").json()
    assert diff["records_shortened"] == 20 and diff["records_expired"] == 0
    (change,) = diff["changes"]
    assert change == {"purpose": "watchlist", "status": "changed", "tightened": True,
                      "records": 20, "shortened": 20,
                      "fields": {"max_retention": ["3y", "90d"]}}
    text = run_cli("policy", "diff", str(site.store), tighter, *k).out
    assert "max_retention: 3y -> 90d" in text and "20 of its 20 stored record(s)" in text
    same = run_cli("policy", "diff", str(site.store), site.file("policy.toml"), *k)
    assert "no change" in same.out

    before = run_cli("report", "retention", str(site.store), *k, "--json").json()
    done = run_cli("policy", "apply", str(site.store), tighter, "--actor", "dpo", "--reason",
                   "DPIA 4", *k, "--json")
    receipt = done.json()
    assert done.code == 0 and receipt["records_shortened"] == 20
    assert receipt["records_expired"] == 0 and receipt["audit_seq"] > 0
    after = run_cli("report", "retention", str(site.store), *k, "--json").json()
    watch = {p["purpose"]: p for p in after["purposes"]}["watchlist"]
    assert watch["max_retention"] == "90d" and watch["live"] == 20
    assert watch["latest_expiry"] < {p["purpose"]: p for p in before["purposes"]}[
        "watchlist"]["latest_expiry"]
    assert watch["beyond_limit"] == 0

    # looser again: nothing is extended
    done = run_cli("policy", "apply", str(site.store), site.file("policy.toml"), "--actor",
                   "dpo", *k, "--json")
    assert done.json()["records_shortened"] == 0
    again = run_cli("report", "retention", str(site.store), *k, "--json").json()
    assert {p["purpose"]: p for p in again["purposes"]}["watchlist"]["latest_expiry"] == \
        watch["latest_expiry"]

    # removing a purpose expires its records at once (the next purge shreds them)
    gone = _write(site, "no-rare.toml", '[purposes.rare]\nmax_retention = "30d"\n'
                  'default_retention = "7d"\nmodes = ["identification", "investigation", '
                  '"verification"]\nmatch_threshold = 0.55\n', "")
    assert "rare" not in tomllib.loads(Path(gone).read_text())["purposes"]
    done = run_cli("policy", "apply", str(site.store), gone, "--actor", "dpo", *k, "--json")
    assert done.json()["records_shortened"] == 3 and done.json()["records_expired"] == 3
    purge = run_cli("purge", str(site.store), *k, "--json").json()
    assert purge["purged"] == 3

    epoch = _write(site, "epoch.toml", 'epoch = "1d"', 'epoch = "2d"')
    refused = run_cli("policy", "apply", str(site.store), epoch, "--actor", "dpo", *k)
    assert refused.code == 1 and "epoch" in refused.err


def test_retention_report_beside_a_running_writer(site: Site) -> None:
    key = bt.FileKeyProvider(site.key)
    with bt.TemplateStore.open(site.store, key_provider=key) as running:
        done = run_cli("report", "retention", str(site.store), *site.key_args, "--json")
        assert done.code == 0, done.err
        report = done.json()
        assert report["records"] == 23 and report["purge_removes"] == 0
        rare = {p["purpose"]: p for p in report["purposes"]}["rare"]
        assert (rare["live"], rare["expiring_30d"], rare["expiring_7d"]) == (3, 3, 0)
        later = run_cli("report", "retention", str(site.store), "--at",
                        "2999-01-01T00:00:00+00:00", *site.key_args, "--json").json()
        assert later["purge_removes"] == 23
        text = run_cli("report", "retention", str(site.store), *site.key_args).out
        assert "watchlist" in text and "oldest expiry" in text
        assert run_cli("stats", str(site.store), *site.key_args, "--json").json()[
            "records"] == 23
        # a writing command is refused while the service holds the store
        busy = run_cli("purge", str(site.store), *site.key_args)
        assert busy.code == 1 and "StoreLocked" in busy.err
        assert running.stats().records == 23  # undisturbed
        bad_time = run_cli("report", "retention", str(site.store), "--at", "tomorrow",
                           *site.key_args)
        assert bad_time.code == 2
