"""Every candidate is confirmed against its live, authentic row before it is returned.

The attacker edits records.db with SQLite's triggers dropped first, so nothing logs the
change, while a store is open, or before it opens from a snapshot whose change number
and row count still match. Search must never return a record whose row is gone or was
changed since it was indexed; each such hit is dropped, counted in
``stats().integrity_failures`` and noted in the search's audit entry.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery, probes

WATCH = {"purposes": ["watchlist"], "ttl": timedelta(days=30), "source": "case-file-1"}
# a later expiry in the clear header; the last byte of the AEAD tag flipped
HEADER_AND_TAG_EDITS = [
    "UPDATE records SET expiry_us = expiry_us + 1000000 WHERE record_id = ?",
    "UPDATE records SET blob = substr(blob, 1, length(blob) - 1) || x'00' WHERE record_id = ?",
]


def _sql(store_dir: Path, *statements: str, args: tuple[Any, ...] = ()) -> None:
    """Edit records.db as an attacker would: triggers dropped, then the statements."""
    con = sqlite3.connect(store_dir / "records.db", isolation_level=None)
    try:
        for name in ("records_add", "records_reseal", "records_del"):
            con.execute(f"DROP TRIGGER IF EXISTS {name}")
        for sql in statements:
            con.execute(sql, args if "?" in sql else ())
    finally:
        con.close()


def _ids(store: bt.TemplateStore, template: Any) -> set[str]:
    res = store.search(template, purpose="watchlist", k=20, actor="t", mode="investigation")
    return {c.record_id for c in res.candidates}


@pytest.fixture
def enrolled(store: bt.TemplateStore, gallery: Gallery) -> list[str]:
    return store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids, actor="t",
                             **WATCH)


def _top(store: bt.TemplateStore, template: Any) -> str:
    res = store.search(template, purpose="watchlist", k=20, actor="t", mode="investigation")
    return res.candidates[0].record_id


def test_a_row_deleted_under_a_running_store_is_never_returned(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery, enrolled: list[str]) -> None:
    probe = probes(gallery, [0])[0]
    victim = _top(store, probe)
    _sql(store_dir, "DELETE FROM records WHERE record_id = ?", args=(victim,))
    res = store.search(probe, purpose="watchlist", k=20, actor="t", mode="investigation")
    assert victim not in {c.record_id for c in res.candidates}
    assert [c.rank for c in res.candidates] == list(range(1, len(res.candidates) + 1))
    assert store.stats().integrity_failures == 1
    assert store.audit.get(res.audit_seq).fields["unconfirmed"] == 1


@pytest.mark.parametrize("edit", [
    "UPDATE records SET purposes = 'rare,watchlist' WHERE record_id = ?",
    *HEADER_AND_TAG_EDITS,
])
def test_a_row_edited_under_a_running_store_is_never_returned(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery, enrolled: list[str],
        edit: str) -> None:
    probe = probes(gallery, [0])[0]
    victim = _top(store, probe)
    _sql(store_dir, edit, args=(victim,))
    assert victim not in _ids(store, probe)
    assert store.stats().integrity_failures == 1


def test_identification_confirms_only_what_it_returns(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery, enrolled: list[str]) -> None:
    """An untouched gallery: confirmation drops nothing and the result is unchanged."""
    probe = probes(gallery, [4])[0]
    before = store.search(probe, purpose="watchlist", actor="t")
    _sql(store_dir, "DELETE FROM records WHERE record_id = ?", args=(enrolled[30],))
    after = store.search(probe, purpose="watchlist", actor="t")
    assert [c.record_id for c in after.candidates] == [c.record_id for c in before.candidates]
    assert store.stats().integrity_failures == 0  # the deleted row was never a candidate
    assert "unconfirmed" not in store.audit.get(after.audit_seq).fields


def test_a_snapshot_that_looks_current_cannot_serve_a_vanished_row(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        enrolled: list[str]) -> None:
    """With the triggers dropped, one row is deleted and a junk row takes its place: the
    snapshot's change number and row count still match, so open trusts the snapshot and
    reads no row. The deleted record is still in the loaded index; confirmation stops
    it at the first search."""
    victim = _top(store, probes(gallery, [0])[0])
    store.close()  # writes index.snapshot
    _sql(store_dir, "DELETE FROM records WHERE record_id = ?", args=(victim,))
    _sql(store_dir,
         "INSERT INTO records (record_id, subject_ref, epoch, expiry_us, purposes, model,"
         " held, blob) SELECT '0123456789abcdef0123456789abcdef', subject_ref, epoch, expiry_us,"
         " purposes, model, held, blob FROM records WHERE record_id = ?",
         args=(enrolled[50],))
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        opened = s.audit.get(s.audit.verify().entries)
        assert (opened.event, opened.fields["index"]) == ("open", "snapshot")
        assert victim not in _ids(s, probes(gallery, [0])[0])
        assert s.stats().integrity_failures >= 1


# --- the baseline (biotemplate/_baseline.py): no row read while no other connection wrote


def _trusting(store: bt.TemplateStore, probe: Any) -> None:
    """Search once (it starts the pass over the rows), then wait until the pass holds."""
    store.search(probe, purpose="watchlist", actor="t")
    deadline = time.monotonic() + 30
    while not store._p.gallery.baseline.ready:
        assert time.monotonic() < deadline, "the baseline pass never finished"
        time.sleep(0.01)


@pytest.fixture
def headers_read(store: bt.TemplateStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows each confirmation query asked for."""
    rows = store._p.vault.rows
    real = rows.headers
    asked: list[int] = []

    def spy(record_ids: Any) -> Any:
        asked.append(len(record_ids))
        return real(record_ids)

    monkeypatch.setattr(rows, "headers", spy)
    return asked


def test_with_a_baseline_a_search_reads_no_row(
        store: bt.TemplateStore, gallery: Gallery, enrolled: list[str],
        headers_read: list[int]) -> None:
    probe = probes(gallery, [0])[0]
    _trusting(store, probe)
    headers_read.clear()
    assert _ids(store, probe)
    assert headers_read == []
    store.enroll(gallery.templates[1], subject_id="S-new", actor="t", **WATCH)
    store.delete(enrolled[2], actor="t")  # the store's own commits keep the baseline
    assert _ids(store, probes(gallery, [1])[0])
    assert headers_read == [] and store._p.gallery.baseline.ready


@pytest.mark.parametrize("edit", [
    "DELETE FROM records WHERE record_id = ?",
    *HEADER_AND_TAG_EDITS,
])
def test_another_connection_s_edit_ends_the_baseline_at_the_next_search(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery, enrolled: list[str],
        headers_read: list[int], edit: str) -> None:
    probe = probes(gallery, [0])[0]
    _trusting(store, probe)
    victim = _top(store, probe)
    _sql(store_dir, edit, args=(victim,))
    headers_read.clear()
    assert victim not in _ids(store, probe)  # every candidate read again
    assert headers_read and store.stats().integrity_failures == 1
    _trusting(store, probe)  # a new pass holds, and keeps the edited row suspect
    headers_read.clear()
    assert victim not in _ids(store, probe)
    assert headers_read == [1]  # only the suspect is read


def test_a_row_changed_before_the_open_stays_suspect_under_the_baseline(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any, gallery: Gallery,
        enrolled: list[str]) -> None:
    """The snapshot case above, once the pass after the open has finished: it found the
    vanished row, so searches still confirm that record and never serve it."""
    probe = probes(gallery, [0])[0]
    victim = _top(store, probe)
    store.close()
    _sql(store_dir, "DELETE FROM records WHERE record_id = ?", args=(victim,))
    _sql(store_dir,
         "INSERT INTO records (record_id, subject_ref, epoch, expiry_us, purposes, model,"
         " held, blob) SELECT '0123456789abcdef0123456789abcdef', subject_ref, epoch, expiry_us,"
         " purposes, model, held, blob FROM records WHERE record_id = ?",
         args=(enrolled[50],))
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as s:
        _trusting(s, probe)
        assert s._p.gallery.baseline.suspects() == {victim}
        for _ in range(3):
            assert victim not in _ids(s, probe)
        assert s.stats().integrity_failures >= 1


def test_a_pass_that_sees_another_commit_is_not_a_baseline(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery, enrolled: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection commits while the pass reads: the pass installs nothing."""
    rows = store._p.vault.rows
    real = rows.scan_headers

    def scan_then_commit(batch_size: int = 16384) -> Any:
        yield from real(batch_size)
        _sql(store_dir, "DELETE FROM records WHERE record_id = ?", args=(enrolled[7],))

    monkeypatch.setattr(rows, "scan_headers", scan_then_commit)
    baseline = store._p.gallery.baseline
    assert baseline._compare() is None
    monkeypatch.setattr(rows, "scan_headers", real)
    found = baseline._compare()
    assert found is not None and found[1] == {enrolled[7]}


def test_a_duplicated_row_cannot_hide_a_vanished_one_from_the_pass(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery,
        enrolled: list[str]) -> None:
    """The table rebuilt without its UNIQUE constraint; in one commit, record A's row is
    deleted and a second copy of record B's row inserted: the row count still matches, so
    the pass must match rows by record id, not count them, to keep A suspect."""
    probe = probes(gallery, [0])[0]
    victim = _top(store, probe)
    other = next(r for r in enrolled if r != victim)
    _sql(store_dir,
         "CREATE TABLE copy AS SELECT * FROM records", "DROP TABLE records",
         "ALTER TABLE copy RENAME TO records", "BEGIN",
         f"DELETE FROM records WHERE record_id = '{victim}'",
         f"INSERT INTO records SELECT * FROM records WHERE record_id = '{other}'", "COMMIT")
    _trusting(store, probes(gallery, [5])[0])
    assert victim in store._p.gallery.baseline.suspects()  # type: ignore[operator]
    assert victim not in _ids(store, probe)
    assert store.stats().integrity_failures >= 1
