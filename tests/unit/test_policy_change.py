"""A policy change applied to what is stored (``policy_change.py``, ``set_policy``,
``policy_diff``): a tighter limit shortens every stored record it covers, counted from
the record's enrolment, resealed and audited in the policy's own transaction; a removed
purpose expires its records at once; a looser policy never extends a record."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from copies import backup_records, read_with

import biotemplate as bt
from biotemplate.synthetic import Gallery

DAY = timedelta(days=1)


def with_limit(policy: bt.RetentionPolicy, purpose: str, limit: str | None,
               ) -> bt.RetentionPolicy:
    """``policy`` with one purpose's max_retention changed (None: the purpose removed)."""
    d = copy.deepcopy(policy.to_dict())
    if limit is None:
        del d["purposes"][purpose]
    else:
        d["purposes"][purpose]["max_retention"] = limit
        d["purposes"][purpose].pop("default_retention", None)
    return bt.RetentionPolicy.from_dict(d)


def expiries(store: bt.TemplateStore) -> dict[str, int]:
    return {row.record_id: row.expiry_us
            for batch in store._p.vault.rows.scan_headers() for row in batch}


def enrol(store: bt.TemplateStore, gallery: Gallery, rows: slice, ttl: timedelta,
          purposes: tuple[str, ...] = ("watchlist",)) -> list[str]:
    return store.enroll_many(gallery.templates[rows], subject_ids=gallery.subject_ids[rows],
                             purposes=list(purposes), ttl=ttl, source="case-file",
                             actor="svc")


def test_tighter_limit_shortens_from_enrolment(store: bt.TemplateStore, clock: Any,
                                               policy: bt.RetentionPolicy,
                                               gallery: Gallery) -> None:
    old = enrol(store, gallery, slice(0, 4), 700 * DAY)  # enrolled 400 days before
    clock.advance(days=400)
    young = enrol(store, gallery, slice(4, 8), 700 * DAY)
    short = enrol(store, gallery, slice(8, 10), 30 * DAY)  # within the new limit
    before = expiries(store)
    tighter = with_limit(policy, "watchlist", "1y")

    diff = store.policy_diff(tighter)
    assert (diff.records_shortened, diff.records_expired) == (8, 4)
    (change,) = diff.changes
    assert (change.purpose, change.status, change.tightened) == ("watchlist", "changed", True)
    assert (change.records, change.shortened) == (10, 8)
    assert dict(change.fields) == {"max_retention": ("3y", "1y")}
    assert expiries(store) == before  # a diff changes nothing

    receipt = store.set_policy(tighter, actor="dpo", reason="DPIA 7")
    assert (receipt.records_shortened, receipt.records_expired) == (8, 4)
    after, now_us = expiries(store), store._p.clock.now_us()
    year_us = 365 * 86400 * 10**6
    for rid in old:  # 400 days old > 1 year: expired at once
        assert after[rid] == now_us
    for rid in young:  # created now: now + 1 year, earlier than now + 700 days
        assert after[rid] == now_us + year_us < before[rid]
    for rid in short:
        assert after[rid] == before[rid]  # already within the limit
    entry = store.audit.get(receipt.audit_seq)
    assert entry.event == "policy" and entry.fields["records_shortened"] == 8
    assert entry.fields["records_expired"] == 4

    # expired at once: never searched, verified or exported again; shredded by a purge
    hits = {c.record_id for c in store.search(gallery.templates[0], purpose="watchlist",
                                              k=20, actor="a", mode="investigation").candidates}
    assert not hits & set(old) and hits & set(young)
    assert store.export_subject("P-000000", actor="dpo") == []
    assert store.purge_expired().purged == 4
    assert store.audit.verify().ok


def test_shortened_records_leave_the_index_when_their_new_expiry_passes(
        store: bt.TemplateStore, clock: Any, policy: bt.RetentionPolicy,
        gallery: Gallery, store_dir: Path, keys: Any) -> None:
    ids = enrol(store, gallery, slice(0, 6), 300 * DAY)
    store.set_policy(with_limit(policy, "watchlist", "10d"), actor="dpo")
    probe = gallery.templates[2]
    assert ids[2] in {c.record_id for c in store.search(probe, purpose="watchlist",
                                                        actor="a").candidates}
    clock.advance(days=11)
    assert store.search(probe, purpose="watchlist", actor="a").candidates == []
    store.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert again.policy.purposes["watchlist"].max_retention == 10 * DAY
        assert again.search(probe, purpose="watchlist", actor="a").candidates == []
        assert again.stats().integrity_failures == 0
        assert again.purge_expired().purged == 6


def test_looser_policy_never_extends(store: bt.TemplateStore, policy: bt.RetentionPolicy,
                                     gallery: Gallery) -> None:
    enrol(store, gallery, slice(0, 4), 20 * DAY, purposes=("rare",))
    before = expiries(store)
    looser = with_limit(policy, "rare", "1y")
    diff = store.policy_diff(looser)
    assert diff.records_shortened == 0 and not diff.changes[0].tightened
    receipt = store.set_policy(looser, actor="dpo")
    assert (receipt.records_shortened, receipt.records_expired) == (0, 0)
    assert expiries(store) == before
    added = copy.deepcopy(looser.to_dict())
    added["purposes"]["door"] = {"max_retention": "1d", "modes": ["verification"],
                                 "match_threshold": 0.7}
    diff = store.policy_diff(bt.RetentionPolicy.from_dict(added))
    assert [(c.purpose, c.status, c.records) for c in diff.changes] == [("door", "added", 0)]


def test_removed_purpose_expires_its_records(store: bt.TemplateStore,
                                             policy: bt.RetentionPolicy,
                                             gallery: Gallery) -> None:
    enrol(store, gallery, slice(0, 2), 20 * DAY, purposes=("rare",))
    both = enrol(store, gallery, slice(2, 4), 20 * DAY, purposes=("rare", "watchlist"))
    kept = enrol(store, gallery, slice(4, 6), 20 * DAY)
    without = with_limit(policy, "rare", None)
    diff = store.policy_diff(without)
    assert [(c.purpose, c.status, c.tightened) for c in diff.changes] == [
        ("rare", "removed", True)]
    receipt = store.set_policy(without, actor="dpo", reason="service closed")
    # a record carries every limit of its purposes: with one gone, it goes too
    assert (receipt.records_shortened, receipt.records_expired) == (4, 4)
    live = {c.record_id for c in store.search(gallery.templates[2], purpose="watchlist", k=20,
                                              actor="a", mode="investigation").candidates}
    assert not live & set(both) and live & set(kept)
    report = store.retention_report()
    rare = {p.purpose: p for p in report.purposes}["rare"]
    assert not rare.in_policy and rare.live == 0 and rare.purge_removes == 4
    assert store.purge_expired().purged == 4


def test_held_records_are_shortened_but_kept_by_the_hold(store: bt.TemplateStore,
                                                         clock: Any,
                                                         policy: bt.RetentionPolicy,
                                                         gallery: Gallery) -> None:
    enrol(store, gallery, slice(0, 4), 700 * DAY)
    store.place_hold("P-000000", actor="legal", reason="case 3")
    clock.advance(days=100)
    receipt = store.set_policy(with_limit(policy, "watchlist", "30d"), actor="dpo")
    assert (receipt.records_shortened, receipt.records_expired) == (4, 4)
    assert store.purge_expired().purged == 2  # P-000001; P-000000 is held
    assert len(store.export_subject("P-000000", actor="dpo")) == 2  # held, exportable
    assert store.search(gallery.templates[0], purpose="watchlist", actor="a").candidates == []
    store.release_hold("P-000000", actor="legal", reason="closed")
    assert store.purge_expired().purged == 2


def test_an_older_copy_no_longer_opens_the_shortened_records(
        store: bt.TemplateStore, store_dir: Path, keys: Any, policy: bt.RetentionPolicy,
        gallery: Gallery, tmp_path: Path) -> None:
    """The copy holds them with their old, longer expiry: the policy change rotated their
    subjects' buckets, so with the keyring of after it they do not open."""
    enrol(store, gallery, slice(0, 6), 300 * DAY)
    enrol(store, gallery, slice(6, 8), 5 * DAY, purposes=("rare",))
    copy_file = backup_records(store_dir, tmp_path / "old-records.db")
    store.set_policy(with_limit(policy, "watchlist", "10d"), actor="dpo")
    store.close()
    seen = read_with(store_dir / "keyring", keys, copy_file, model=store.model,
                     dim=store.dim)
    assert list(seen.values()).count("unreadable") >= 6
    assert "P-000000" not in seen.values()


def test_policy_diff_needs_the_writable_handle(store: bt.TemplateStore, store_dir: Path,
                                               keys: Any, policy: bt.RetentionPolicy) -> None:
    with bt.TemplateStore.open(store_dir, key_provider=keys, read_only=True) as ro:
        with pytest.raises(bt.ReadOnlyStore):
            ro.policy_diff(policy)
    with pytest.raises(bt.InvalidInput):
        store.policy_diff(policy.to_dict())  # type: ignore[arg-type]
    assert not store.policy_diff(policy).changed
