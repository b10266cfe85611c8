"""Tampering with a PostgreSQL store's tables (the database owner, or anyone with its
files): each edit is caught, the way tests/tamper does it for SQLite's files."""

from __future__ import annotations

import pytest

import biotemplate as bt
from biotemplate.backends.postgres import parse_url
from tests.conftest import DIM, MODEL
from tests.pg.test_pg_store import enrol, sql, vectors


@pytest.fixture
def pg_store(pg_url, policy, keys, clock):
    s = bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    yield s
    s.close()


def test_an_edited_blob_is_never_served_and_reads_fail_closed(pg_server, pg_url, keys, clock,
                                                             pg_store) -> None:
    vecs = vectors(10, 30)
    ids = enrol(pg_store, vecs, "t")
    schema = parse_url(pg_url).schema
    # the AEAD tag's last byte: the row no longer matches what was indexed
    sql(pg_server, f"UPDATE {schema}.records SET blob = overlay(blob placing "
        "set_byte(substr(blob, length(blob), 1), 0, get_byte(blob, length(blob) - 1) # 1) "
        "from length(blob) for 1) WHERE record_id = %s", ids[2])
    r = pg_store.search(vecs[2], purpose="watchlist", k=10, actor="t", mode="investigation")
    assert ids[2] not in {c.record_id for c in r.candidates}
    with pytest.raises(bt.IntegrityError):
        pg_store.export_subject("t2", actor="t")
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock) as fresh:
        assert fresh.stats().integrity_failures == 1 and fresh.stats().indexed == 9


def test_an_extended_expiry_in_the_clear_header_is_caught(pg_server, pg_url, keys, clock,
                                                         pg_store) -> None:
    ids = enrol(pg_store, vectors(4, 31), "x")
    schema = parse_url(pg_url).schema
    sql(pg_server, f"UPDATE {schema}.records SET expiry_us = expiry_us + 86400000000 * 3650 "
        "WHERE record_id = %s", ids[1])
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock) as fresh:
        assert fresh.stats().integrity_failures == 1
        with pytest.raises(bt.IntegrityError):
            fresh.export_subject("x1", actor="t")


def test_an_edited_key_state_row_or_setting_fails_open(pg_server, pg_url, keys, clock,
                                                      pg_store) -> None:
    enrol(pg_store, vectors(2, 32), "k")
    pg_store.close()
    schema = parse_url(pg_url).schema
    sql(pg_server, f"UPDATE {schema}.meta SET value = overlay(value placing '\\x01'::bytea "
        "from 30 for 1) WHERE key = 'policy'")
    with pytest.raises(bt.IntegrityError):
        bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    sql(pg_server, f"UPDATE {schema}.keyring SET blob = overlay(blob placing '\\x01'::bytea "
        "from 60 for 1)")
    with pytest.raises((bt.IntegrityError, bt.KeyUnavailable)):
        bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)


def test_audit_rows_edited_with_the_triggers_dropped_are_reported(pg_server, pg_url,
                                                                 pg_store) -> None:
    enrol(pg_store, vectors(3, 33), "a")
    pg_store.search(vectors(3, 33)[0], purpose="watchlist", actor="t")
    schema = parse_url(pg_url).schema
    sql(pg_server, f"ALTER TABLE {schema}.audit_entries DISABLE TRIGGER audit_append_only")
    sql(pg_server, f"UPDATE {schema}.audit_entries SET body = overlay(body placing "
        "'\\x7a'::bytea from 20 for 1) WHERE seq = 3")
    report = pg_store.audit.verify()
    assert not report.ok and any("seq 3" in p for p in report.problems)
    assert not bt.verify_audit(pg_url).ok


def test_a_dropped_feed_trigger_costs_freshness_never_erasure(pg_server, pg_url, keys, clock,
                                                              pg_store) -> None:
    vecs = vectors(12, 34)
    enrol(pg_store, vecs, "f")
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    try:
        schema = parse_url(pg_url).schema
        sql(pg_server, f"DROP TRIGGER records_log ON {schema}.records")
        pg_store.erase_subject("f5", actor="t")  # the feed never hears of it
        r = other.search(vecs[5], purpose="watchlist", k=10, actor="t", mode="investigation")
        assert all(c.subject_id != "f5" for c in r.candidates)  # the row is gone: dropped
    finally:
        other.close()


def test_a_mac_sized_signature_is_a_forgery_on_postgresql(pg_server, pg_url,
                                                            pg_store) -> None:
    """A PostgreSQL trail signs every entry: an entry inserted with a well-formed body, the
    right link and 32 junk bytes as its signature (the size of an audit.db search MAC)
    fails verification, even once a genuine entry has been chained onto it."""
    import hashlib

    import msgpack

    enrol(pg_store, vectors(3, 34), "a")
    schema = parse_url(pg_url).schema
    seq, body, digest = sql(pg_server, f"SELECT seq, body, hash FROM {schema}.audit_entries "
                                       "ORDER BY seq DESC LIMIT 1")[0]
    fake = msgpack.unpackb(bytes(body), raw=False)
    fake.update(seq=seq + 1, prev=bytes(digest), event="confirm", actor="reviewer-2")
    forged = msgpack.packb(fake, use_bin_type=True)
    sql(pg_server, f"INSERT INTO {schema}.audit_entries VALUES (%s, NULL, %s, %s, %s)",
        seq + 1, forged, hashlib.sha256(b"biotemplate-audit-v1\x00" + forged).digest(),
        b"\x00" * 32)
    pg_store.search(vectors(3, 34)[0], purpose="watchlist", actor="t")  # chains onto it
    report = pg_store.audit.verify()
    assert not report.ok and any(f"seq {seq + 1}: signature invalid" in p
                                 for p in report.problems)
    assert not bt.verify_audit(pg_url).ok
    with pytest.raises(bt.IntegrityError):
        pg_store.audit.get(seq + 1)
