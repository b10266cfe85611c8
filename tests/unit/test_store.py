"""TemplateStore end to end, against the contract in README.md (and SECURITY.md §3 on backups).

Small galleries (50 subjects x 2 samples, dim 64) and a FakeClock keep this fast.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from copies import backup_records, read_with

import biotemplate as bt
from biotemplate import snapshot as snapshot_module
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.keyring import Keyring
from biotemplate.synthetic import Gallery, make_gallery, probes, strangers

DIM = 64
MODEL = "test-model-v1"
WATCH = {"purposes": ["watchlist"], "ttl": timedelta(days=30), "source": "enrolment-desk-1"}


# --- helpers --------------------------------------------------------------------------


@pytest.fixture(params=["exact", "hnsw"])
def sstore(request: pytest.FixtureRequest, store_dir: Path, policy: bt.RetentionPolicy,
           keys: Any, clock: Any) -> Iterator[bt.TemplateStore]:
    """A store searched exactly (the default at this size) or through the HNSW graph."""
    params = bt.IndexParams(exact_cutoff=0) if request.param == "hnsw" else None
    s = bt.TemplateStore.create(store_dir, dim=DIM, model="test-model-v1", policy=policy,
                                key_provider=keys, clock=clock, index_params=params)
    yield s
    s.close()


def enrol_gallery(store: bt.TemplateStore, gallery: Gallery) -> list[str]:
    return store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                             actor="svc-enrol", **WATCH)


def probe(gallery: Gallery, i: int) -> np.ndarray:
    return probes(gallery, [i])[0]


def stranger(seed: int = 2) -> np.ndarray:
    return strangers(1, DIM, seed=seed)[0]


def entries(store: bt.TemplateStore) -> int:
    report = store.audit.verify()
    assert report.ok, report.problems
    return report.entries


@contextmanager
def adds_one_entry(store: bt.TemplateStore) -> Iterator[None]:
    before = entries(store)
    yield
    assert entries(store) == before + 1


def search_ids(store: bt.TemplateStore, p: np.ndarray, purpose: str = "watchlist",
               k: int = 20) -> list[str]:
    res = store.search(p, purpose=purpose, k=k, actor="analyst", mode="investigation")
    return [c.subject_id for c in res.candidates]


def restore_records(store_dir: Path, copy: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_dir / 'records.db'}{suffix}").unlink(missing_ok=True)
    shutil.copy(copy, store_dir / "records.db")


def audit_rows(store_dir: Path) -> int:
    con = sqlite3.connect(f"file:{store_dir / 'audit.db'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
    finally:
        con.close()


# --- lifecycle ------------------------------------------------------------------------


def test_create_open_round_trip(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                clock: Any, policy: bt.RetentionPolicy,
                                gallery: Gallery) -> None:
    ids = enrol_gallery(store, gallery)
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert again.dim == DIM and again.model == "test-model-v1"
        assert again.policy == policy
        assert again.stats().records == len(ids)
        res = again.search(probe(gallery, 7), purpose="watchlist", k=5, actor="a")
        assert res.candidates[0].subject_id == "P-000007"
        assert res.candidates[0].record_id in ids


def test_create_twice_raises_store_exists(store: bt.TemplateStore, store_dir: Path,
                                          keys: Any, policy: bt.RetentionPolicy) -> None:
    with pytest.raises(bt.StoreExists):
        bt.TemplateStore.create(store_dir, dim=DIM, model="m", policy=policy, key_provider=keys)


def test_open_empty_dir_raises_store_not_found(tmp_path: Path, keys: Any) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "empty", key_provider=keys)
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "missing", key_provider=keys)


def test_context_manager_closes(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                clock: Any) -> None:
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().records == 0
    with pytest.raises(bt.BiotemplateError):
        s.stats()
    with pytest.raises(bt.BiotemplateError):
        s.enroll(stranger(), subject_id="X", purposes=["rare"], actor="a")
    s.close()  # a second close is harmless


# --- enrolment --------------------------------------------------------------------------


def test_enroll_and_enroll_many_return_ids(store: bt.TemplateStore, gallery: Gallery) -> None:
    rid = store.enroll(gallery.templates[0], subject_id="S-1", actor="svc", **WATCH)
    assert isinstance(rid, str) and rid
    rids = store.enroll_many(gallery.templates[:6], subject_ids=gallery.subject_ids[:6],
                             actor="svc", **WATCH)
    assert isinstance(rids, list) and len(rids) == 6
    assert all(isinstance(r, str) for r in rids)
    assert len({rid, *rids}) == 7
    assert store.stats().records == 7


def test_smallest_default_retention_applies(store: bt.TemplateStore, clock: Any,
                                            gallery: Gallery) -> None:
    # border-verification 12h and rare 7d both define a default: 12h applies
    store.enroll(gallery.templates[0], subject_id="S-1",
                 purposes=["rare", "border-verification"], actor="svc")
    # rare 7d is the only default; watchlist allows 3y
    store.enroll(gallery.templates[2], subject_id="S-2", purposes=["watchlist", "rare"],
                 source="case-file-9", actor="svc")
    (one,) = store.export_subject("S-1", actor="dpo")
    (two,) = store.export_subject("S-2", actor="dpo")
    assert one.expires_at == clock.now + timedelta(hours=12)
    assert two.expires_at == clock.now + timedelta(days=7)
    assert set(one.purposes) == {"rare", "border-verification"}


def test_default_retention_must_fit_the_smallest_max(store: bt.TemplateStore,
                                                     policy: bt.RetentionPolicy,
                                                     gallery: Gallery) -> None:
    d = policy.to_dict()
    d["purposes"]["short"] = {"max_retention": "1h", "modes": ["verification"],
                              "match_threshold": 0.6}
    store.set_policy(bt.RetentionPolicy.from_dict(d), actor="dpo")
    with pytest.raises(bt.PolicyViolation, match="max_retention"):
        store.enroll(gallery.templates[0], subject_id="S-1", purposes=["rare", "short"],
                     actor="svc")  # rare's default 7d > short's max 1h: no clamping
    assert store.stats().records == 0


def test_ttl_rules(store: bt.TemplateStore, gallery: Gallery) -> None:
    t = gallery.templates[0]
    with pytest.raises(bt.PolicyViolation, match="max_retention"):
        store.enroll(t, subject_id="S", purposes=["border-verification"],
                     ttl=timedelta(hours=13), actor="svc")
    with pytest.raises(bt.PolicyViolation, match="max_retention"):  # smallest max wins
        store.enroll(t, subject_id="S", purposes=["watchlist", "rare"],
                     ttl=timedelta(days=31), source="case-file", actor="svc")
    with pytest.raises(bt.PolicyViolation, match="ttl"):
        store.enroll(t, subject_id="S", purposes=["watchlist"], source="case-file",
                     actor="svc")
    assert store.stats().records == 0
    store.enroll(t, subject_id="S", purposes=["border-verification"],
                 ttl=timedelta(hours=12), actor="svc")  # exactly the maximum is fine
    assert store.stats().records == 1


def test_source_allow_list(store: bt.TemplateStore, gallery: Gallery) -> None:
    t = gallery.templates[0]
    for source in ("egate-7", None, "Enrolment-desk"):
        with pytest.raises(bt.PolicyViolation, match="source"):
            store.enroll(t, subject_id="S", purposes=["watchlist"], ttl=timedelta(days=1),
                         source=source, actor="svc")
    assert store.stats().records == 0
    store.enroll(t, subject_id="S", purposes=["watchlist"], ttl=timedelta(days=1),
                 source="case-file-118", actor="svc")
    assert store.stats().records == 1


# --- search -------------------------------------------------------------------------------


def check_result_types(res: bt.SearchResult) -> None:
    assert type(res.decision) is bool
    assert type(res.audit_seq) is int
    assert type(res.threshold) is float
    for c in res.candidates:
        assert type(c.score) is float
        assert type(c.above_threshold) is bool
        assert type(c.rank) is int
        assert -1.0 <= c.score <= 1.0


def test_identification_is_open_set(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    enrol_gallery(store, gallery)
    for i in (0, 7, 49):
        res = store.search(probe(gallery, i), purpose="watchlist", k=10, actor="analyst",
                           reason="case 1")
        check_result_types(res)
        assert res.mode == "identification" and res.threshold == 0.55
        assert res.candidates, "a mated probe is found"
        assert res.candidates[0].subject_id == f"P-{i:06d}"
        scores = [c.score for c in res.candidates]
        assert scores == sorted(scores, reverse=True)
        assert all(s >= res.threshold for s in scores)
        assert all(c.above_threshold for c in res.candidates)
        assert [c.rank for c in res.candidates] == list(range(1, len(scores) + 1))
        subjects = [c.subject_id for c in res.candidates]
        assert len(subjects) == len(set(subjects)), "one candidate per subject"
        assert res.decision is True


def test_best_record_per_subject(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    ids = enrol_gallery(store, gallery)
    p = probe(gallery, 3)
    res = store.search(p, purpose="watchlist", k=20, actor="a", mode="investigation")
    top = res.candidates[0]
    assert top.subject_id == "P-000003"
    own = [ids[j] for j, s in enumerate(gallery.subject_ids) if s == "P-000003"]
    rows = {ids[j]: gallery.templates[j] for j in range(len(ids))}
    best = max(own, key=lambda r: float(np.dot(rows[r], p)))
    assert top.record_id == best
    assert top.score == pytest.approx(float(np.dot(rows[best], p)), abs=1e-4)


def test_stranger_gets_no_candidates(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    enrol_gallery(store, gallery)
    res = store.search(stranger(), purpose="watchlist", k=10, actor="analyst")
    check_result_types(res)
    assert res.candidates == []
    assert res.decision is False


def test_investigation_marks_weak_candidates(sstore: bt.TemplateStore,
                                            gallery: Gallery) -> None:
    store = sstore
    enrol_gallery(store, gallery)
    res = store.search(stranger(), purpose="watchlist", k=5, actor="analyst",
                       mode="investigation")
    check_result_types(res)
    assert res.mode == "investigation"
    assert len(res.candidates) == 5
    assert all(c.above_threshold is False for c in res.candidates)
    assert res.decision is False
    assert len({c.subject_id for c in res.candidates}) == 5
    scores = [c.score for c in res.candidates]
    assert scores == sorted(scores, reverse=True)
    assert [c.rank for c in res.candidates] == [1, 2, 3, 4, 5]

    mated = store.search(probe(gallery, 9), purpose="watchlist", k=5, actor="analyst",
                         mode="investigation")
    assert mated.candidates[0].subject_id == "P-000009"
    assert mated.candidates[0].above_threshold is True
    assert [c.above_threshold for c in mated.candidates[1:]] == [False] * 4
    assert mated.decision is True


def test_k_is_capped_by_max_candidates(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    enrol_gallery(store, gallery)  # 50 subjects; watchlist max_candidates = 20
    res = store.search(stranger(), purpose="watchlist", k=1000, actor="a",
                       mode="investigation")
    assert len(res.candidates) == 20


def test_search_sees_only_its_purpose(store: bt.TemplateStore, gallery: Gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"], actor="svc")
    res = store.search(probe(gallery, 0), purpose="watchlist", k=5, actor="a",
                       mode="investigation")
    assert res.candidates == []
    res = store.search(probe(gallery, 0), purpose="rare", k=5, actor="a")
    assert [c.subject_id for c in res.candidates] == ["P-000000"]


def test_mode_not_allowed(store: bt.TemplateStore, gallery: Gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="T-1", purposes=["border-verification"],
                 actor="svc")
    for mode in ("identification", "investigation"):
        with pytest.raises(bt.PolicyViolation):
            store.search(probe(gallery, 0), purpose="border-verification", k=1, actor="a",
                         mode=mode)
    enrol_gallery(store, gallery)
    with pytest.raises(bt.PolicyViolation):  # watchlist has no verification mode
        store.verify(probe(gallery, 0), subject_id="P-000000", purpose="watchlist",
                     actor="a")


# --- verification -----------------------------------------------------------------------


def test_verify(store: bt.TemplateStore, gallery: Gallery) -> None:
    rids = store.enroll_many(gallery.templates[:4], subject_ids=gallery.subject_ids[:4],
                             purposes=["border-verification"], actor="svc")
    v = store.verify(probe(gallery, 1), subject_id="P-000001",
                     purpose="border-verification", actor="egate-7")
    assert v.match is True
    assert type(v.match) is bool and type(v.score) is float and type(v.audit_seq) is int
    assert v.score >= 0.6 and v.threshold == 0.6
    assert v.record_id in rids[2:4]
    no = store.verify(stranger(), subject_id="P-000001", purpose="border-verification",
                      actor="egate-7")
    assert no.match is False and type(no.match) is bool and no.score < 0.6
    no = store.verify(probe(gallery, 0), subject_id="P-000001",
                      purpose="border-verification", actor="egate-7")
    assert no.match is False
    with pytest.raises(bt.RecordNotFound):
        store.verify(probe(gallery, 1), subject_id="P-999999",
                     purpose="border-verification", actor="egate-7")
    with pytest.raises(bt.RecordNotFound):  # enrolled, but not for this purpose
        store.verify(probe(gallery, 1), subject_id="P-000001", purpose="rare",
                     actor="egate-7")


# --- expiry, purge, holds ---------------------------------------------------------------


def test_clock_set_back_does_not_unexpire(store: bt.TemplateStore, clock: Any,
                                          gallery: Gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"],
                 ttl=timedelta(hours=1), actor="svc")
    clock.advance(hours=2)
    assert store.export_subject("P-000000", actor="dpo") == []
    clock.advance(hours=-2)  # someone sets the clock back
    assert store.export_subject("P-000000", actor="dpo") == []
    assert search_ids(store, probe(gallery, 0), "rare") == []
    with pytest.raises(bt.RecordNotFound):
        store.verify(probe(gallery, 0), subject_id="P-000000", purpose="rare", actor="a")


def test_expired_record_is_never_returned_before_purge(sstore: bt.TemplateStore, clock: Any,
                                                       gallery: Gallery) -> None:
    store = sstore
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"],
                 ttl=timedelta(hours=1), actor="svc")
    store.enroll(gallery.templates[2], subject_id="P-000001", purposes=["rare"], actor="svc")
    p = probe(gallery, 0)
    assert search_ids(store, p, "rare") == ["P-000000", "P-000001"]
    clock.advance(hours=1)  # expiry is "at or before now"
    assert store.stats().records == 2  # not purged yet
    assert search_ids(store, p, "rare") == ["P-000001"]
    assert store.search(p, purpose="rare", k=5, actor="a").candidates == []
    with pytest.raises(bt.RecordNotFound):
        store.verify(p, subject_id="P-000000", purpose="rare", actor="a")
    assert store.export_subject("P-000000", actor="dpo") == []
    assert len(store.export_subject("P-000001", actor="dpo")) == 1
    store.rebuild_index()
    assert search_ids(store, p, "rare") == ["P-000001"]


def test_purge_expired_report(store: bt.TemplateStore, clock: Any, gallery: Gallery) -> None:
    store.enroll_many(gallery.templates[:3], subject_ids=["A", "B", "C"], purposes=["rare"],
                      ttl=timedelta(hours=1), actor="svc")
    store.enroll_many(gallery.templates[3:5], subject_ids=["D", "E"], purposes=["rare"],
                      actor="svc")
    assert store.purge_expired().purged == 0
    clock.advance(hours=2)
    report = store.purge_expired()
    assert report.purged == 3 and report.held_retained == 0
    assert report.subject_keys_destroyed == 3
    assert report.at == clock.now
    assert type(report.audit_seq) is int
    assert store.stats().records == 2 and store.stats().subjects == 2
    assert store.purge_expired().purged == 0
    clock.advance(days=3)  # past the epoch: the ratchet moves
    report = store.purge_expired()
    assert report.epoch_after > report.epoch_before
    assert store.stats().records == 2


def test_legal_hold(sstore: bt.TemplateStore, clock: Any, gallery: Gallery) -> None:
    store = sstore
    rid = store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"],
                       ttl=timedelta(hours=1), actor="svc")
    store.enroll(gallery.templates[2], subject_id="P-000001", purposes=["rare"],
                 ttl=timedelta(hours=1), actor="svc")
    assert store.place_hold("P-000000", actor="legal", reason="case 7").records == 1
    p = probe(gallery, 0)
    (view,) = store.export_subject("P-000000", actor="legal")
    assert view.held is True
    with pytest.raises(bt.PolicyViolation):
        store.erase_subject("P-000000", actor="dpo", reason="art 17")
    with pytest.raises(bt.PolicyViolation):
        store.delete(rid, actor="dpo")
    assert search_ids(store, p, "rare")[0] == "P-000000"  # live and held: still searchable

    clock.advance(days=3)  # expired, and past its epoch
    report = store.purge_expired()
    assert report.purged == 1 and report.held_retained == 1
    assert store.stats().records == 1
    (view,) = store.export_subject("P-000000", actor="legal")  # for the proceeding
    assert view.record_id == rid and view.held is True
    np.testing.assert_allclose(view.template, gallery.templates[0], atol=1e-6)
    assert search_ids(store, p, "rare") == []  # expired: never searched
    with pytest.raises(bt.RecordNotFound):
        store.verify(p, subject_id="P-000000", purpose="rare", actor="a")
    with pytest.raises(bt.PolicyViolation):
        store.erase_subject("P-000000", actor="dpo", reason="art 17")

    assert store.release_hold("P-000000", actor="legal", reason="closed").records == 1
    assert store.export_subject("P-000000", actor="legal") == []  # expired, no longer held
    report = store.purge_expired()
    assert report.purged == 1 and report.held_retained == 0
    assert store.stats().records == 0
    assert store.stats().held_subjects == 0


def test_hold_survives_reopen_and_release_of_live_record(store: bt.TemplateStore,
                                                         store_dir: Path, keys: Any,
                                                         clock: Any, gallery: Gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"], actor="svc")
    store.place_hold("P-000000", actor="legal", reason="case 7")
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().held_subjects == 1
        assert search_ids(s, probe(gallery, 0), "rare") == ["P-000000"]
        s.release_hold("P-000000", actor="legal", reason="closed")
        (view,) = s.export_subject("P-000000", actor="dpo")
        assert view.held is False
        with pytest.raises(bt.PolicyViolation):
            s.release_hold("P-000000", actor="legal", reason="twice")
        assert s.erase_subject("P-000000", actor="dpo").records_erased == 1
        with pytest.raises(bt.RecordNotFound):
            s.place_hold("nobody", actor="legal", reason="x")


# --- erasure, export, delete ------------------------------------------------------------


def test_erase_subject(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    enrol_gallery(store, gallery)
    p = probe(gallery, 5)
    assert "P-000005" in search_ids(store, p)
    receipt = store.erase_subject("P-000005", actor="dpo", reason="GDPR Art. 17 request 55")
    assert receipt.records_erased == 2 and receipt.key_destroyed is True
    assert type(receipt.audit_seq) is int
    assert "P-000005" not in search_ids(store, p)
    assert store.export_subject("P-000005", actor="dpo") == []
    with pytest.raises(bt.RecordNotFound):
        store.verify(p, subject_id="P-000005", purpose="rare", actor="a")
    assert store.stats().records == 98
    again = store.erase_subject("P-000005", actor="dpo", reason="repeat")
    assert again.records_erased == 0 and again.key_destroyed is False
    assert again.subject_ref == receipt.subject_ref
    unknown = store.erase_subject("P-999999", actor="dpo")
    assert unknown.records_erased == 0
    store.rebuild_index()
    assert "P-000005" not in search_ids(store, p)


def test_export_subject(store: bt.TemplateStore, clock: Any, gallery: Gallery) -> None:
    assert store.export_subject("P-000000", actor="dpo") == []
    rid = store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["watchlist"],
                       ttl=timedelta(days=30), source="case-file-1",
                       metadata={"case": "118", "n": 3}, actor="svc")
    (view,) = store.export_subject("P-000000", actor="dpo", reason="Art. 15")
    assert view.record_id == rid and view.subject_id == "P-000000"
    assert view.purposes == ("watchlist",)
    assert view.source == "case-file-1"
    assert dict(view.metadata) == {"case": "118", "n": 3}
    assert view.created_at == clock.now
    assert view.expires_at == clock.now + timedelta(days=30)
    assert view.template.dtype == np.float32 and view.template.shape == (DIM,)
    np.testing.assert_array_equal(view.template, gallery.templates[0])
    assert store.export_subject("P-000001", actor="dpo") == []


NFC, NFD = unicodedata.normalize("NFC", "José Müller"), unicodedata.normalize("NFD",
                                                                              "José Müller")


@pytest.mark.parametrize(("enrolled", "asked"), [(NFC, NFD), (NFD, NFC)],
                         ids=["enrolled-NFC-asked-NFD", "enrolled-NFD-asked-NFC"])
def test_subject_ids_are_normalised_to_nfc(store: bt.TemplateStore, gallery: Gallery,
                                           enrolled: str, asked: str) -> None:
    """Review finding (issue 9, item 7.3): erase_subject("José") in NFD erased 0 records
    of an NFC-enrolled "José", silently. Canonically equivalent ids name one subject."""
    assert enrolled != asked and len(enrolled) != len(asked)
    store.enroll(gallery.templates[0], subject_id=enrolled, purposes=["rare"], actor="svc")
    store.enroll_many(gallery.templates[1:3], subject_ids=[asked, enrolled],
                      purposes=["rare"], actor="svc")
    assert store.stats().subjects == 1
    views = store.export_subject(asked, actor="dpo")
    assert len(views) == 3 and {v.subject_id for v in views} == {NFC}  # stored as NFC
    (cand,) = store.search(probe(gallery, 0), purpose="rare", actor="a").candidates
    assert cand.subject_id == NFC
    assert store.verify(probe(gallery, 0), subject_id=asked, purpose="rare", actor="a").match
    held = store.place_hold(asked, actor="legal", reason="case 1")
    assert held.records == 3
    with pytest.raises(bt.PolicyViolation):
        store.erase_subject(enrolled, actor="dpo")
    store.release_hold(enrolled, actor="legal", reason="case 1 closed")
    receipt = store.erase_subject(asked, actor="dpo")
    assert receipt.records_erased == 3 and receipt.key_destroyed
    assert receipt.subject_ref == held.subject_ref
    assert store.export_subject(enrolled, actor="dpo") == []
    assert store.stats().records == 0


def test_a_subject_id_over_the_limit_after_nfc_is_refused(store: bt.TemplateStore,
                                                          gallery: Gallery) -> None:
    # U+0958 has no composed form: NFC spells it as two code points
    sid = "\u0958" * 200
    assert len(unicodedata.normalize("NFC", sid)) == 400
    with pytest.raises(bt.InvalidInput, match="longer than"):
        store.enroll(gallery.templates[0], subject_id=sid, purposes=["rare"], actor="svc")
    assert store.stats().records == 0


def test_delete(sstore: bt.TemplateStore, gallery: Gallery) -> None:
    store = sstore
    ids = enrol_gallery(store, gallery)
    p = probe(gallery, 4)
    own = [ids[j] for j, s in enumerate(gallery.subject_ids) if s == "P-000004"]
    first = store.search(p, purpose="watchlist", k=5, actor="a").candidates[0]
    assert first.subject_id == "P-000004"
    store.delete(first.record_id, actor="dpo", reason="wrong capture")
    res = store.search(p, purpose="watchlist", k=20, actor="a", mode="investigation")
    assert first.record_id not in [c.record_id for c in res.candidates]
    (other,) = (r for r in own if r != first.record_id)
    assert res.candidates[0].record_id == other
    store.delete(other, actor="dpo")
    res = store.search(p, purpose="watchlist", k=20, actor="a", mode="investigation")
    assert not {c.record_id for c in res.candidates} & set(own)
    assert store.export_subject("P-000004", actor="dpo") == []
    with pytest.raises(bt.RecordNotFound):
        store.delete(other, actor="dpo")
    with pytest.raises(bt.RecordNotFound):
        store.delete("00" * 16, actor="dpo")
    store.rebuild_index()
    res = store.search(p, purpose="watchlist", k=20, actor="a", mode="investigation")
    assert not {c.record_id for c in res.candidates} & set(own)


# --- policy changes -----------------------------------------------------------------------


def test_set_policy(store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any,
                    policy: bt.RetentionPolicy, gallery: Gallery) -> None:
    d = policy.to_dict()
    d["purposes"]["access-control"] = {"max_retention": "90d", "default_retention": "30d",
                                       "modes": ["verification"], "match_threshold": 0.7}
    new = bt.RetentionPolicy.from_dict(d)
    store.set_policy(new, actor="dpo", reason="new site")
    assert store.policy == new
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["access-control"],
                 actor="svc")
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.policy == new
        assert "access-control" in s.policy.purposes
        v = s.verify(probe(gallery, 0), subject_id="P-000000", purpose="access-control",
                     actor="door-3")
        assert v.match is True and v.threshold == 0.7

        d["epoch"] = "2d"
        with pytest.raises(bt.PolicyViolation, match="epoch"):
            s.set_policy(bt.RetentionPolicy.from_dict(d), actor="dpo")
        assert s.policy == new


# --- human review ---------------------------------------------------------------------------


def test_confirm_match(store: bt.TemplateStore, gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    res = store.search(probe(gallery, 2), purpose="watchlist", k=5, actor="analyst")
    top = res.candidates[0].record_id
    one = store.confirm_match(res.audit_seq, top, reviewer="officer-2")
    assert one.two_person_confirmed is False and one.reviewers == ("officer-2",)
    same = store.confirm_match(res.audit_seq, top, reviewer="officer-2")
    assert same.two_person_confirmed is False and same.reviewers == ("officer-2",)
    two = store.confirm_match(res.audit_seq, top, reviewer="officer-9")
    assert two.two_person_confirmed is True
    assert set(two.reviewers) == {"officer-2", "officer-9"}
    assert two.search_seq == res.audit_seq and two.record_id == top
    assert type(two.audit_seq) is int
    other = next(r for r in enrol_gallery(store, make_gallery(1, 1, DIM, seed=99, prefix="Q-"))
                 if r not in {c.record_id for c in res.candidates})
    with pytest.raises(bt.PolicyViolation):
        store.confirm_match(res.audit_seq, other, reviewer="officer-2")
    with pytest.raises(bt.RecordNotFound):  # an audit entry that is not a search
        store.confirm_match(two.audit_seq, top, reviewer="officer-2")


# --- maintenance ---------------------------------------------------------------------------


def test_rebuild_index(store: bt.TemplateStore, clock: Any, gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    store.enroll(gallery.templates[0], subject_id="X", purposes=["rare"],
                 ttl=timedelta(hours=1), actor="svc")
    assert store.rebuild_index().records == 101
    clock.advance(hours=2)
    assert store.rebuild_index().records == 100  # the expired record is not indexed
    res = store.search(probe(gallery, 11), purpose="watchlist", k=5, actor="a")
    assert res.candidates[0].subject_id == "P-000011"


def test_stats_counts_and_no_subject_ids(store: bt.TemplateStore, gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    store.place_hold("P-000001", actor="legal", reason="case")
    stats = store.stats()
    assert stats.records == 100 and stats.subjects == 50
    assert stats.dim == DIM and stats.model == "test-model-v1"
    assert stats.held_subjects == 1
    assert stats.epoch_seconds == 86400
    assert stats.shredded_rows == 0 and stats.integrity_failures == 0
    text = repr(stats)
    assert "P-0000" not in text


def test_subject_ids_and_probes_are_not_on_disk_in_clear(store: bt.TemplateStore,
                                                         store_dir: Path,
                                                         gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    p = probe(gallery, 3)
    store.search(p, purpose="watchlist", k=5, actor="a")
    store.export_subject("P-000003", actor="dpo")
    store.close()
    blob = b"".join(f.read_bytes() for f in store_dir.iterdir() if f.is_file())
    assert b"P-000003" not in blob and b"P-0000" not in blob
    assert p.astype("<f4").tobytes()[:16] not in blob
    assert gallery.templates[0].astype("<f4").tobytes()[:16] not in blob


# --- audit -----------------------------------------------------------------------------------


def test_audit_verify_after_workload(store: bt.TemplateStore, store_dir: Path, clock: Any,
                                     gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    store.search(probe(gallery, 1), purpose="watchlist", k=5, actor="a")
    store.export_subject("P-000001", actor="dpo")
    store.erase_subject("P-000002", actor="dpo")
    clock.advance(days=40)
    store.purge_expired()
    report = store.audit.verify()
    assert report.ok is True and report.problems == ()
    assert type(report.entries) is int
    assert report.entries == audit_rows(store_dir)
    cp = store.audit.checkpoint()
    assert cp.seq == report.entries
    assert store.audit.verify(checkpoint=cp).ok is True
    store.search(stranger(), purpose="watchlist", k=5, actor="a")  # the trail goes on
    assert store.audit.verify(checkpoint=cp).ok is True


def test_every_call_adds_an_audit_entry(store: bt.TemplateStore, clock: Any,
                                        policy: bt.RetentionPolicy, gallery: Gallery) -> None:
    g = gallery
    with adds_one_entry(store):
        rid = store.enroll(g.templates[0], subject_id="P-000000", actor="svc", **WATCH)
    with adds_one_entry(store):
        store.enroll_many(g.templates[2:20], subject_ids=g.subject_ids[2:20], actor="svc",
                          **WATCH)
    store.enroll(g.templates[1], subject_id="P-000000", purposes=["rare"], actor="svc")
    with adds_one_entry(store):
        res = store.search(probe(g, 0), purpose="watchlist", k=5, actor="a")
    with adds_one_entry(store):
        store.verify(probe(g, 0), subject_id="P-000000", purpose="rare", actor="a")
    with adds_one_entry(store):
        store.export_subject("P-000000", actor="dpo")
    with adds_one_entry(store):
        store.confirm_match(res.audit_seq, res.candidates[0].record_id, reviewer="o-1")
    with adds_one_entry(store):
        store.place_hold("P-000000", actor="legal", reason="case")
    with adds_one_entry(store):
        store.release_hold("P-000000", actor="legal", reason="closed")
    with adds_one_entry(store):
        store.delete(rid, actor="dpo")
    with adds_one_entry(store):
        store.erase_subject("P-000002", actor="dpo")
    with adds_one_entry(store):
        store.erase_subject("P-000002", actor="dpo")  # idempotent, still audited
    clock.advance(days=8)
    with adds_one_entry(store):
        store.purge_expired()
    with adds_one_entry(store):
        store.set_policy(policy, actor="dpo", reason="same again")


def test_audit_times_come_from_the_injected_clock(store: bt.TemplateStore, clock: Any,
                                                  gallery: Gallery) -> None:
    clock.advance(days=400)  # far from the wall clock: any real-time read would show
    store.enroll(gallery.templates[0], subject_id="P-000000", purposes=["rare"], actor="svc")
    res = store.search(probe(gallery, 0), purpose="rare", k=5, actor="a")
    v = store.verify(probe(gallery, 0), subject_id="P-000000", purpose="rare", actor="a")
    for seq in (res.audit_seq, v.audit_seq, entries(store)):
        e = store.audit.get(seq)
        assert e.ts_start == clock.now and e.ts_end == clock.now, e.event


def test_refused_calls_are_audited(store: bt.TemplateStore, gallery: Gallery) -> None:
    enrol_gallery(store, gallery)
    cases = [
        lambda: store.search(probe(gallery, 0), purpose="border-verification", k=5,
                             actor="nosy"),
        lambda: store.search(probe(gallery, 0), purpose="no-such-purpose", k=5, actor="nosy"),
        lambda: store.verify(probe(gallery, 0), subject_id="P-000000", purpose="watchlist",
                             actor="nosy"),
        lambda: store.enroll(gallery.templates[0], subject_id="X", purposes=["watchlist"],
                             ttl=timedelta(days=1), source="egate", actor="nosy"),
        lambda: store.search(np.zeros(DIM), purpose="watchlist", k=5, actor="nosy"),
    ]
    for call in cases:
        before = entries(store)
        with pytest.raises(bt.BiotemplateError):
            call()
        assert entries(store) == before + 1
        last = store.audit.get(before + 1)
        assert last.outcome == "refused" and last.actor == "nosy"


# --- backups: an old copy of records.db yields nothing expired or erased (SECURITY.md §3) --


def _erase_and_expire_with_backups(store: bt.TemplateStore, store_dir: Path, clock: Any,
                                   tmp_path: Path, gallery: Gallery) -> dict[str, Path]:
    """Enrol, back up, erase P-000005, back up, expire the border records and purge."""
    enrol_gallery(store, gallery)  # watchlist, 30 days: 100 rows
    border = make_gallery(5, 1, DIM, seed=8, prefix="T-")
    store.enroll_many(border.templates, subject_ids=border.subject_ids,
                      purposes=["border-verification"], actor="egate")  # 12 hours
    copies = {"before-erasure": backup_records(store_dir, tmp_path / "before-erasure.db")}
    store.erase_subject("P-000005", actor="dpo", reason="Art. 17")
    copies["before-expiry"] = backup_records(store_dir, tmp_path / "before-expiry.db")
    clock.advance(days=2)  # border records expired and their epoch is past
    assert store.purge_expired().purged == 5
    store.close()
    return copies


# rows in the copy; of them dead: 2 of the erased subject (before erasure only) + 5 expired
ROWS = {"before-erasure": 105, "before-expiry": 103}


def _read_with_current_keys(store_dir: Path, keys: Any, copy: Path) -> dict[str, str]:
    """What an attacker holding the copy (its rows and its subject-key entries), the
    current keyring and the master key reads: subject id of every row that opens,
    "shredded" for every row whose key is gone: its epoch key, or the bucket key that
    sealed its subject's entry in the copy (that entry then fails to open)."""
    return read_with(store_dir / "keyring", keys, copy, model=MODEL, dim=DIM,
                     unreadable="shredded")


def _rotated_with(store_dir: Path, keys: Any, erased: str, gallery: Gallery) -> set[str]:
    """The other subjects of the erased subject's bucket: the erasure resealed their
    entries under the bucket's new key, so the copies of them in an older records.db
    died with the old key too (1,024 buckets: usually none)."""
    ring = Keyring.load(store_dir / "keyring", keys.master_key())
    bucket = ring.bucket_of(ring.subject_ref(erased))
    return {s for s in set(gallery.subject_ids) - {erased}
            if ring.bucket_of(ring.subject_ref(s)) == bucket}


def _check_old_copy(store_dir: Path, keys: Any, copy: Path, rows: int,
                    also_dead: set[str] | frozenset[str] = frozenset()) -> None:
    """The copy is refused by open (records.db older than the keyring), and read with
    the current key state it yields nothing erased or expired."""
    restore_records(store_dir, copy)
    with pytest.raises(bt.IntegrityError, match=r"records\.db is older than the keyring"):
        bt.TemplateStore.open(store_dir, key_provider=keys)
    seen = _read_with_current_keys(store_dir, keys, store_dir / "records.db")
    assert len(seen) == rows
    assert list(seen.values()).count("shredded") == rows - 98 + 2 * len(also_dead), (
        "the dead rows of this copy")
    assert "P-000005" not in seen.values()
    assert not any(s.startswith("T-") for s in seen.values())
    assert list(seen.values()).count("P-000006") == (0 if "P-000006" in also_dead else 2)


@pytest.mark.parametrize("which", sorted(ROWS))
def test_restored_backup_yields_nothing_erased_or_expired(store: bt.TemplateStore,
                                                         store_dir: Path, keys: Any,
                                                         clock: Any, tmp_path: Path,
                                                         gallery: Gallery, which: str) -> None:
    copies = _erase_and_expire_with_backups(store, store_dir, clock, tmp_path, gallery)
    rotated = _rotated_with(store_dir, keys, "P-000005", gallery)
    _check_old_copy(store_dir, keys, copies[which], ROWS[which],
                    rotated if which == "before-erasure" else set())


def test_restoring_one_backup_after_another(store: bt.TemplateStore, store_dir: Path,
                                            keys: Any, clock: Any, tmp_path: Path,
                                            gallery: Gallery) -> None:
    """An operator restores one copy, then another: each is refused as older than the
    keyring, and neither yields what was erased or expired since."""
    copies = _erase_and_expire_with_backups(store, store_dir, clock, tmp_path, gallery)
    rotated = _rotated_with(store_dir, keys, "P-000005", gallery)
    for which in ("before-erasure", "before-expiry"):
        _check_old_copy(store_dir, keys, copies[which], ROWS[which],
                        rotated if which == "before-erasure" else set())


def test_the_current_records_db_opens_again_after_a_refused_restore(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, tmp_path: Path,
        gallery: Gallery) -> None:
    """A refused restore changes nothing: putting the current file back opens as before."""
    copies = _erase_and_expire_with_backups(store, store_dir, clock, tmp_path, gallery)
    current = backup_records(store_dir, tmp_path / "current.db")
    _check_old_copy(store_dir, keys, copies["before-erasure"], ROWS["before-erasure"],
                    _rotated_with(store_dir, keys, "P-000005", gallery))
    restore_records(store_dir, current)
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert s.stats().records == 98 and s.stats().shredded_rows == 0
        assert s.export_subject("P-000005", actor="forensics") == []
        assert s.audit.verify().ok


@pytest.mark.parametrize("how", ["erase", "delete-last-record", "expire-and-purge"])
def test_old_folder_copy_does_not_resurrect_a_shredded_subject(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, tmp_path: Path,
        gallery: Gallery, how: str) -> None:
    """A copy of the whole folder (records.db through the backup API, and index.snapshot)
    taken before a subject's key is destroyed must not bring the subject back once it is
    restored beside the current keyring: open refuses the older records.db, its rows of
    the subject cannot be opened with the current keys, and neither can the snapshot."""
    enrol_gallery(store, gallery)
    rid = store.enroll(gallery.templates[10], subject_id="X-1", purposes=["watchlist", "rare"],
                       ttl=timedelta(hours=1), source="case-file", actor="svc")
    store.close()  # writes index.snapshot
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        assert "X-1" in search_ids(s, gallery.templates[10])
        backup_records(store_dir, tmp_path / "old.db")
        s.snapshot()
        shutil.copy(store_dir / "index.snapshot", tmp_path / "old.snapshot")
        if how == "erase":
            s.erase_subject("X-1", actor="dpo")
        elif how == "delete-last-record":
            s.delete(rid, actor="dpo", reason="wrong person")
        else:
            clock.advance(days=2)
            s.purge_expired()
        assert s.stats().subjects == 50  # X-1's key is gone
    restore_records(store_dir, tmp_path / "old.db")
    shutil.copy(tmp_path / "old.snapshot", store_dir / "index.snapshot")
    with pytest.raises(bt.IntegrityError, match=r"records\.db is older"):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    seen = _read_with_current_keys(store_dir, keys, store_dir / "records.db")
    assert seen[rid] == "shredded" and "X-1" not in seen.values()
    ring = Keyring.load(store_dir / "keyring", keys.master_key())
    with pytest.raises(bt.IntegrityError):  # the snapshot's key died with X-1's
        with snapshot_module.opened(store_dir / "index.snapshot", ring):
            pass


# --- keys ------------------------------------------------------------------------------------


def test_wrong_master_key(store: bt.TemplateStore, store_dir: Path, tmp_path: Path) -> None:
    store.close()
    other = bt.FileKeyProvider.generate(tmp_path / "other.key")
    with pytest.raises(bt.KeyUnavailable) as err:
        bt.TemplateStore.open(store_dir, key_provider=other)
    assert not isinstance(err.value, bt.IntegrityError)


# --- enrolment overlaps sealing with the index insert: what each failure leaves ---------


def test_a_failed_commit_leaves_nothing_searchable_and_no_new_key(
        sstore: bt.TemplateStore, gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index insert runs while the rows are sealed and committed; a failed commit
    erases what the insert added, so nothing of the batch is ever served."""

    enrol_gallery(sstore, gallery)
    subjects_before = sstore.stats().subjects

    def broken(self: Any, rows: Any) -> None:
        raise bt.StorageError("disk full")

    monkeypatch.setattr(SQLiteBackend, "insert", broken)
    newcomers = make_gallery(5, 1, DIM, seed=99, prefix="N-")
    with pytest.raises(bt.StorageError):
        sstore.enroll_many(newcomers.templates, subject_ids=newcomers.subject_ids,
                           actor="svc", **WATCH)
    monkeypatch.undo()
    assert sstore.stats().subjects == subjects_before
    assert sstore.stats().indexed == len(gallery.subject_ids)
    for i in range(5):
        assert not any(s.startswith("N-") for s in search_ids(sstore, newcomers.templates[i]))
    assert sstore.audit.verify().ok


def _enrol_while_hnswlib_fails(s: bt.TemplateStore, gallery: Gallery,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Enrol the gallery while hnswlib's insert fails (after the rows were committed)."""
    import biotemplate.index as index_module

    def broken(self: Any, *args: Any) -> None:
        raise RuntimeError("std::bad_alloc")

    with monkeypatch.context() as patch:
        patch.setattr(index_module.TemplateIndex, "_insert", broken)
        with pytest.raises(bt.BiotemplateError):
            enrol_gallery(s, gallery)


def test_an_index_failure_after_the_commit_keeps_the_rows_and_their_keys(
        store_dir: Path, policy: bt.RetentionPolicy, keys: Any, clock: Any,
        gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """hnswlib failing (e.g. out of memory) after the rows were committed: the call
    raises, the rows stay readable (their subject keys are kept), and the next open
    indexes them."""
    s = bt.TemplateStore.create(store_dir, dim=DIM, model="test-model-v1", policy=policy,
                                key_provider=keys, clock=clock)
    _enrol_while_hnswlib_fails(s, gallery, monkeypatch)
    assert s.stats().indexed == 0
    assert len(s.export_subject("P-000003", actor="dpo")) == 2  # committed, readable
    s.close()  # writes no snapshot: it would claim rows the index never took
    s = bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    assert "P-000003" in search_ids(s, probe(gallery, 3))
    s.close()


def test_an_explicit_snapshot_after_an_index_failure_rebuilds_first(
        store_dir: Path, policy: bt.RetentionPolicy, keys: Any, clock: Any,
        gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    s = bt.TemplateStore.create(store_dir, dim=DIM, model="test-model-v1", policy=policy,
                                key_provider=keys, clock=clock)
    _enrol_while_hnswlib_fails(s, gallery, monkeypatch)
    s.snapshot()
    assert "P-000003" in search_ids(s, probe(gallery, 3))
    s.close()
    s = bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    assert "P-000003" in search_ids(s, probe(gallery, 3))
    s.close()


# --- regressions found in review (each failed on the code before its fix) ---------------


def _enrol_first(store: bt.TemplateStore, gallery: Gallery, n: int = 20) -> list[str]:
    return store.enroll_many(gallery.templates[:n], subject_ids=gallery.subject_ids[:n],
                             actor="t", **WATCH)


def _subject_found(store: bt.TemplateStore, template: Any, subject: str) -> bool:
    res = store.search(template, purpose="watchlist", k=20, actor="t", mode="investigation")
    return any(c.subject_id == subject for c in res.candidates)


def test_erased_subject_is_unsearchable_even_if_the_wal_checkpoint_fails(
        store, gallery, monkeypatch) -> None:
    _enrol_first(store, gallery)
    subject, template = gallery.subject_ids[4], gallery.templates[4]

    def busy(self: SQLiteBackend) -> None:
        raise bt.StorageError("checkpoint failed (SQLITE_BUSY)")

    monkeypatch.setattr(SQLiteBackend, "checkpoint", busy)
    with pytest.raises(bt.StorageError):
        store.erase_subject(subject, actor="dpo")
    monkeypatch.undo()
    assert not _subject_found(store, template, subject)  # committed erasure: gone from the index


def test_search_and_verify_log_the_same_probe_digest(store, gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="V", purposes=["rare"], actor="t")
    probe = gallery.templates[0] * 3.0  # same direction, other scale: same probe
    s = store.search(probe, purpose="rare", actor="t")
    v = store.verify(probe, subject_id="V", purpose="rare", actor="t")
    digest = store.audit.get(s.audit_seq).fields["probe_digest"]
    assert digest == store.audit.get(v.audit_seq).fields["probe_digest"]


def test_searches_during_a_rebuild_never_see_an_empty_index(store, gallery) -> None:
    _enrol_first(store, gallery, 100)
    template, subject = gallery.templates[7], gallery.subject_ids[7]
    misses: list[int] = []
    stop = threading.Event()

    def search_loop() -> None:
        while not stop.is_set():
            if not _subject_found(store, template, subject):
                misses.append(1)

    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        for _ in range(5):
            store.rebuild_index()
    finally:
        stop.set()
        thread.join()
    assert misses == []


def test_a_lost_commit_after_its_audit_entry_is_marked_rolled_back(
        store, store_dir, gallery, keys, clock) -> None:
    ids = _enrol_first(store, gallery, 5)
    store.close()
    # simulate a kill between the erase entry and the records commit: the entry says
    # "erase ok" but the rows are still there
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        ref = s._p.vault.subject_ref(gallery.subject_ids[0]).hex()
        s._p.trail.append("erase", actor="dpo", count=1, subject_ref=ref,
                          gen=s._p.vault.generation + 1)  # as staged by an erasure
        s._p.closed = True  # no close entry: as if killed here
        s._p.trail.close()
        s._p.vault.close()
        s._p.writer.release()  # a killed process's lock dies with it
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        entries = [s.audit.get(n) for n in range(1, s.audit.verify().entries + 1)]
        rollbacks = [e for e in entries if e.event == "rollback"]
        assert len(rollbacks) == 1 and rollbacks[0].fields["of"] == "erase"
        mine = gallery.subject_ids[:5].count(gallery.subject_ids[0])
        assert len(s.export_subject(gallery.subject_ids[0], actor="t")) == mine
    assert ids
