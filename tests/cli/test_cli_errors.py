"""Every command's failure modes: bad usage exits 2, a wrong key, a missing store and a
refused call exit 1, always with one line on stderr and never a traceback.

The whole matrix runs in-process through ``biotemplate.cli.main`` (the code a subprocess
runs, without its ~0.4 s start-up), a sample of it as subprocesses, and the whole matrix
as subprocesses under the ``slow`` marker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clihelp import Site, make_site, run_cli

import biotemplate as bt
from biotemplate.cli import keys as cli_keys
from biotemplate.cli import main

STORE_COMMANDS = ("stats", "backup", "purge", "rotate-key", "enroll", "search", "verify",
                  "export", "erase", "delete", "hold place", "hold release", "policy show",
                  "policy diff", "policy apply", "report retention")


def argv(site: Site, name: str, store: str) -> list[str]:
    """A well-formed invocation of a command that opens ``store`` (key options apart)."""
    f = site.file
    return {
        "stats": ["stats", store],
        "backup": ["backup", store, f("bk-new"), "--actor", "ops"],
        "purge": ["purge", store],
        "rotate-key": ["rotate-key", store, "--new-key-file", f("next.key"), "--actor", "ops"],
        "enroll": ["enroll", store, "--templates", f("gallery.npy"), "--subject-ids",
                   f("ids.txt"), "--purpose", "rare", "--ttl", "1d", "--actor", "svc"],
        "search": ["search", store, "--probe", f("probe.npy"), "--purpose", "watchlist",
                   "--actor", "a"],
        "verify": ["verify", store, "--probe", f("probe.npy"), "--subject-id", "P-000001",
                   "--purpose", "rare", "--actor", "a"],
        "export": ["export", store, "P-000001", "--actor", "dpo", "--reason", "r"],
        "erase": ["erase", store, "P-000001", "--actor", "dpo", "--reason", "r"],
        "delete": ["delete", store, "0" * 32, "--actor", "dpo", "--reason", "r"],
        "hold place": ["hold", "place", store, "P-000001", "--actor", "l", "--reason", "r"],
        "hold release": ["hold", "release", store, "P-000001", "--actor", "l", "--reason", "r"],
        "policy show": ["policy", "show", store],
        "policy diff": ["policy", "diff", store, f("policy.toml")],
        "policy apply": ["policy", "apply", store, f("policy.toml"), "--actor", "dpo"],
        "report retention": ["report", "retention", store],
    }[name]


def cases(site: Site) -> list[tuple[str, list[str], int, str]]:
    """(label, argv, exit code, what stderr names) for every command."""
    wrong = bt.FileKeyProvider.generate(site.dir / "wrong.key").path
    bt.FileKeyProvider.generate(site.dir / "next.key")
    right, other = ["--key-file", str(site.key)], ["--key-file", str(wrong)]
    store, nowhere = str(site.store), site.file("nowhere")
    out = []
    for name in STORE_COMMANDS:
        out += [(f"{name}: bad usage", [*argv(site, name, store), *right, "--bogus"], 2,
                 "unrecognized arguments"),
                (f"{name}: no key", argv(site, name, store), 2, "is required"),
                (f"{name}: wrong key", [*argv(site, name, store), *other], 1,
                 "KeyUnavailable"),
                (f"{name}: missing store", [*argv(site, name, nowhere), *right], 1,
                 "StoreNotFound")]
    f = site.file
    out += [
        ("keygen: bad usage", ["keygen"], 2, "required"),
        ("keygen: exists", ["keygen", str(site.key)], 1, "KeyFileExists"),
        ("init: bad usage", ["init", f("s2"), "--dim", "x", "--model", "m", "--policy",
                             f("policy.toml"), *right], 2, "invalid int value"),
        ("init: exists", ["init", store, "--dim", "64", "--model", "m", "--policy",
                          f("policy.toml"), *right], 1, "StoreExists"),
        ("init: bad dim", ["init", f("s3"), "--dim", "0", "--model", "m", "--policy",
                           f("policy.toml"), *right], 1, "InvalidInput"),
        ("init: no policy file", ["init", f("s4"), "--dim", "8", "--model", "m", "--policy",
                                  f("none.toml"), *right], 1, "InvalidPolicy"),
        ("policy check: bad usage", ["policy", "check"], 2, "required"),
        ("policy check: missing", ["policy", "check", f("none.toml")], 1, "InvalidPolicy"),
        ("policy: no sub-command", ["policy"], 2, "required"),
        ("no command", [], 2, "required"),
        ("unknown command", ["frobnicate"], 2, "invalid choice"),
        ("audit verify: missing", ["audit", "verify", f("nowhere")], 1, "StoreNotFound"),
        ("audit checkpoint: missing", ["audit", "checkpoint", f("nowhere")], 1,
         "StoreNotFound"),
        ("audit export: missing", ["audit", "export", f("nowhere")], 1, "StoreNotFound"),
        ("audit export: bad usage", ["audit", "export", store, "--since", "x"], 2,
         "sequence number"),
        ("search: refused mode", [*argv(site, "search", store), "--mode", "investigation",
                                  "--purpose", "border-verification", *right], 1,
         "PolicyViolation"),
        ("search: bad k", [*argv(site, "search", store), "--k", "0", *right], 1,
         "InvalidInput"),
        ("search: wrong dim", [*argv(site, "search", store), "--probe", f("short.npy"),
                               *right], 1, "InvalidTemplate"),
        ("search: probe missing", [*argv(site, "search", store), "--probe", f("none.npy"),
                                   *right], 1, "cannot read it"),
        ("search: blank actor", [*argv(site, "search", store), "--actor", " ", *right], 1,
         "InvalidInput"),
        ("enroll: unknown purpose", [*argv(site, "enroll", store), "--purpose", "nope",
                                     *right], 1, "unknown purpose"),
        ("salt without passphrase", [*argv(site, "stats", store), *right, "--salt-file",
                                     f("salt")], 2, "--salt-file goes with"),
    ]
    return out


@pytest.fixture
def matrix_site(tmp_path: Path) -> Site:
    import numpy as np
    site = make_site(tmp_path)
    np.save(tmp_path / "short.npy", np.ones(3, dtype=np.float32))
    return site


def test_every_failure_in_process(matrix_site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    for label, args, code, names in cases(matrix_site):
        got = main(args)
        _out, err = capsys.readouterr()
        assert got == code, f"{label}: exit {got}, stderr {err!r}"
        assert "Traceback" not in err, label
        assert len(err.strip().splitlines()) == 1, f"{label}: {err!r}"
        assert names in err, f"{label}: {err!r}"
        assert "P-000001" not in err, label  # a subject id is never echoed


def test_json_errors_and_unexpected_ones(site: Site, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--json", "stats", site.file("nowhere"), "--key-file", str(site.key)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["type"] == "StoreNotFound"

    def boom(args: object) -> None:
        raise RuntimeError("secret P-000001 value")

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    for handler, code, shown in ((boom, 1, "internal error: RuntimeError"),
                                 (interrupted, 130, "interrupted")):
        monkeypatch.setattr(cli_keys, "_keygen", handler)  # read when the parser is built
        assert main(["keygen", site.file("x.key")]) == code
        _, err = capsys.readouterr()
        assert shown in err and "secret" not in err and "Traceback" not in err


def test_failures_as_subprocesses(site: Site) -> None:
    """A sample of the matrix, the way a shell runs it (run_cli checks one line, no
    traceback)."""
    k = ["--key-file", str(site.key)]
    assert run_cli("enroll", str(site.store), "--templates", site.file("gallery.npy"),
                   *k).code == 2
    wrong = bt.FileKeyProvider.generate(site.dir / "wrong.key").path
    done = run_cli("search", str(site.store), "--probe", site.file("probe.npy"), "--purpose",
                   "watchlist", "--actor", "a", "--key-file", str(wrong))
    assert done.code == 1 and "KeyUnavailable" in done.err
    done = run_cli("report", "retention", site.file("nowhere"), *k)
    assert done.code == 1 and "StoreNotFound" in done.err
    done = run_cli("search", str(site.store), "--probe", site.file("probe.npy"), "--purpose",
                   "border-verification", "--actor", "a", *k)
    assert done.code == 1 and "PolicyViolation" in done.err
    assert run_cli("--version").code == 0


@pytest.mark.slow
def test_every_failure_as_a_subprocess(matrix_site: Site) -> None:
    for label, args, code, names in cases(matrix_site):
        done = run_cli(*args)
        assert done.code == code, f"{label}: {done}"
        assert names in done.err, f"{label}: {done.err!r}"
