"""The audit trail without the master key: ``checkpoint_audit`` (a version 3 checkpoint,
signed by the head entry itself), the verified walk ``AuditTrail.entries`` and the
regulator's export ``export_audit`` (Art. 12 fields, nothing biometric)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate import sealing
from biotemplate.audit_export import RESULT_FIELDS, record_of
from biotemplate.synthetic import Gallery


def busy(store: bt.TemplateStore, gallery: Gallery) -> int:
    """Enrol, search, confirm twice, erase, refuse once; returns the search's seq."""
    store.enroll_many(gallery.templates[:6], subject_ids=gallery.subject_ids[:6],
                      purposes=["watchlist"], ttl=bt.policy.parse_duration("30d"),
                      source="case-file", actor="svc")
    res = store.search(gallery.templates[2], purpose="watchlist", actor="analyst",
                       reason="case 12", mode="investigation", k=3)
    for reviewer in ("officer-1", "officer-2"):
        store.confirm_match(res.audit_seq, res.candidates[0].record_id, reviewer=reviewer)
    store.erase_subject("P-000002", actor="dpo", reason="Art. 17 #4")
    with pytest.raises(bt.PolicyViolation):
        store.search(gallery.templates[2], purpose="border-verification", actor="analyst")
    return res.audit_seq


def test_export_has_the_art_12_fields_and_nothing_biometric(
        store: bt.TemplateStore, store_dir: Path, gallery: Gallery) -> None:
    search_seq = busy(store, gallery)
    assert store.audit.verify().unsealed == 0  # a live trail seals before it verifies
    records = list(bt.export_audit(store_dir))  # beside the open writer, no key
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    by_seq = {r.seq: r for r in records}
    search = by_seq[search_seq]
    assert (search.event, search.actor, search.purpose, search.mode, search.reason) == (
        "search", "analyst", "watchlist", "investigation", "case 12")
    assert search.started <= search.time and search.outcome == "ok"
    assert search.result["count"] == 3 and search.result["k"] == 3
    assert len(search.record_ids) == 3 and len(search.input_digest or "") == 64
    confirms = [r for r in records if r.event == "confirm"]
    assert [c.ref_seq for c in confirms] == [search_seq, search_seq]
    assert confirms[1].result == {"reviewers": 2, "two_person": True}
    erase = next(r for r in records if r.event == "erase")
    assert erase.subject_ref and erase.result == {"count": 2} and erase.reason == "Art. 17 #4"
    refused = records[-1]
    assert (refused.outcome, refused.error) == ("refused", "PolicyViolation")
    enrol = next(r for r in records if r.event == "enroll")
    assert enrol.purposes == ("watchlist",) and enrol.result["count"] == 6
    assert enrol.result["expires"].endswith("+00:00")  # a time, not microseconds

    text = "\n".join(r.to_json() for r in records)
    for needle in ("P-0000", "scores", "score\"", "gen\"", "public_key", "probe_digest"):
        assert needle not in text, needle
    assert all(set(r.result) <= RESULT_FIELDS for r in records)
    assert all(json.loads(r.to_json())["hash"] == r.hash for r in records)
    # each signature checks against the public key: an entry's own, or for a search the
    # seal of a later entry (signed_seq) that the prev_hash links chain back to it
    verify = sealing.verifier_for(store.audit.public_key)
    assert all(verify(bytes.fromhex(by_seq[r.signed_seq].hash), bytes.fromhex(r.signature))
               for r in records)
    assert search.signed_seq > search.seq and enrol.signed_seq == enrol.seq
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))

    part = list(bt.export_audit(store_dir / "audit.db", since=3, until=5))
    assert [r.seq for r in part] == [3, 4, 5] and part[0].prev_hash == records[1].hash
    assert [record_of(e) for e in store.audit.entries(3, 5)] == part
    with pytest.raises(bt.InvalidInput):
        list(bt.export_audit(store_dir, since=0))


def test_a_forged_entry_stops_the_export(store: bt.TemplateStore, store_dir: Path,
                                         gallery: Gallery) -> None:
    busy(store, gallery)
    store.close()
    with sqlite3.connect(store_dir / "audit.db") as conn:
        conn.execute("DROP TRIGGER entries_no_update")
        conn.execute("DROP TRIGGER entries_no_delete")
        conn.execute("DELETE FROM entries WHERE seq = 4")  # a gap
    conn.close()
    seen = []
    with pytest.raises(bt.IntegrityError, match="audit entry 4 is missing"):
        for record in bt.export_audit(store_dir):
            seen.append(record.seq)
    assert seen == [1, 2]  # 3 is a search: no signature after the gap covers it
    with pytest.raises(bt.IntegrityError, match="audit entry 4"):
        list(bt.export_audit(store_dir, since=5))  # the link to 4 is checked too
    with pytest.raises(bt.StoreNotFound):
        list(bt.export_audit(store_dir / "nowhere"))


def test_keyless_checkpoint_catches_truncation_and_forgery(
        store: bt.TemplateStore, store_dir: Path, keys: Any, gallery: Gallery,
        tmp_path: Path) -> None:
    busy(store, gallery)
    store.close()
    old = tmp_path / "old-audit.db"
    shutil.copy(store_dir / "audit.db", old)
    cp = bt.checkpoint_audit(store_dir)
    assert cp.entry_signed and cp.version == 3 and cp.public_key == store.audit.public_key
    assert bt.Checkpoint.from_json(cp.to_json()) == cp
    assert bt.Checkpoint.from_bytes(cp.to_bytes()) == cp
    assert bt.verify_audit(store_dir, cp).ok
    with bt.TemplateStore.open(store_dir, key_provider=keys, checkpoint=cp) as again:
        again.enroll(gallery.templates[9], subject_id="X-1", purposes=["watchlist"],
                     ttl=bt.policy.parse_duration("1d"), source="case-file", actor="svc")
        assert again.audit.verify(cp).ok
        later = bt.checkpoint_audit(store_dir)  # beside the writer
        assert later.seq > cp.seq

    # the file put back from before: the witness's newer checkpoint sees it
    shutil.copy(old, store_dir / "audit.db")
    report = bt.verify_audit(store_dir, later)
    assert not report.ok and "truncated or an old file restored" in " ".join(report.problems)

    # a checkpoint claiming another seq for the same signed head does not verify
    forged = dataclasses.replace(cp, seq=cp.seq - 1)
    assert not bt.verify_audit(store_dir, forged).ok
    not_signed = dataclasses.replace(cp, signature=bytes(64))
    assert "checkpoint signature invalid" in bt.verify_audit(store_dir, not_signed).problems


def test_checkpoint_of_nothing(tmp_path: Path) -> None:
    with pytest.raises(bt.StoreNotFound):
        bt.checkpoint_audit(tmp_path)
    (tmp_path / "audit.db").write_bytes(b"not a database at all")
    with pytest.raises(bt.AuditError):
        bt.checkpoint_audit(tmp_path)
