"""``TemplateStore.search_many`` (issue 4, item 5): the batch form of ``search``.

For every probe it must give what ``search`` gives (same candidates, scores within 1e-6,
same open-set rules), audit one entry per probe whose ``audit_seq`` works with
``confirm_match``, and refuse a batch with one bad row before searching anything.
Both index paths run: exact search (the default at this size) and the HNSW graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery, make_gallery, probes, strangers

DIM = 64
WATCH: dict[str, Any] = {"purposes": ["watchlist"], "ttl": timedelta(days=30),
                         "source": "enrolment-desk-1"}


@pytest.fixture(params=["exact", "hnsw"])
def sstore(request: pytest.FixtureRequest, store_dir: Path, policy: bt.RetentionPolicy,
           keys: Any, clock: Any, gallery: Gallery) -> Iterator[bt.TemplateStore]:
    """The gallery under "watchlist", plus 10 "rare" subjects (some sharing a face)."""
    params = bt.IndexParams(exact_cutoff=0) if request.param == "hnsw" else None
    s = bt.TemplateStore.create(store_dir, dim=DIM, model="test-model-v1", policy=policy,
                                key_provider=keys, clock=clock, index_params=params)
    s.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="svc", **WATCH)
    s.enroll_many(gallery.templates[:20:2], subject_ids=[f"R-{i}" for i in range(10)],
                  purposes=["rare"], actor="svc")
    yield s
    with contextlib.suppress(Exception):
        s.close()


def batch(gallery: Gallery) -> np.ndarray:
    """Mated probes (strong and weak), strangers, enrolled templates verbatim, a repeat."""
    mated = probes(gallery, list(range(0, 50, 4)))
    weak = probes(make_gallery(50, 1, DIM, seed=3, genuine=0.35), [1, 2])  # near threshold
    return np.concatenate([mated, weak, strangers(4, DIM), gallery.templates[[3, 60]],
                           mated[:1]])


def same(a: bt.SearchResult, b: bt.SearchResult) -> None:
    """Everything but audit_seq agrees; scores within 1e-6."""
    assert (a.decision, a.threshold, a.mode, a.purpose) == (b.decision, b.threshold, b.mode,
                                                            b.purpose)
    assert [(c.record_id, c.subject_id, c.rank, c.above_threshold) for c in a.candidates] == \
        [(c.record_id, c.subject_id, c.rank, c.above_threshold) for c in b.candidates]
    for x, y in zip(a.candidates, b.candidates, strict=True):
        assert abs(x.score - y.score) <= 1e-6
        assert type(x.score) is float and type(x.above_threshold) is bool
    assert type(a.decision) is bool


def head(store: bt.TemplateStore) -> int:
    return store.audit.checkpoint().seq


def entries_after(store: bt.TemplateStore, seq: int) -> list[bt.AuditEntry]:
    return [store.audit.get(i) for i in range(seq + 1, head(store) + 1)]


# --- equal to search, probe by probe --------------------------------------------------


@pytest.mark.parametrize("mode", ["identification", "investigation"])
@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_search_many_equals_search_per_probe(sstore: bt.TemplateStore, gallery: Gallery,
                                             mode: str, k: int) -> None:
    ps = batch(gallery)
    many = sstore.search_many(ps, purpose="watchlist", k=k, actor="analyst", mode=mode,
                              reason="case 1")
    assert len(many) == len(ps)
    assert all(isinstance(r, bt.SearchResult) for r in many)
    for i, p in enumerate(ps):
        one = sstore.search(p, purpose="watchlist", k=k, actor="analyst", mode=mode,
                            reason="case 1")
        same(many[i], one)
    if mode == "investigation":
        assert all(len(r.candidates) == min(k, 20) for r in many)  # capped by max_candidates
    else:
        assert any(r.candidates for r in many) and any(not r.candidates for r in many)


def test_search_many_sees_only_its_purpose(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    ps = gallery.templates[:20]
    many = sstore.search_many(ps, purpose="rare", k=10, actor="a", mode="investigation")
    for i, res in enumerate(many):
        assert {c.subject_id for c in res.candidates} <= {f"R-{j}" for j in range(10)}
        same(res, sstore.search(ps[i], purpose="rare", k=10, actor="a", mode="investigation"))
    assert [r.candidates[0].subject_id for r in many[::2]] == [f"R-{j}" for j in range(10)]


def test_open_set_semantics_match_search(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    ps = batch(gallery)
    ident = sstore.search_many(ps, purpose="watchlist", k=10, actor="a")
    inv = sstore.search_many(ps, purpose="watchlist", k=10, actor="a", mode="investigation")
    for a, b in zip(ident, inv, strict=True):
        assert a.mode == "identification" and b.mode == "investigation"
        assert all(c.above_threshold and c.score >= a.threshold for c in a.candidates)
        assert a.decision == bool(a.candidates)
        assert len(b.candidates) == 10
        assert all(c.above_threshold == (c.score >= b.threshold) for c in b.candidates)
        assert b.decision == any(c.above_threshold for c in b.candidates)
        # identification = the investigation list cut at the threshold
        assert [c.record_id for c in a.candidates] == \
            [c.record_id for c in b.candidates if c.above_threshold]
        scores = [c.score for c in b.candidates]
        assert scores == sorted(scores, reverse=True)
        assert [c.rank for c in b.candidates] == list(range(1, 11))
        assert len({c.subject_id for c in b.candidates}) == 10  # one per subject
    stranger_rows = slice(15, 19)
    assert all(not r.candidates and r.decision is False for r in ident[stranger_rows])


def test_expired_and_deleted_records_are_not_returned(sstore: bt.TemplateStore, clock: Any,
                                                      gallery: Gallery) -> None:
    short = sstore.enroll(gallery.templates[7], subject_id="S-1", purposes=["watchlist"],
                          ttl=timedelta(hours=1), source="case-file", actor="svc")
    gone = sstore.search(gallery.templates[9], purpose="watchlist", actor="a").candidates
    sstore.delete(gone[0].record_id, actor="svc")
    ps = gallery.templates[[7, 9]]
    before = sstore.search_many(ps, purpose="watchlist", k=20, actor="a", mode="investigation")
    assert short in {c.record_id for c in before[0].candidates}
    clock.advance(hours=2)
    after = sstore.search_many(ps, purpose="watchlist", k=20, actor="a", mode="investigation")
    found = {c.record_id for r in after for c in r.candidates}
    assert short not in found and gone[0].record_id not in found
    for p, res in zip(ps, after, strict=True):
        same(res, sstore.search(p, purpose="watchlist", k=20, actor="a", mode="investigation"))


def test_a_single_row_and_array_likes(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    p = probes(gallery, [5])
    (res,) = sstore.search_many(p, purpose="watchlist", actor="a")
    same(res, sstore.search(p[0], purpose="watchlist", actor="a"))
    (again,) = sstore.search_many(p.astype(np.float64).tolist(), purpose="watchlist", actor="a")
    same(again, res)
    scaled = sstore.search_many(p * 7.5, purpose="watchlist", actor="a")  # not unit norm
    same(scaled[0], res)


@pytest.mark.parametrize("mode", ["identification", "investigation"])
def test_a_batch_searched_in_steps_gives_the_same_results_and_entries(
        sstore: bt.TemplateStore, gallery: Gallery, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than a step is searched step by step (the next step in a worker
    thread): the results, and one entry per probe in probe order, do not change."""
    from biotemplate import matching

    monkeypatch.setattr(matching, "STEP", 4)
    ps = batch(gallery)  # 22 probes: 6 steps, the last one short
    start = head(sstore)
    many = sstore.search_many(ps, purpose="watchlist", k=5, actor="analyst", mode=mode)
    new = entries_after(sstore, start)
    assert [r.audit_seq for r in many] == [e.seq for e in new] and len(new) == len(ps)
    for res, entry, p in zip(many, new, ps, strict=True):
        assert list(entry.fields["record_ids"]) == [c.record_id for c in res.candidates]
        same(res, sstore.search(p, purpose="watchlist", k=5, actor="analyst", mode=mode))
    assert sstore.audit.verify().ok


# --- audit: one entry per probe -------------------------------------------------------


def test_one_audit_entry_per_probe(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    ps = batch(gallery)
    start = head(sstore)
    many = sstore.search_many(ps, purpose="watchlist", k=5, actor="analyst-7",
                              mode="investigation", reason="case 2")
    new = entries_after(sstore, start)
    assert len(new) == len(ps)
    seqs = [r.audit_seq for r in many]
    assert len(set(seqs)) == len(ps)
    assert seqs == [e.seq for e in new]  # in probe order
    for res, entry in zip(many, new, strict=True):
        assert (entry.event, entry.outcome, entry.actor) == ("search", "ok", "analyst-7")
        assert entry.fields["purpose"] == "watchlist"
        assert entry.fields["mode"] == "investigation"
        assert entry.fields["reason"] == "case 2"
        assert list(entry.fields["record_ids"]) == [c.record_id for c in res.candidates]
        assert entry.fields["count"] == len(res.candidates)
        assert entry.fields["decision"] == res.decision
    digests = [e.fields["probe_digest"] for e in new]
    assert digests[0] == digests[-1]  # the repeated probe: the same keyed digest
    assert len(set(digests)) == len(ps) - 1
    for i in (0, 5):  # ...and the same digest as search() gives the same probe
        sstore.search(ps[i], purpose="watchlist", k=5, actor="a", mode="investigation")
        last = sstore.audit.get(head(sstore))
        assert last.fields["probe_digest"] == digests[i]
    report = sstore.audit.verify()
    assert report.ok, report.problems


def test_each_audit_seq_works_with_confirm_match(sstore: bt.TemplateStore,
                                                 gallery: Gallery) -> None:
    ps = probes(gallery, [1, 2, 3])
    many = sstore.search_many(ps, purpose="watchlist", k=3, actor="a")
    tops = [r.candidates[0] for r in many]
    assert [c.subject_id for c in tops] == ["P-000001", "P-000002", "P-000003"]
    for res, top in zip(many, tops, strict=True):
        first = sstore.confirm_match(res.audit_seq, top.record_id, reviewer="officer-2")
        assert first.search_seq == res.audit_seq and not first.two_person_confirmed
        second = sstore.confirm_match(res.audit_seq, top.record_id, reviewer="officer-9")
        assert second.two_person_confirmed
        assert second.reviewers == ("officer-2", "officer-9")
    # a candidate of probe 1 is not a candidate of probe 0's search
    others = {c.record_id for c in many[0].candidates}
    assert tops[1].record_id not in others
    with pytest.raises(bt.PolicyViolation):
        sstore.confirm_match(many[0].audit_seq, tops[1].record_id, reviewer="officer-2")


# --- refusals: identical to search, nothing searched ----------------------------------


def _bad_rows(gallery: Gallery) -> dict[str, Any]:
    good = probes(gallery, list(range(6)))
    nan, inf, zero, huge = good.copy(), good.copy(), good.copy(), good.astype(np.float64)
    nan[3, 5] = np.nan
    inf[5, 0] = np.inf
    zero[2] = 0.0
    huge[4, 1] = 1e300  # finite as float64, infinite as float32
    return {"nan": nan, "inf": inf, "zero-row": zero, "overflow": huge,
            "wrong-dim": good[:, :-1], "one-d": good[0], "empty": good[:0],
            "three-d": good[None], "strings": [["x"] * DIM] * 2, "none": None,
            "ragged": [list(good[0]), list(good[1][:10])], "complex": good.astype(complex),
            "bools": np.ones((2, DIM), dtype=bool)}


@pytest.mark.parametrize("kind", sorted(_bad_rows(make_gallery(50, 2, DIM, seed=3))))
def test_a_bad_row_refuses_the_whole_batch(sstore: bt.TemplateStore, gallery: Gallery,
                                           kind: str) -> None:
    start = head(sstore)
    with pytest.raises(bt.InvalidTemplate):
        sstore.search_many(_bad_rows(gallery)[kind], purpose="watchlist", actor="analyst")
    new = entries_after(sstore, start)
    assert [(e.event, e.outcome, e.actor) for e in new] == [("search", "refused", "analyst")]
    assert new[0].fields["error"] == "InvalidTemplate"
    assert "record_ids" not in new[0].fields  # nothing was searched


@pytest.mark.parametrize("call", [
    {"purpose": "border-verification"},                     # mode not allowed
    {"purpose": "watchlist", "mode": "verification"},       # not a search mode
    {"purpose": "no-such-purpose"},
    {"purpose": "watchlist", "k": 0},
    {"purpose": "watchlist", "k": True},
    {"purpose": "watchlist", "k": 2.0},
    {"purpose": "watchlist", "mode": "bogus"},
    {"purpose": "watchlist", "reason": ""},
], ids=["mode-not-allowed", "verification-mode", "unknown-purpose", "k-zero", "k-bool",
        "k-float", "bogus-mode", "empty-reason"])
def test_refusals_are_those_of_search(sstore: bt.TemplateStore, gallery: Gallery,
                                      call: dict[str, Any]) -> None:
    p = probes(gallery, [1, 2])
    with pytest.raises(bt.BiotemplateError) as single:
        sstore.search(p[0], actor="a", **call)
    start = head(sstore)
    with pytest.raises(type(single.value)):
        sstore.search_many(p, actor="a", **call)
    new = entries_after(sstore, start)
    assert [(e.event, e.outcome) for e in new] == [("search", "refused")]
    assert new[0].fields["error"] == type(single.value).__name__


def test_a_bad_actor_is_refused_like_search(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    start = head(sstore)
    for actor in ("", None, 7):
        with pytest.raises(bt.InvalidInput):
            sstore.search_many(probes(gallery, [1]), purpose="watchlist", actor=actor)
    assert not [e for e in entries_after(sstore, start) if e.outcome == "ok"]


def test_closed_store_refuses(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    sstore.close()
    with pytest.raises(bt.InvalidInput):
        sstore.search_many(probes(gallery, [1]), purpose="watchlist", actor="a")


def test_a_step_s_entries_are_written_in_one_commit_or_not_at_all(
        sstore: bt.TemplateStore, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = sstore._p.trail
    head = trail.head_seq
    writes: list[int] = []
    real = trail._write_entries

    def counted(builds: Any, refs: Any) -> Any:
        writes.append(len(builds))
        return real(builds, refs)

    monkeypatch.setattr(trail, "_write_entries", counted)
    results = sstore.search_many(gallery.templates[:5], purpose="watchlist", actor="t")
    assert writes == [5] and [r.audit_seq for r in results] == list(range(head + 1, head + 6))

    def failing(builds: Any, refs: Any) -> Any:
        raise bt.AuditError("the audit entries could not be written")

    monkeypatch.setattr(trail, "_write_entries", failing)
    with pytest.raises(bt.AuditError):
        sstore.search_many(gallery.templates[:5], purpose="watchlist", actor="t")
    assert trail.head_seq == head + 5  # no entry of the failed step
