"""Regressions for defects found in review: each test fails on the code before its fix."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.errors import StorageError

WATCH = {"purposes": ["watchlist"], "source": "case-file-1", "ttl": timedelta(days=1)}


def _enrol(store: bt.TemplateStore, gallery, n: int = 20) -> list[str]:
    return store.enroll_many(gallery.templates[:n], subject_ids=gallery.subject_ids[:n],
                             actor="t", **WATCH)


def _found(store: bt.TemplateStore, template, subject: str) -> bool:
    res = store.search(template, purpose="watchlist", k=20, actor="t", mode="investigation")
    return any(c.subject_id == subject for c in res.candidates)


def test_erased_subject_is_unsearchable_even_if_the_wal_checkpoint_fails(
        store, gallery, monkeypatch) -> None:
    _enrol(store, gallery)
    subject, template = gallery.subject_ids[4], gallery.templates[4]

    def busy() -> None:
        raise StorageError("checkpoint failed (SQLITE_BUSY)")

    monkeypatch.setattr(store._db, "checkpoint", busy)
    with pytest.raises(StorageError):
        store.erase_subject(subject, actor="dpo")
    monkeypatch.undo()
    assert not _found(store, template, subject)  # committed erasure: gone from the index


def test_nested_metadata_must_decode_or_is_refused(store, gallery) -> None:
    before = store.stats()["records"]
    for bad in ({"a": {1: 2}}, {"a": [{2: 3}]}):
        with pytest.raises(bt.InvalidInput, match="metadata"):
            store.enroll(gallery.templates[0], subject_id="M", metadata=bad, actor="t",
                         **WATCH)
    assert store.stats()["records"] == before
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


def test_search_and_verify_log_the_same_probe_digest(store, gallery) -> None:
    store.enroll(gallery.templates[0], subject_id="V", purposes=["rare"], actor="t")
    probe = gallery.templates[0] * 3.0  # same direction, other scale: same probe
    s = store.search(probe, purpose="rare", actor="t")
    v = store.verify(probe, subject_id="V", purpose="rare", actor="t")
    digest = store.audit.get(s.audit_seq).fields["probe_digest"]
    assert digest == store.audit.get(v.audit_seq).fields["probe_digest"]


def test_searches_during_a_rebuild_never_see_an_empty_index(store, gallery) -> None:
    _enrol(store, gallery, 100)
    template, subject = gallery.templates[7], gallery.subject_ids[7]
    misses: list[int] = []
    stop = threading.Event()

    def search_loop() -> None:
        while not stop.is_set():
            if not _found(store, template, subject):
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


def test_a_lost_commit_after_its_audit_entry_is_marked_rolled_back(store, gallery,
                                                                   keys, clock) -> None:
    ids = _enrol(store, gallery, 5)
    path = store._path
    store.close()
    # simulate a kill between the erase entry and the records commit: the entry says
    # "erase ok" but the rows are still there
    with bt.TemplateStore.open(path, key_provider=keys, clock=clock) as s:
        ref = s._keyring.subject_ref(gallery.subject_ids[0]).hex()
        s._trail.append("erase", actor="dpo", count=1, subject_ref=ref)
        s._closed = True  # no close entry: as if killed here
        s._trail.close()
        s._db.close()
    with bt.TemplateStore.open(path, key_provider=keys, clock=clock) as s:
        entries = [s.audit.get(n) for n in range(1, s.audit.verify().entries + 1)]
        rollbacks = [e for e in entries if e.event == "rollback"]
        assert len(rollbacks) == 1 and rollbacks[0].fields["of"] == "erase"
        mine = gallery.subject_ids[:5].count(gallery.subject_ids[0])
        assert len(s.export_subject(gallery.subject_ids[0], actor="t")) == mine
    assert ids


def test_normalised_probe_keeps_float32(store, gallery) -> None:
    res = store.search(np.asarray(gallery.templates[0], dtype=np.float64),
                       purpose="watchlist", actor="t")
    assert isinstance(res.decision, bool)
