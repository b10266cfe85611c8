"""Bad input: every refusal is the right BiotemplateError, says what to fix, and leaves the
store as it was (docs/architecture.md §4: "bad input never corrupts the store and never leaves
partial writes"). Errors and reprs never echo template values or subject ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery, make_gallery, probes, strangers

DIM = 64
START = datetime(2026, 1, 1, tzinfo=UTC)
GOOD = strangers(1, DIM, seed=5)[0]
BATCH = strangers(3, DIM, seed=6)
FIXED_PROBE = strangers(1, DIM, seed=7)[0]
WATCH: dict[str, Any] = {"purposes": ["watchlist"], "ttl": timedelta(days=30),
                         "source": "case-file-1"}
SECRET = "SECRET-SUBJECT-4711"

Call = Callable[[bt.TemplateStore], Any]


def _with(i: int, value: float) -> np.ndarray:
    v = GOOD.astype(np.float64).copy()
    v[i] = value
    return v


def _last_row(value: float) -> np.ndarray:
    b = BATCH.astype(np.float64).copy()
    b[-1, 3] = value
    return b


JUNK = [
    pytest.param(None, id="None"),
    pytest.param("abc", id="str"),
    pytest.param(b"x", id="bytes"),
    pytest.param({"a": 1}, id="dict"),
    pytest.param(object(), id="object"),
    pytest.param([1, "a"], id="mixed-list"),
    pytest.param(np.ones(DIM, dtype=complex), id="complex"),
    pytest.param(np.ones(DIM, dtype=bool), id="bool"),
]
JUNK_KEYWORD = r"1-D|2-D|real numbers"

BAD_TEMPLATES = [
    pytest.param(np.ones(DIM - 1), "length 64", id="wrong-dim-short"),
    pytest.param(np.ones(DIM + 1), "length 64", id="wrong-dim-long"),
    pytest.param(_with(3, np.nan), "NaN", id="nan"),
    pytest.param(_with(3, np.inf), "infinity", id="inf"),
    pytest.param(_with(3, -np.inf), "infinity", id="minus-inf"),
    pytest.param(_with(3, 1e39), "float32", id="too-large-for-float32"),
    pytest.param(np.zeros(DIM), "zero", id="zero-vector"),
    pytest.param(GOOD[None, :], "enroll_many", id="2-D"),
    pytest.param(np.ones(()), "1-D", id="scalar"),
    pytest.param([], "length 64", id="empty-list"),
    *[pytest.param(p.values[0], JUNK_KEYWORD, id=p.id) for p in JUNK],
]

BAD_BATCHES = [
    pytest.param(GOOD, "2-D", id="1-D"),
    pytest.param(np.empty((0, DIM)), "n >= 1", id="empty"),
    pytest.param(np.ones((3, DIM - 1)), f"{DIM}", id="wrong-dim"),
    pytest.param(np.ones((1, 3, DIM)), "2-D", id="3-D"),
    pytest.param(_last_row(np.nan), "row 2", id="nan-last-row"),
    pytest.param(_last_row(1e39), "row 2", id="too-large-last-row"),
    pytest.param(np.vstack([BATCH[:2], np.zeros((1, DIM))]), "row 2", id="zero-last-row"),
    pytest.param([list(BATCH[0]), list(BATCH[1][:10])], JUNK_KEYWORD, id="ragged"),
    *[pytest.param(p.values[0], JUNK_KEYWORD, id=p.id) for p in JUNK],
]


# --- the store under test and its fingerprint --------------------------------------------


def populate(store: bt.TemplateStore) -> bt.TemplateStore:
    g = make_gallery(50, 2, DIM, seed=3)
    store.enroll_many(g.templates[:40], subject_ids=g.subject_ids[:40], actor="svc", **WATCH)
    store.enroll_many(g.templates[40:50], subject_ids=g.subject_ids[40:50],
                      purposes=["rare"], actor="svc")
    store.enroll(g.templates[50], subject_id="T-1", purposes=["border-verification"],
                 actor="svc")
    store.place_hold("P-000001", actor="legal", reason="case 9")
    return store


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory,
           policy: bt.RetentionPolicy) -> Iterator[bt.TemplateStore]:
    """One populated store for the whole module: every test here is a refusal, and each
    one checks (with ``fingerprint``) that its refusal changed nothing."""
    folder = tmp_path_factory.mktemp("bad-input")
    keys = bt.FileKeyProvider.generate(folder / "master.key")
    store = bt.TemplateStore.create(folder / "store", dim=DIM, model="test-model-v1",
                                    policy=policy, key_provider=keys, clock=lambda: START)
    populate(store)
    yield store
    report = store.audit.verify()  # the refusals left a clean trail
    store.close()
    assert report.ok, report.problems


@pytest.fixture
def loaded(shared: bt.TemplateStore) -> bt.TemplateStore:
    return shared


@pytest.fixture
def fresh(store: bt.TemplateStore) -> bt.TemplateStore:
    """A populated store of this test's own (for tests that write or close it)."""
    return populate(store)


def fingerprint(store: bt.TemplateStore) -> tuple[Any, ...]:
    stats = store.stats()
    res = store.search(FIXED_PROBE, purpose="watchlist", k=10, actor="checker",
                       mode="investigation")
    found = tuple((c.record_id, c.subject_id, round(c.score, 5)) for c in res.candidates)
    exported = tuple(v.record_id for v in store.export_subject("P-000003", actor="checker"))
    return (stats.records, stats.indexed, stats.subjects, stats.held_subjects,
            stats.erasure_generation, stats.epoch, found, exported)


def refused(store: bt.TemplateStore, call: Call, exc: type[Exception], keyword: str) -> Exception:
    """Run ``call``; it must raise ``exc`` naming ``keyword`` and change nothing."""
    before = fingerprint(store)
    with pytest.raises(exc) as info:
        call(store)
    assert re.search(keyword, str(info.value)), f"{str(info.value)!r} lacks {keyword!r}"
    assert isinstance(info.value, bt.BiotemplateError)
    assert fingerprint(store) == before
    return info.value


def probes_of_loaded() -> np.ndarray:
    """A mated probe of P-000003 (enrolled for watchlist by ``populate``)."""
    return probes(make_gallery(50, 2, DIM, seed=3), [3])[0]


# --- templates ----------------------------------------------------------------------------


@pytest.mark.parametrize(("template", "keyword"), BAD_TEMPLATES)
def test_bad_template_enroll(loaded: bt.TemplateStore, template: object, keyword: str) -> None:
    refused(loaded, lambda s: s.enroll(template, subject_id="NEW-1", actor="svc", **WATCH),
            bt.InvalidTemplate, keyword)


@pytest.mark.parametrize(("template", "keyword"), BAD_TEMPLATES)
def test_bad_probe_search(loaded: bt.TemplateStore, template: object, keyword: str) -> None:
    for mode in ("identification", "investigation"):
        refused(loaded, lambda s, m=mode: s.search(template, purpose="watchlist", k=5,
                                                   actor="a", mode=m),
                bt.InvalidTemplate, keyword)


@pytest.mark.parametrize(("template", "keyword"), BAD_TEMPLATES)
def test_bad_probe_verify(loaded: bt.TemplateStore, template: object, keyword: str) -> None:
    refused(loaded, lambda s: s.verify(template, subject_id="P-000041", purpose="rare",
                                       actor="a"),
            bt.InvalidTemplate, keyword)


@pytest.mark.parametrize(("batch", "keyword"), BAD_BATCHES)
def test_bad_batch_enroll_many(loaded: bt.TemplateStore, batch: object, keyword: str) -> None:
    n = 3 if not isinstance(batch, np.ndarray) or batch.ndim != 2 else len(batch)
    ids = [f"NEW-{i}" for i in range(max(n, 1))]
    refused(loaded, lambda s: s.enroll_many(batch, subject_ids=ids, actor="svc", **WATCH),
            bt.InvalidTemplate, keyword)


# Applications (and pytest configs) often run with warnings as errors: an out-of-range
# value must still come back as InvalidTemplate, not as numpy's RuntimeWarning.
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("value", [1e39, -1e39, 1e300], ids=["1e39", "-1e39", "1e300"])
@pytest.mark.parametrize("op", ["enroll", "search", "verify", "enroll_many"])
def test_too_large_values_under_warnings_as_errors(loaded: bt.TemplateStore, value: float,
                                                   op: str) -> None:
    calls: dict[str, Call] = {
        "enroll": lambda s: s.enroll(_with(3, value), subject_id="NEW-1", actor="svc",
                                     **WATCH),
        "search": lambda s: s.search(_with(3, value), purpose="watchlist", actor="a"),
        "verify": lambda s: s.verify(_with(3, value), subject_id="P-000041", purpose="rare",
                                     actor="a"),
        "enroll_many": lambda s: s.enroll_many(_last_row(value), subject_ids=["A", "B", "C"],
                                               actor="svc", **WATCH),
    }
    refused(loaded, calls[op], bt.InvalidTemplate, "float32")


def test_invalid_template_is_an_invalid_input_and_a_value_error() -> None:
    assert issubclass(bt.InvalidTemplate, bt.InvalidInput)
    assert issubclass(bt.InvalidInput, ValueError)
    assert issubclass(bt.InvalidInput, bt.BiotemplateError)
    assert issubclass(bt.PolicyViolation, bt.BiotemplateError)


def test_enroll_many_is_all_or_nothing(fresh: bt.TemplateStore) -> None:
    loaded = fresh
    ids = ["NEW-0", "NEW-1", "NEW-2"]
    refused(loaded, lambda s: s.enroll_many(_last_row(np.nan), subject_ids=ids, actor="svc",
                                            **WATCH),
            bt.InvalidTemplate, "row 2")
    refused(loaded, lambda s: s.enroll_many(BATCH, subject_ids=["NEW-0", "NEW-1", ""],
                                            actor="svc", **WATCH),
            bt.InvalidInput, "subject_id")
    refused(loaded, lambda s: s.enroll_many(BATCH, subject_ids=ids, actor="svc",
                                            metadata={"x": object()}, **WATCH),
            bt.InvalidInput, "metadata")
    for sid in ids:
        assert loaded.export_subject(sid, actor="dpo") == []
    # and the store still takes the good batch afterwards
    assert len(loaded.enroll_many(BATCH, subject_ids=ids, actor="svc", **WATCH)) == 3


# --- policy: purposes, ttl, modes ------------------------------------------------------


def _enrol(**overrides: Any) -> Call:
    kwargs: dict[str, Any] = {"subject_id": "NEW-1", "actor": "svc", **WATCH, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
    return lambda s: s.enroll(GOOD, **kwargs)


def _enrol_many(**overrides: Any) -> Call:
    kwargs: dict[str, Any] = {"subject_ids": ["A", "B", "C"], "actor": "svc", **WATCH,
                              **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
    return lambda s: s.enroll_many(BATCH, **kwargs)


_DROP = object()
PV, II = bt.PolicyViolation, bt.InvalidInput

POLICY_CASES = [
    pytest.param(_enrol(purposes=["no-such-purpose"]), PV, "unknown purpose", id="unknown"),
    pytest.param(_enrol(purposes=["watchlist", "nope"]), PV, "unknown purpose",
                 id="one-unknown"),
    pytest.param(_enrol(purposes=[]), PV, "at least one", id="empty-purposes"),
    pytest.param(_enrol(purposes=()), PV, "at least one", id="empty-tuple"),
    pytest.param(_enrol(purposes="watchlist"), II, "bare string", id="bare-string"),
    pytest.param(_enrol(purposes=None), II, "list of purpose names", id="purposes-None"),
    pytest.param(_enrol(purposes={"watchlist"}), II, "list of purpose names", id="set"),
    pytest.param(_enrol(purposes=[1]), II, "strings", id="purpose-not-str"),
    pytest.param(_enrol(purposes=["watchlist", "watchlist"]), II, "more than once",
                 id="repeated"),
    pytest.param(_enrol(ttl=timedelta(days=3 * 365 + 1)), PV, "max_retention",
                 id="ttl-over-max"),
    pytest.param(_enrol(purposes=["border-verification"], ttl=timedelta(hours=12, seconds=1),
                        source=None), PV, "max_retention", id="ttl-over-max-by-1s"),
    pytest.param(_enrol(ttl=timedelta.max), PV, "max_retention", id="ttl-max"),
    pytest.param(_enrol(ttl=timedelta(days=-1)), II, "positive", id="negative-ttl"),
    pytest.param(_enrol(ttl=timedelta(0)), II, "positive", id="zero-ttl"),
    pytest.param(_enrol(ttl=3600), II, "timedelta", id="ttl-int"),
    pytest.param(_enrol(ttl="30d"), II, "timedelta", id="ttl-str"),
    pytest.param(_enrol(ttl=1.5), II, "timedelta", id="ttl-float"),
    pytest.param(_enrol(ttl=None), PV, "ttl is required", id="no-ttl-no-default"),
    pytest.param(_enrol(ttl=_DROP), PV, "ttl is required", id="ttl-omitted-no-default"),
    pytest.param(_enrol(source="egate-7"), PV, "source", id="source-not-allowed"),
    pytest.param(_enrol(source=None), PV, "source", id="source-missing"),
    pytest.param(_enrol(source=7), II, "source", id="source-not-str"),
    pytest.param(_enrol_many(purposes=["nope"]), PV, "unknown purpose", id="many-unknown"),
    pytest.param(_enrol_many(purposes=[]), PV, "at least one", id="many-empty-purposes"),
    pytest.param(_enrol_many(purposes="watchlist"), II, "bare string", id="many-bare-string"),
    pytest.param(_enrol_many(ttl=timedelta(days=2000)), PV, "max_retention",
                 id="many-ttl-over-max"),
    pytest.param(_enrol_many(ttl=None), PV, "ttl is required", id="many-no-ttl"),
    pytest.param(_enrol_many(ttl=-timedelta(seconds=1)), II, "positive", id="many-neg-ttl"),
    pytest.param(_enrol_many(source="somewhere"), PV, "source", id="many-source"),
]


@pytest.mark.parametrize(("call", "exc", "keyword"), POLICY_CASES)
def test_policy_refusals(loaded: bt.TemplateStore, call: Call, exc: type[Exception],
                         keyword: str) -> None:
    err = refused(loaded, call, exc, keyword)
    if exc is PV:
        assert not isinstance(err, bt.InvalidInput)


def _search(**overrides: Any) -> Call:
    kwargs: dict[str, Any] = {"purpose": "watchlist", "k": 5, "actor": "a", **overrides}
    return lambda s: s.search(FIXED_PROBE, **kwargs)


SEARCH_CASES = [
    pytest.param(_search(purpose="border-verification"), PV, "not allowed",
                 id="identification-not-allowed"),
    pytest.param(_search(purpose="border-verification", mode="investigation"), PV,
                 "not allowed", id="investigation-not-allowed"),
    pytest.param(_search(mode="verification"), II, "mode must be one of",
                 id="verification-is-not-a-search-mode"),
    pytest.param(_search(mode="identify"), II, "mode must be one of", id="unknown-mode"),
    pytest.param(_search(mode=None), II, "mode must be one of", id="mode-None"),
    pytest.param(_search(mode=["investigation"]), II, "mode must be one of",
                 id="mode-list"),
    pytest.param(_search(purpose="nope"), PV, "unknown purpose", id="unknown-purpose"),
    pytest.param(_search(purpose=None), PV, "unknown purpose", id="purpose-None"),
    pytest.param(_search(purpose=["watchlist"]), PV, "unknown purpose", id="purpose-list"),
    pytest.param(_search(k=0), II, "k must be", id="k=0"),
    pytest.param(_search(k=-1), II, "k must be", id="k=-1"),
    pytest.param(_search(k=True), II, "k must be", id="k=True"),
    pytest.param(_search(k="3"), II, "k must be", id="k='3'"),
    pytest.param(_search(k=2.0), II, "k must be", id="k=2.0"),
    pytest.param(_search(k=None), II, "k must be", id="k=None"),
    pytest.param(_search(reason=""), II, "reason", id="empty-reason"),
    pytest.param(_search(reason=5), II, "reason", id="reason-not-str"),
    pytest.param(_search(reason="x" * 10_000), II, "reason", id="huge-reason"),
    pytest.param(lambda s: s.verify(FIXED_PROBE, subject_id="P-000003", purpose="watchlist",
                                    actor="a"), PV, "verification",
                 id="verify-not-allowed"),
    pytest.param(lambda s: s.verify(FIXED_PROBE, subject_id="P-000003", purpose="nope",
                                    actor="a"), PV, "unknown purpose",
                 id="verify-unknown-purpose"),
]


@pytest.mark.parametrize(("call", "exc", "keyword"), SEARCH_CASES)
def test_search_refusals(loaded: bt.TemplateStore, call: Call, exc: type[Exception],
                         keyword: str) -> None:
    refused(loaded, call, exc, keyword)


# --- subject ids, metadata, actors ---------------------------------------------------------


SUBJECT_IDS = [
    pytest.param("", "subject_id", id="empty"),
    pytest.param("   ", "subject_id", id="blank"),
    pytest.param("x" * 10_000, "longer than", id="huge"),
    pytest.param(None, "subject_id", id="None"),
    pytest.param(42, "subject_id", id="int"),
    pytest.param(b"P-1", "subject_id", id="bytes"),
]

SUBJECT_CALLS = [
    pytest.param(lambda s, sid: s.enroll(GOOD, subject_id=sid, actor="svc", **WATCH),
                 id="enroll"),
    pytest.param(lambda s, sid: s.enroll_many(BATCH, subject_ids=["A", "B", sid], actor="svc",
                                              **WATCH), id="enroll_many"),
    pytest.param(lambda s, sid: s.verify(GOOD, subject_id=sid, purpose="rare", actor="a"),
                 id="verify"),
    pytest.param(lambda s, sid: s.export_subject(sid, actor="dpo"), id="export"),
    pytest.param(lambda s, sid: s.erase_subject(sid, actor="dpo"), id="erase"),
    pytest.param(lambda s, sid: s.place_hold(sid, actor="legal", reason="r"), id="hold"),
    pytest.param(lambda s, sid: s.release_hold(sid, actor="legal", reason="r"), id="release"),
]


@pytest.mark.parametrize(("sid", "keyword"), SUBJECT_IDS)
@pytest.mark.parametrize("call", SUBJECT_CALLS)
def test_bad_subject_id(loaded: bt.TemplateStore, call: Callable[..., Any], sid: object,
                        keyword: str) -> None:
    err = refused(loaded, lambda s: call(s, sid), bt.InvalidInput, keyword)
    if isinstance(sid, str) and sid.strip():
        assert sid not in str(err)


@pytest.mark.parametrize("subject_ids", [
    pytest.param(["A", "B"], id="too-few"),
    pytest.param(["A", "B", "C", "D"], id="too-many"),
    pytest.param([], id="empty"),
    pytest.param("ABC", id="a-string"),
    pytest.param(None, id="None"),
])
def test_subject_ids_length_mismatch(loaded: bt.TemplateStore, subject_ids: object) -> None:
    refused(loaded, lambda s: s.enroll_many(BATCH, subject_ids=subject_ids, actor="svc",
                                            **WATCH),
            bt.InvalidInput, "subject_ids")


@pytest.mark.parametrize(("metadata", "keyword"), [
    pytest.param({1: "a"}, "string keys", id="int-key"),
    pytest.param({("a",): 1}, "string keys", id="tuple-key"),
    pytest.param({"a": object()}, "metadata values", id="object-value"),
    pytest.param({"a": {1, 2}}, "metadata values", id="set-value"),
    pytest.param({"a": np.float32(1.0)}, "metadata values", id="numpy-scalar"),
    pytest.param({"a": 2**80}, "metadata values", id="huge-int"),
    pytest.param({"a": float("nan")}, "finite", id="nan"),
    pytest.param({"a": "x" * 20_000}, "larger than", id="too-large"),
    pytest.param(["a"], "mapping", id="not-a-mapping"),
    pytest.param("case=1", "mapping", id="a-string"),
])
@pytest.mark.parametrize("many", [False, True], ids=["enroll", "enroll_many"])
def test_bad_metadata(loaded: bt.TemplateStore, metadata: object, keyword: str,
                      many: bool) -> None:
    call = (_enrol_many(metadata=metadata) if many else _enrol(metadata=metadata))
    refused(loaded, call, bt.InvalidInput, keyword)


ACTOR_CALLS = [
    pytest.param(lambda s, a: s.enroll(GOOD, subject_id="NEW", actor=a, **WATCH), id="enroll"),
    pytest.param(lambda s, a: s.enroll_many(BATCH, subject_ids=["A", "B", "C"], actor=a,
                                            **WATCH), id="enroll_many"),
    pytest.param(lambda s, a: s.search(GOOD, purpose="watchlist", actor=a), id="search"),
    pytest.param(lambda s, a: s.verify(GOOD, subject_id="P-000041", purpose="rare", actor=a),
                 id="verify"),
    pytest.param(lambda s, a: s.export_subject("P-000003", actor=a), id="export"),
    pytest.param(lambda s, a: s.erase_subject("P-000003", actor=a), id="erase"),
    pytest.param(lambda s, a: s.delete("00" * 16, actor=a), id="delete"),
    pytest.param(lambda s, a: s.place_hold("P-000003", actor=a, reason="r"), id="hold"),
    pytest.param(lambda s, a: s.release_hold("P-000001", actor=a, reason="r"), id="release"),
    pytest.param(lambda s, a: s.set_policy(s.policy, actor=a), id="set_policy"),
    pytest.param(lambda s, a: s.confirm_match(1, "00" * 16, reviewer=a), id="confirm"),
]



@pytest.mark.parametrize("actor", [
    pytest.param(None, id="None"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param(17, id="int"),
    pytest.param(b"svc", id="bytes"),
    pytest.param(["svc"], id="list"),
    pytest.param("x" * 10_000, id="huge"),
])
@pytest.mark.parametrize("call", ACTOR_CALLS)
def test_bad_actor(loaded: bt.TemplateStore, call: Callable[..., Any], actor: object,
                   request: pytest.FixtureRequest) -> None:
    # the message names the argument to fix: confirm_match calls its actor ``reviewer``
    keyword = "reviewer" if "confirm" in request.node.callspec.id else "actor"
    refused(loaded, lambda s: call(s, actor), bt.InvalidInput, keyword)


ACTOR_EVENTS = {"enroll": "enroll", "enroll_many": "enroll", "search": "search",
                "verify": "verify", "export": "export", "erase": "erase", "delete": "delete",
                "hold": "hold", "release": "release", "set_policy": "policy",
                "confirm": "confirm"}


@pytest.mark.parametrize("actor", [
    pytest.param(None, id="None"),
    pytest.param("", id="empty"),
    pytest.param("  ", id="blank"),
    pytest.param(17, id="int"),
    pytest.param("x" * 5000, id="5000-chars"),
])
@pytest.mark.parametrize("call", ACTOR_CALLS)
def test_a_call_refused_for_its_actor_is_audited(loaded: bt.TemplateStore,
                                                 call: Callable[..., Any], actor: object,
                                                 request: pytest.FixtureRequest) -> None:
    """Review finding (issue 9, item 7.2): "every refused call is audited" held only for
    callers with a valid actor. The refusal is audited with no actor and a flag."""
    before = loaded.audit.verify().entries
    with pytest.raises(bt.InvalidInput):
        call(loaded, actor)
    assert loaded.audit.verify().entries == before + 1
    entry = loaded.audit.get(before + 1)
    name = request.node.callspec.id.split("-")[0]
    assert entry.event == ACTOR_EVENTS[name]
    assert entry.outcome == "refused" and entry.actor is None
    assert entry.fields["actor_invalid"] is True and entry.fields["error"] == "InvalidInput"
    if isinstance(actor, str) and actor.strip():
        assert actor[:16] not in repr(dict(entry.fields))


@pytest.mark.parametrize("reviewer", [None, "", 17])
def test_bad_reviewer_is_named_reviewer(loaded: bt.TemplateStore, reviewer: object) -> None:
    # confirm_match has no ``actor`` argument: the message must name the one to fix.
    res = loaded.search(probes_of_loaded(), purpose="watchlist", k=5, actor="a")
    rid = res.candidates[0].record_id
    refused(loaded, lambda s: s.confirm_match(res.audit_seq, rid, reviewer=reviewer),
            bt.InvalidInput, "reviewer")


@pytest.mark.parametrize("audit_seq", [
    pytest.param("7", id="str"),
    pytest.param(True, id="bool"),
    pytest.param(7.0, id="float"),
    pytest.param(None, id="None"),
])
def test_confirm_match_bad_audit_seq_is_refused_and_audited(fresh: bt.TemplateStore,
                                                            audit_seq: object) -> None:
    loaded = fresh
    res = loaded.search(probes_of_loaded(), purpose="watchlist", k=5, actor="a")
    rid = res.candidates[0].record_id
    before = loaded.audit.verify().entries
    refused(loaded, lambda s: s.confirm_match(audit_seq, rid, reviewer="officer-2"),
            bt.InvalidInput, "audit_seq")
    # the refusal of a known reviewer is audited (fingerprint adds 2 entries itself)
    entries = [loaded.audit.get(seq) for seq in range(before + 1,
                                                      loaded.audit.verify().entries + 1)]
    mine = [e for e in entries if e.event == "confirm"]
    assert len(mine) == 1 and mine[0].outcome == "refused" and mine[0].actor == "officer-2"


@pytest.mark.parametrize("audit_seq", [10**9, 0, -1])
def test_confirm_match_unknown_audit_seq(fresh: bt.TemplateStore, audit_seq: int) -> None:
    loaded = fresh
    rid = loaded.search(probes_of_loaded(), purpose="watchlist", k=5,
                        actor="a").candidates[0].record_id
    before = loaded.audit.verify().entries
    with pytest.raises(bt.RecordNotFound):
        loaded.confirm_match(audit_seq, rid, reviewer="officer-2")
    assert loaded.audit.verify().entries == before + 1
    assert loaded.audit.get(before + 1).outcome == "refused"


def test_actor_omitted(loaded: bt.TemplateStore) -> None:
    # A missing keyword-only argument is refused by Python itself (TypeError) before the
    # library runs; the store must be unchanged all the same.
    before = fingerprint(loaded)
    with pytest.raises(TypeError, match="actor"):
        loaded.enroll(GOOD, subject_id="NEW", **WATCH)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="actor"):
        loaded.search(GOOD, purpose="watchlist")  # type: ignore[call-arg]
    assert fingerprint(loaded) == before


# --- nothing secret in errors and reprs -----------------------------------------------------


def test_reprs_hold_no_subject_ids_or_templates(store: bt.TemplateStore,
                                                gallery: Gallery) -> None:
    t = gallery.templates[0]
    store.enroll(t, subject_id=SECRET, purposes=["rare"], metadata={"k": "v"}, actor="svc")
    res = store.search(probes(gallery, [0])[0], purpose="rare", k=5, actor="a")
    (cand,) = res.candidates
    assert cand.subject_id == SECRET  # the caller gets it, but logs do not
    v = store.verify(t, subject_id=SECRET, purpose="rare", actor="a")
    (view,) = store.export_subject(SECRET, actor="dpo")
    for obj in (store, cand, res, v, view, store.stats(), store.audit.verify(),
                store.audit.checkpoint()):
        for text in (repr(obj), str(obj)):
            assert SECRET not in text
            assert f"{t[0]:.4f}" not in text and f"{t[1]:.4f}" not in text
    receipt = store.erase_subject(SECRET, actor="dpo")
    assert SECRET not in repr(receipt)


def _secret_calls() -> list[Any]:
    t = np.full(DIM, 0.987654321)
    nan = t.copy()
    nan[0] = np.nan
    return [
        pytest.param(lambda s: s.verify(GOOD, subject_id=SECRET, purpose="rare", actor="a"),
                     bt.RecordNotFound, id="verify-unknown"),
        pytest.param(lambda s: s.verify(GOOD, subject_id="P-000003", purpose="rare",
                                        actor="a"), bt.RecordNotFound, id="verify-no-purpose"),
        pytest.param(lambda s: s.verify(t[:10], subject_id=SECRET, purpose="rare", actor="a"),
                     bt.InvalidTemplate, id="verify-bad-probe"),
        pytest.param(lambda s: s.enroll(t, subject_id=SECRET, purposes=["rare"],
                                        ttl=timedelta(days=365), actor="svc"),
                     bt.PolicyViolation, id="enroll-ttl"),
        pytest.param(lambda s: s.enroll(nan, subject_id=SECRET, purposes=["rare"],
                                        actor="svc"), bt.InvalidTemplate, id="enroll-nan"),
        pytest.param(lambda s: s.enroll(t[:10], subject_id=SECRET, purposes=["rare"],
                                        actor="svc"), bt.InvalidTemplate, id="enroll-dim"),
        pytest.param(lambda s: s.enroll(t, subject_id=SECRET, purposes=["watchlist"],
                                        ttl=timedelta(days=1), source="x", actor="svc"),
                     bt.PolicyViolation, id="enroll-source"),
        pytest.param(lambda s: s.enroll(t, subject_id=SECRET, purposes=["nope"],
                                        actor="svc"), bt.PolicyViolation, id="enroll-purpose"),
        pytest.param(lambda s: s.enroll_many(np.vstack([t, nan]), subject_ids=[SECRET, "B"],
                                             purposes=["rare"], actor="svc"),
                     bt.InvalidTemplate, id="enroll-many-nan"),
        pytest.param(lambda s: s.enroll_many(np.vstack([t, t]), subject_ids=[SECRET],
                                             purposes=["rare"], actor="svc"),
                     bt.InvalidInput, id="enroll-many-mismatch"),
        pytest.param(lambda s: s.place_hold(SECRET, actor="legal", reason="r"),
                     bt.RecordNotFound, id="hold-unknown"),
        pytest.param(lambda s: s.release_hold(SECRET, actor="legal", reason="r"),
                     bt.PolicyViolation, id="release-not-held"),
        pytest.param(lambda s: s.erase_subject("P-000001", actor="dpo"),
                     bt.PolicyViolation, id="erase-held"),
        pytest.param(lambda s: s.search(nan, purpose="watchlist", actor="a"),
                     bt.InvalidTemplate, id="search-nan"),
    ]


@pytest.mark.parametrize(("call", "exc"), _secret_calls())
def test_errors_hold_no_subject_ids_or_template_values(fresh: bt.TemplateStore,
                                                       store_dir: Path, call: Call,
                                                       exc: type[Exception]) -> None:
    loaded = fresh
    with pytest.raises(exc) as info:
        call(loaded)
    err = info.value
    for text in (str(err), repr(err), *map(str, err.args)):
        assert SECRET not in text and "P-000001" not in text and "P-000003" not in text
        assert "0.9876" not in text and "0.98765" not in text
    loaded.close()
    blob = b"".join(f.read_bytes() for f in store_dir.iterdir() if f.is_file())
    assert SECRET.encode() not in blob  # nor in the audit trail of the refusal


# --- regressions found in review ---------------------------------------------------------


def test_nested_metadata_must_decode_or_is_refused(store, gallery) -> None:
    before = store.stats().records
    for bad in ({"a": {1: 2}}, {"a": [{2: 3}]}):
        with pytest.raises(bt.InvalidInput, match="metadata"):
            store.enroll(gallery.templates[0], subject_id="M", metadata=bad, actor="t",
                         **WATCH)
    assert store.stats().records == before
    store.enroll(gallery.templates[0], subject_id="M", metadata={"a": {"b": [1, 2]}},
                 actor="t", **WATCH)
    assert store.export_subject("M", actor="t")[0].metadata == {"a": {"b": [1, 2]}}


def test_policy_errors_never_echo_a_template(store, gallery) -> None:
    probe = gallery.templates[0]
    with pytest.raises(bt.BiotemplateError) as info:
        store.search(probe, purpose=probe, actor="t")  # type: ignore[arg-type]
    assert f"{probe[0]:.3f}"[:5] not in str(info.value)
    with pytest.raises(bt.BiotemplateError) as info:
        store.enroll(probe, subject_id="X", purposes=[probe], actor="t")  # type: ignore[list-item]
    assert f"{probe[0]:.4f}" not in str(info.value) and "[" not in str(info.value)


def test_a_refusal_with_a_malformed_reason_is_still_audited(store, gallery) -> None:
    before = store.audit.verify().entries
    with pytest.raises(bt.InvalidInput):
        store.search(gallery.templates[0], purpose="watchlist", actor="t", reason="\ud800")
    assert store.audit.verify().entries == before + 1


def test_normalised_probe_keeps_float32(store, gallery) -> None:
    res = store.search(np.asarray(gallery.templates[0], dtype=np.float64),
                       purpose="watchlist", actor="t")
    assert isinstance(res.decision, bool)
