"""``TemplateStore.retention_report``: counts from the clear row headers and the
keyring's holds, on a writable and a read-only handle alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery


def enrol(store: bt.TemplateStore, gallery: Gallery, rows: slice, ttl: timedelta,
          purposes: list[str]) -> None:
    store.enroll_many(gallery.templates[rows], subject_ids=gallery.subject_ids[rows],
                      purposes=purposes, ttl=ttl, source="case-file", actor="svc")


def by_purpose(report: bt.RetentionReport) -> dict[str, bt.PurposeRetention]:
    return {p.purpose: p for p in report.purposes}


def test_windows_held_and_the_next_purge(store: bt.TemplateStore, clock: Any,
                                         gallery: Gallery, store_dir: Path,
                                         keys: Any) -> None:
    enrol(store, gallery, slice(0, 2), timedelta(hours=12), ["rare"])  # P0
    enrol(store, gallery, slice(2, 6), timedelta(days=5), ["rare", "watchlist"])  # P1, P2
    enrol(store, gallery, slice(6, 10), timedelta(days=20), ["rare"])  # P3, P4
    enrol(store, gallery, slice(10, 12), timedelta(days=400), ["watchlist"])  # P5
    store.place_hold("P-000000", actor="legal", reason="case 1")

    report = store.retention_report()
    assert report.at == clock.now and report.records == 12
    assert (report.purge_removes, report.purge_keeps_held) == (0, 0)
    rare = by_purpose(report)["rare"]
    assert (rare.records, rare.live) == (10, 10)
    assert (rare.expiring_24h, rare.expiring_7d, rare.expiring_30d) == (2, 6, 10)
    assert rare.oldest_expiry == clock.now + timedelta(hours=12)
    assert rare.latest_expiry == clock.now + timedelta(days=20)
    assert (rare.held, rare.held_expired, rare.purge_removes) == (2, 0, 0)
    assert rare.max_retention == "30d" and rare.in_policy and rare.beyond_limit == 0
    watch = by_purpose(report)["watchlist"]
    assert (watch.records, watch.expiring_30d, watch.held) == (6, 4, 0)
    assert by_purpose(report)["border-verification"].records == 0

    later = store.retention_report(clock.now + timedelta(days=6))  # as of a later time
    rare = by_purpose(later)["rare"]
    assert (rare.live, rare.held_expired, rare.purge_removes) == (4, 2, 4)
    assert (later.purge_removes, later.purge_keeps_held) == (4, 2)
    assert rare.oldest_expiry < later.at  # overdue for a purge

    clock.advance(days=6)
    purge = store.purge_expired()  # the report said what it would do
    assert (purge.purged, purge.held_retained) == (later.purge_removes,
                                                   later.purge_keeps_held)

    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock,
                               read_only=True) as ro:  # beside the writer, no decryption
        again = ro.retention_report()
        assert again.records == 8 and by_purpose(again)["rare"].held_expired == 2


def test_beyond_limit_counts_records_the_policy_would_not_allow(
        store: bt.TemplateStore, gallery: Gallery, policy: bt.RetentionPolicy) -> None:
    enrol(store, gallery, slice(0, 4), timedelta(days=25), ["rare"])
    d = policy.to_dict()
    d["purposes"]["rare"]["max_retention"] = "10d"
    d["purposes"]["rare"]["default_retention"] = "10d"
    store._p.vault._policy = bt.RetentionPolicy.from_dict(d)  # as if changed behind it
    assert by_purpose(store.retention_report())["rare"].beyond_limit == 4


def test_bad_time_and_a_closed_store(store: bt.TemplateStore) -> None:
    with pytest.raises(bt.InvalidInput):
        store.retention_report(datetime(2026, 1, 1))  # naive
    assert store.retention_report(datetime(2026, 1, 1, tzinfo=UTC)).records == 0
    store.close()
    with pytest.raises(bt.InvalidInput, match="closed"):
        store.retention_report()
