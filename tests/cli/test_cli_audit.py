"""``audit verify|checkpoint|export`` (no master key, beside a running writer), and the
operations commands ``stats``, ``backup``, ``purge``, ``rotate-key`` and the three key
sources, each as a subprocess."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from pathlib import Path

from clihelp import Site, run_cli

import biotemplate as bt


def test_audit_without_the_key_beside_a_running_writer(site: Site) -> None:
    key = bt.FileKeyProvider(site.key)
    with bt.TemplateStore.open(site.store, key_provider=key) as running:
        res = running.search(site.gallery.templates[6], purpose="watchlist", actor="analyst",
                             reason="case 9")
        running.confirm_match(res.audit_seq, res.candidates[0].record_id, reviewer="officer-1")
        running.erase_subject("P-000008", actor="dpo", reason="Art. 17 #3")

        done = run_cli("audit", "verify", str(site.store), "--json")
        assert done.code == 0 and done.json()["ok"] is True
        cp = run_cli("audit", "checkpoint", str(site.store))
        assert cp.code == 0 and json.loads(cp.out)["v"] == 3
        (site.dir / "cp.json").write_text(cp.out)

        lines = run_cli("audit", "export", str(site.store)).out.splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        by_event = {r["event"]: r for r in records}
        search = by_event["search"]
        assert (search["actor"], search["purpose"], search["reason"]) == (
            "analyst", "watchlist", "case 9")
        assert search["result"]["count"] == 1 and search["result"]["decision"] is True
        assert len(search["input_digest"]) == 64 and search["record_ids"]
        assert "scores" not in search["result"] and "score" not in json.dumps(search)
        confirm = by_event["confirm"]
        assert confirm["ref_seq"] == search["seq"] and confirm["actor"] == "officer-1"
        erase = by_event["erase"]
        assert erase["subject_ref"] and erase["result"] == {"count": 2}
        for r in records:  # every line can be checked by the auditor
            assert len(r["hash"]) == 64 and len(r["signature"]) == 128
        assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))
        everything = "\n".join(lines)
        assert "P-0000" not in everything  # no subject id, ever

        part = run_cli("audit", "export", str(site.store), "--since", "2", "--until", "3")
        assert [json.loads(x)["seq"] for x in part.out.splitlines()] == [2, 3]
        assert run_cli("audit", "export", str(site.store), "--since", "5", "--until",
                       "2").code == 2
        assert running.stats().records == 21  # undisturbed

    ok = run_cli("audit", "verify", str(site.store), "--checkpoint", site.file("cp.json"))
    assert ok.code == 0 and "reaches checkpoint" in ok.out
    # an auditor with a copy of audit.db alone
    alone = run_cli("audit", "verify", str(site.store / "audit.db"), "--json")
    assert alone.json()["ok"] is True

    # a forged entry (the append-only triggers dropped, a byte changed)
    with sqlite3.connect(site.store / "audit.db") as conn:
        conn.execute("DROP TRIGGER entries_no_update")
        body = conn.execute("SELECT body FROM entries WHERE seq = 3").fetchone()[0]
        conn.execute("UPDATE entries SET body = ? WHERE seq = 3",
                     (body[:-1] + bytes([body[-1] ^ 1]),))
    bad = run_cli("audit", "verify", str(site.store))
    assert bad.code == 1 and "does not verify" in bad.err and "seq 3" in bad.out
    export = run_cli("audit", "export", str(site.store))
    assert export.code == 1 and "audit entry 3 failed verification" in export.err
    assert [json.loads(x)["seq"] for x in export.out.splitlines()] == [1, 2]  # before it
    assert run_cli("audit", "verify", site.file("nowhere")).code == 1
    assert run_cli("audit", "checkpoint", site.file("nowhere")).code == 1
    (site.dir / "junk.json").write_text("{not json")
    junk = run_cli("audit", "verify", str(site.store), "--checkpoint", site.file("junk.json"))
    assert junk.code == 1 and "malformed checkpoint" in junk.err


def test_stats_backup_purge(site: Site) -> None:
    k = site.key_args
    stats = run_cli("stats", str(site.store), *k, "--json").json()
    assert stats["records"] == 23 and stats["subjects"] == 10 and stats["dim"] == 64
    assert "records 23" in run_cli("stats", str(site.store), *k).out
    assert run_cli("stats", str(site.store), *k, "--quiet").out == ""

    dest = site.dir / "bk"
    done = run_cli("backup", str(site.store), str(dest), "--actor", "ops", *k, "--json")
    assert done.code == 0 and Path(done.json()["path"]) == dest
    assert (dest / "records.db").exists() and (dest / "audit.db").exists()
    again = run_cli("backup", str(site.store), str(dest), "--actor", "ops", *k)
    assert again.code == 1 and "StoreExists" in again.err

    purge = run_cli("purge", str(site.store), *k, "--json").json()
    assert purge["purged"] == 0 and purge["audit_seq"] > 0


def test_key_sources_and_rotation(site: Site, tmp_path: Path) -> None:
    text = site.key.read_text().strip()
    by_env = run_cli("stats", str(site.store), "--key-env", "BT_KEY", "--json",
                     env={"BT_KEY": text})
    assert by_env.code == 0 and by_env.json()["records"] == 23
    unset = run_cli("stats", str(site.store), "--key-env", "BT_UNSET_KEY")
    assert unset.code == 1 and "is not set" in unset.err
    both = run_cli("stats", str(site.store), "--key-file", str(site.key), "--key-env", "X")
    assert both.code == 2  # one source only

    loose = tmp_path / "loose.key"
    loose.write_text(text + "\n")
    os.chmod(loose, 0o644)
    refused = run_cli("stats", str(site.store), "--key-file", str(loose))
    assert refused.code == 1 and "chmod 600" in refused.err

    new = tmp_path / "new.key"
    assert run_cli("keygen", str(new)).code == 0
    done = run_cli("rotate-key", str(site.store), "--new-key-file", str(new), "--actor", "ops",
                   *site.key_args, "--json")
    assert done.code == 0 and len(done.json()["master_key_id"]) == 32
    old = run_cli("stats", str(site.store), *site.key_args)
    assert old.code == 1 and "KeyUnavailable" in old.err
    assert run_cli("stats", str(site.store), "--key-file", str(new)).code == 0


def test_passphrase_file(tmp_path: Path) -> None:
    from clihelp import POLICY_TOML
    (tmp_path / "policy.toml").write_text(POLICY_TOML)
    phrase = tmp_path / "phrase.txt"
    phrase.write_text("correct horse battery staple\n")
    os.chmod(phrase, 0o600)
    salt = tmp_path / "salt"
    args = ["--passphrase-file", str(phrase), "--salt-file", str(salt)]
    done = run_cli("init", str(tmp_path / "s"), "--dim", "8", "--model", "m", "--policy",
                   str(tmp_path / "policy.toml"), *args)
    assert done.code == 0, done.err
    assert salt.exists()
    assert run_cli("stats", str(tmp_path / "s"), *args, "--json").json()["records"] == 0
    no_salt = run_cli("stats", str(tmp_path / "s"), "--passphrase-file", str(phrase))
    assert no_salt.code == 2 and "--salt-file" in no_salt.err
    phrase.write_text("another passphrase\n")
    wrong = run_cli("stats", str(tmp_path / "s"), *args)
    assert wrong.code == 1 and "KeyUnavailable" in wrong.err
    assert "another" not in wrong.err  # the passphrase is never echoed
