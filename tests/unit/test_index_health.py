"""TemplateStore.index_health and tune_index: on a synthetic gallery whose graph is poor
(M=6, ef_construction=20, exact cut-off 256) a small ef provably misses mates that exact
search finds; tuning picks an ef that meets the target, saves it sealed with the store,
uses it after a reopen (snapshot or rebuild), grows it with the gallery and flags it
stale after 2x growth. Single-threaded graphs and seeded samples make every count exact
and repeatable: health with the tuner's seed sees the tuner's own probes."""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import biotemplate as bt
from biotemplate import evaluation as ev
from biotemplate.index import TunedEf, tuned_ef
from biotemplate.synthetic import make_gallery
from biotemplate.tuning import meets

DIM, MODEL = 64, "test-model-v1"
N = 4000
PARAMS = {"M": 6, "ef_construction": 20, "exact_cutoff": 256, "num_threads": 1}
TARGET, SAMPLE, SEED = 0.01, 1000, 2
POLICY = bt.RetentionPolicy.from_dict({"epoch": "1d", "purposes": {
    "watch": {"max_retention": "3y", "modes": ["identification", "investigation"],
              "match_threshold": 0.5},
    "small": {"max_retention": "3y", "modes": ["identification"], "match_threshold": 0.5}}})
TTL = timedelta(days=30)


def make(folder: Path, keys: bt.FileKeyProvider, **params: object) -> bt.TemplateStore:
    """A store of N one-sample identities for "watch" (graph) and 100 for "small" (exact)."""
    store = bt.TemplateStore.create(folder, dim=DIM, model=MODEL, policy=POLICY,
                                    key_provider=keys,
                                    index_params=bt.IndexParams(**{**PARAMS, **params}))
    g = make_gallery(N, 1, DIM, seed=1, intrinsic=DIM)
    store.enroll_many(g.templates, subject_ids=g.subject_ids, purposes=["watch"], ttl=TTL,
                      actor="enrol")
    store.enroll_many(g.templates[:100], subject_ids=g.subject_ids[:100], purposes=["small"],
                      ttl=TTL, actor="enrol")
    return store


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bt.FileKeyProvider,
                                                             bt.TuneReport]:
    """One store built and tuned once for the module (closed: tests reopen it)."""
    root = tmp_path_factory.mktemp("tuned")
    keys = bt.FileKeyProvider.generate(root / "master.key")
    with make(root / "store", keys) as store:
        report = store.tune_index(TARGET, actor="ops", sample=SAMPLE, seed=SEED)
    return root / "store", keys, report


def reopen(folder: Path, keys: bt.FileKeyProvider, **params: object) -> bt.TemplateStore:
    return bt.TemplateStore.open(folder, key_provider=keys,
                                 index_params=bt.IndexParams(**{**PARAMS, **params}))


def test_a_small_fixed_ef_misses_what_exact_search_finds(tmp_path: Path,
                                                        keys: bt.FileKeyProvider) -> None:
    with make(tmp_path / "s", keys, ef_search=16) as store:
        health = store.index_health("watch", sample=SAMPLE, actor="ops", seed=SEED)
        h = health.of("watch")
        assert (h.ef, h.ef_source, h.live, h.probes) == (16, "fixed", N, SAMPLE)
        assert h.added_miss is not None and h.found > 300
        assert h.added_miss.value > 10 * TARGET and h.added_miss.low > TARGET
        assert h.probe_score == 0.5 and h.graph_us is not None and h.graph_us > 0
        # a fixed ef would override any tuning: refused, and the refusal audited
        with pytest.raises(bt.InvalidInput, match="ef_search"):
            store.tune_index(actor="ops")
        last = store.audit.get(store.audit.verify().entries)
        assert (last.event, last.outcome) == ("tune-index", "refused")


def test_tuning_reaches_its_target_where_auto_ef_misses(
        tuned: tuple[Path, bt.FileKeyProvider, bt.TuneReport]) -> None:
    folder, keys, report = tuned
    assert report.target_added_miss == TARGET and report.probes == SAMPLE
    assert [t.purpose for t in report.purposes] == ["watch"]  # "small" is searched exactly
    t = report.of("watch")
    assert t.source_before == "auto" and t.ef_before == t.auto_ef == 64
    assert t.before.rate > TARGET  # auto_ef misses on this graph
    assert t.trials[0].ef == 16 and t.trials[0].rate > 10 * TARGET
    assert t.met and t.added_miss is not None and t.added_miss.high <= TARGET
    # the smallest ef meeting the target (95 % upper bound) with the next ef meeting it too
    efs = [x.ef for x in t.trials]
    ok = [meets(x, TARGET) for x in t.trials]
    assert ok == [ev.wilson(x.misses, x.found)[1] <= TARGET for x in t.trials]
    first = next(i for i in range(len(ok) - 1) if ok[i] and ok[i + 1])
    assert t.ef == efs[first] > 64 and efs[-1] == efs[first + 1]
    assert all(x.found == t.before.found for x in t.trials)  # one set of probes
    assert t.larger_m_advised == (t.ef >= 256)
    # measured again with the tuner's own probes, at the ef now in use
    with reopen(folder, keys) as store:
        h = store.index_health("watch", sample=SAMPLE, actor="ops", seed=SEED).of("watch")
        assert (h.ef, h.ef_source, h.tuned_ef, h.tuned_live) == (t.ef, "tuned", t.ef, N)
        assert h.added_miss is not None and h.added_miss.errors == t.added_miss.errors
        assert h.found == t.added_miss.trials and not h.stale
    summary = report.summary()
    assert f"ef {t.ef_before} (auto" in summary and f"-> {t.ef} " in summary
    assert "met" in summary and "P-0" not in summary


def test_the_tuning_is_saved_sealed_and_used_after_reopening(
        tuned: tuple[Path, bt.FileKeyProvider, bt.TuneReport], tmp_path: Path) -> None:
    folder, keys, report = tuned
    ef = report.of("watch").ef
    with reopen(folder, keys) as store:  # from the snapshot
        stats = store.stats().purposes["watch"]
        assert (stats["ef"], stats["tuned_ef"], stats["tuned_live"], stats["retune"]) == \
            (ef, ef, N, 0)
        assert "tuned_ef" not in store.stats().purposes["small"]
    (folder / "index.snapshot").unlink()
    with reopen(folder, keys) as store:  # by a rebuild
        assert store.stats().purposes["watch"]["ef"] == ef
        store.rebuild_index()
        assert store.stats().purposes["watch"]["ef"] == ef
    with bt.TemplateStore.open(folder, key_provider=keys, snapshot_on_close=False,
                               index_params=bt.IndexParams(**{**PARAMS, "M": 8})) as store:
        # loaded from the snapshot, the graph is still the M=6 one it was measured on
        assert store.stats().purposes["watch"]["ef"] == ef
        # rebuilt, it is an M=8 graph: the tuning measured on M=6 is not used for it
        (folder / "index.snapshot").unlink()
        store.rebuild_index()
        h = store.index_health("watch", sample=10, actor="ops").of("watch")
        assert (h.ef, h.ef_source) == (64, "auto")
    # the setting is sealed: an edit in records.db is refused on open
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("records.db", "audit.db", "keyring"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with sqlite3.connect(copy / "records.db") as db:
        (blob,) = db.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
        db.execute("UPDATE meta SET value = ? WHERE key = 'index'",
                   (bytes(blob[:-1]) + bytes([blob[-1] ^ 1]),))
    with pytest.raises(bt.IntegrityError):
        bt.TemplateStore.open(copy, key_provider=keys)


def test_a_tuned_ef_grows_with_the_gallery_and_is_flagged_after_2x(
        tuned: tuple[Path, bt.FileKeyProvider, bt.TuneReport], tmp_path: Path) -> None:
    folder, keys, report = tuned
    ef = report.of("watch").ef
    more = make_gallery(N + 1, 1, DIM, seed=5, prefix="Q-", intrinsic=DIM)
    copy = tmp_path / "grown"
    copy.mkdir()
    for name in ("records.db", "audit.db", "keyring"):
        (copy / name).write_bytes((folder / name).read_bytes())
    with reopen(copy, keys) as store:
        store.enroll_many(more.templates, subject_ids=more.subject_ids, purposes=["watch"],
                          ttl=TTL, actor="enrol")
        live = 2 * N + 1
        stats = store.stats().purposes["watch"]
        assert stats["live"] == live and stats["retune"] == 1
        assert stats["ef"] == tuned_ef(TunedEf(ef, N, 6), live) == \
            max(ef, 16 * math.ceil(ef * (live / N) ** 0.9 / 16)) > ef
        health = store.index_health(sample=50, actor="ops", seed=1)
        assert health.stale and health.of("watch").stale
        assert "tune_index again" in (health.of("watch").warning or "")
        again = store.tune_index(TARGET, actor="ops", purpose="watch", sample=200, seed=3)
        assert not store.index_health(sample=10, actor="ops").stale
        assert store.stats().purposes["watch"]["tuned_live"] == live
        assert again.of("watch").live == live


def test_exact_purposes_have_nothing_to_miss(
        tuned: tuple[Path, bt.FileKeyProvider, bt.TuneReport]) -> None:
    folder, keys, _ = tuned
    with reopen(folder, keys) as store:
        health = store.index_health(actor="ops", sample=20)
        assert [h.purpose for h in health.purposes] == ["small", "watch"]
        assert "small: 100 live, ef 0 (exact): searched exactly" in health.summary()
        small = health.of("small")
        assert (small.ef_source, small.live, small.probes, small.added_miss) == \
            ("exact", 100, 0, None)
        report = store.tune_index(TARGET, actor="ops", purpose="small")
        assert report.purposes == ()  # nothing to tune; the watch tuning is kept
        assert store.stats().purposes["watch"]["tuned_ef"] > 0


def test_audit_entries_hold_counts_only(
        tuned: tuple[Path, bt.FileKeyProvider, bt.TuneReport]) -> None:
    folder, keys, report = tuned
    with reopen(folder, keys) as store:
        tune = store.audit.get(report.audit_seq)
        assert (tune.event, tune.actor, tune.fields["target"]) == ("tune-index", "ops", TARGET)
        assert tune.fields["purposes"]["watch"]["ef"] == report.of("watch").ef
        health = store.index_health(actor="auditor", sample=30, seed=0)
        entry = store.audit.get(health.audit_seq)
        assert entry.event == "index-health" and entry.actor == "auditor"
        for fields in (tune.fields, entry.fields):
            text = json.dumps(fields, default=str)
            assert "P-0" not in text and "[0." not in text and "[-0." not in text


@pytest.mark.parametrize(("call", "kwargs", "error"), [
    ("index_health", {"sample": 0}, bt.InvalidInput),
    ("index_health", {"sample": 1.5}, bt.InvalidInput),
    ("index_health", {"seed": -1}, bt.InvalidInput),
    ("index_health", {"purpose": "nope"}, bt.PolicyViolation),
    ("tune_index", {"target_added_miss": 0.0}, bt.InvalidInput),
    ("tune_index", {"target_added_miss": 1.0}, bt.InvalidInput),
    ("tune_index", {"target_added_miss": True}, bt.InvalidInput),
    ("tune_index", {"purpose": "nope"}, bt.PolicyViolation),
])
def test_refusals_are_audited(store: bt.TemplateStore, call: str, kwargs: dict[str, object],
                              error: type[Exception]) -> None:
    with pytest.raises(error):
        getattr(store, call)(actor="ops", **kwargs)
    last = store.audit.get(store.audit.verify().entries)
    assert last.outcome == "refused" and last.event == call.replace("_", "-")


def test_a_tuning_that_never_committed_is_rolled_back_on_open(
        tmp_path: Path, keys: bt.FileKeyProvider) -> None:
    """A kill between the tune-index entry and the records commit: the audit must not
    claim a tuning the store does not have."""
    folder = tmp_path / "s"
    store = make(folder, keys)
    seq = store.tune_index(TARGET, actor="ops", sample=200, seed=SEED).audit_seq
    store._p.release()  # as if killed: no close entry, no snapshot
    with reopen(folder, keys) as again:  # committed: kept, nothing rolled back
        assert again.stats().purposes["watch"]["tuned_live"] == N
        head = again.audit.verify().entries
        assert all(again.audit.get(s).event != "rollback" for s in range(seq + 1, head + 1))
        seq = again.tune_index(TARGET, actor="ops", sample=200, seed=SEED).audit_seq
        again._p.release()
    with sqlite3.connect(folder / "records.db") as db:  # the commit that never happened
        db.execute("DELETE FROM meta WHERE key = 'index'")
    with reopen(folder, keys) as again:
        entries = [again.audit.get(s) for s in range(seq + 1, again.audit.verify().entries)]
        rollback = [e for e in entries if e.event == "rollback"]
        assert rollback and rollback[0].fields["ref_seq"] == seq
        assert rollback[0].fields["of"] == "tune-index"
        assert "tuned_ef" not in again.stats().purposes["watch"]


def test_too_few_probes_cannot_meet_a_target(tmp_path: Path,
                                              keys: bt.FileKeyProvider) -> None:
    with make(tmp_path / "s", keys) as store:
        t = store.tune_index(TARGET, actor="ops", sample=40, seed=SEED).of("watch")
        assert not t.met and t.larger_m_advised
        assert t.warning is not None and "raise sample" in t.warning
        assert t.added_miss is not None and t.added_miss.high > TARGET  # ~20 found mates
        assert t.ef == min(t.trials, key=lambda x: (x.rate, -x.ef)).ef  # the best tried


def test_tuned_ef_rule() -> None:
    t = TunedEf(ef=100, live=1000, M=16)
    assert tuned_ef(t, 500) == tuned_ef(t, 1000) == 100
    assert tuned_ef(t, 4000) == 16 * math.ceil(100 * 4 ** 0.9 / 16) == 352
    assert np.all(np.diff([tuned_ef(t, n) for n in range(1000, 20000, 500)]) >= 0)
