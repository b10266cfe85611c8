"""A store on PostgreSQL in one process: lifecycle, bad input and faults, shared state,
roles. Several processes: test_instances.py."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest

import biotemplate as bt
from biotemplate.backends.postgres import grant_roles, parse_url
from tests.conftest import DIM, MODEL, FakeClock
from tests.pg.conftest import with_schema

TTL = timedelta(days=30)


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def enrol(store: bt.TemplateStore, vecs: np.ndarray, prefix: str, **kw: object) -> list[str]:
    return store.enroll_many(vecs, subject_ids=[f"{prefix}{i}" for i in range(len(vecs))],
                             purposes=["watchlist"], ttl=kw.pop("ttl", TTL),  # type: ignore[arg-type]
                             source="case-file", actor="test", **kw)  # type: ignore[arg-type]


def terminate(server: str, url: str) -> None:
    """Kill every session of this test's store (and no other test's)."""
    sql(server, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
        "application_name = %s", f"biotemplate:{parse_url(url).schema}")


def sql(server: str, statement: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(server, autocommit=True) as conn:
        cur = conn.execute(statement, args)  # type: ignore[call-overload]
        return cur.fetchall() if cur.description else []


@pytest.fixture
def pg_store(pg_url, policy, keys, clock):
    s = bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    yield s
    s.close()


def test_create_enrol_reopen_round_trip(pg_url, pg_store, keys, clock) -> None:
    vecs = vectors(30, 1)
    ids = enrol(pg_store, vecs, "r")
    pg_store.close()
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock) as again:
        assert again.stats().indexed == 30
        hit = again.search(vecs[4], purpose="watchlist", actor="t").candidates[0]
        assert (hit.subject_id, hit.record_id) == ("r4", ids[4])
        assert again.audit.verify().ok
        assert bt.verify_audit(pg_url).ok  # no master key


def test_the_url_password_never_shows(pg_server) -> None:
    url = pg_server.replace("postgres@", "postgres:s3cret-pw@") + "?schema=bt_nope"
    loc = parse_url(url)
    assert "s3cret" not in repr(loc) and "s3cret" not in loc.display
    with pytest.raises(bt.BiotemplateError) as info:
        bt.TemplateStore.open(url.replace("127.0.0.1:5432", "127.0.0.1:1"),
                              key_provider=bt.EnvKeyProvider("NO_SUCH_VAR_FOR_TEST"))
    assert "s3cret" not in str(info.value)


def test_bad_locations_and_servers_raise_clear_errors(pg_server, pg_url, policy, keys,
                                                      pg_store) -> None:
    with pytest.raises(bt.StoreExists):
        bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy, key_provider=keys)
    with pytest.raises(bt.InvalidInput, match="schema"):
        bt.TemplateStore.open(with_schema(pg_server, "Bad-Name;drop"), key_provider=keys)
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(with_schema(pg_server, "bt_no_such_schema"), key_provider=keys)
    unreachable = with_schema(pg_server.replace("127.0.0.1:5432", "127.0.0.1:1"), "x")
    with pytest.raises(bt.StorageError, match="cannot connect"):
        bt.TemplateStore.open(unreachable, key_provider=keys)
    no_role = with_schema(pg_server.replace("postgres@", "bt_no_such_role@"), "x")
    with pytest.raises(bt.StorageError, match="cannot connect"):
        bt.TemplateStore.open(no_role, key_provider=keys)
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(pg_url, key_provider=bt.FileKeyProvider.generate(
            Path(keys.path).with_name("other.key")))
    with pytest.raises(bt.InvalidInput, match="partition"):
        bt.TemplateStore.open(pg_url, key_provider=keys, partition=(4, 4))


def test_a_schema_that_is_not_a_store_or_of_a_newer_version(pg_server, pg_url, keys,
                                                            pg_store) -> None:
    sql(pg_server, "CREATE SCHEMA bt_test_foreign")
    try:
        sql(pg_server, "CREATE TABLE bt_test_foreign.t (x int)")
        with pytest.raises(bt.StoreNotFound):
            bt.TemplateStore.open(with_schema(pg_server, "bt_test_foreign"), key_provider=keys)
    finally:
        sql(pg_server, "DROP SCHEMA bt_test_foreign CASCADE")
    schema = parse_url(pg_url).schema
    sql(pg_server, f"UPDATE {schema}.schema_version SET version = 99")
    with pytest.raises(bt.StorageError, match="version 99"):
        bt.TemplateStore.open(pg_url, key_provider=keys)


def test_a_connection_killed_mid_batch_leaves_nothing_half_written(pg_server, pg_store,
                                                                   pg_url) -> None:
    enrol(pg_store, vectors(10, 2), "base")
    rows, entries = pg_store.stats().records, pg_store.audit.checkpoint().seq

    def kill(done: int, total: int) -> None:
        terminate(pg_server, pg_url)

    # noticed by the rows' writes or by the audit entry of the same transaction
    with pytest.raises((bt.StorageError, bt.AuditError), match="lost the connection"):
        enrol(pg_store, vectors(3000, 3), "big", progress=kill)
    # the next call reconnects; the batch left no row, no key entry and no audit claim
    assert pg_store.stats().records == rows
    schema = parse_url(pg_url).schema
    assert sql(pg_server, f"SELECT count(*) FROM {schema}.subject_keys")[0][0] == 10
    seqs = [e for e in range(entries + 1, pg_store.audit.checkpoint().seq + 1)]
    assert all(pg_store.audit.get(s).event != "enroll" or pg_store.audit.get(s).outcome != "ok"
               for s in seqs)
    assert pg_store.search(vectors(1, 2)[0], purpose="watchlist", actor="t").decision
    assert pg_store.audit.verify().ok


def test_a_lost_connection_fails_a_call_then_the_instance_catches_up(pg_server, pg_url, keys,
                                                                     clock, pg_store) -> None:
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, poll_interval=0.05)
    try:
        terminate(pg_server, pg_url)
        vecs = vectors(5, 4)
        for _ in range(3):  # this handle's own connection died too: one call may fail
            try:
                enrol(pg_store, vecs, "late")
                break
            except bt.StorageError as exc:
                assert "connection" in str(exc)
        else:
            pytest.fail("the instance never reconnected")
        found = []
        for _ in range(400):
            try:
                found = other.search(vecs[1], purpose="watchlist", actor="t").candidates
            except (bt.StorageError, bt.AuditError) as exc:  # its session died too
                assert "connection" in str(exc)
                continue
            if found:
                break
            threading.Event().wait(0.05)
        assert found and found[0].subject_id == "late1"
        assert other.stats().indexed == 5  # caught up from the feed, no rebuild needed
    finally:
        other.close()


def test_a_purge_on_one_instance_is_seen_by_the_other(pg_url, keys, pg_store) -> None:
    clock = FakeClock()
    a = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, poll_interval=0.05)
    b = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, poll_interval=0.05)
    try:
        vecs = vectors(6, 5)
        enrol(a, vecs[:3], "short", ttl=timedelta(days=2))
        enrol(a, vecs[3:], "long", ttl=timedelta(days=20))
        clock.advance(days=3)
        report = b.purge_expired()
        assert report.purged == 3 and report.epoch_after > report.epoch_before
        r = a.search(vecs[0], purpose="watchlist", k=10, actor="t", mode="investigation")
        assert all(not c.subject_id.startswith("short") for c in r.candidates)
        for _ in range(200):
            if a.stats().indexed == 3:
                break
            threading.Event().wait(0.05)
        assert a.stats().indexed == 3 and a.stats().epoch == b.stats().epoch
        assert len(a.export_subject("long1", actor="t")) == 1  # keys of the new epoch
    finally:
        a.close()
        b.close()


def test_a_stale_instance_cannot_write_back_old_key_state(pg_url, keys, clock,
                                                          pg_store) -> None:
    enrol(pg_store, vectors(4, 6), "st")
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    try:
        other._follower.stop()  # (its feed would bring its copy up to date)
        pg_store.erase_subject("st0", actor="t")  # moves the key state past `other`'s copy
        stale = other._p.vault
        with pytest.raises(bt.StorageError, match="another instance"):
            stale.save_keys()  # bypassing the lock: the compare-and-swap refuses it
        # through the API the lock refreshes first, so the change lands on the new state
        receipt = other.erase_subject("st1", actor="t")
        assert receipt.key_destroyed
        assert pg_store.stats().generation == other.stats().generation == 2
        assert len(pg_store.export_subject("st2", actor="t")) == 1
    finally:
        other.close()


def test_read_only_instance_writes_nothing(pg_url, keys, pg_store) -> None:
    enrol(pg_store, vectors(3, 7), "ro")
    head = pg_store.audit.checkpoint().seq
    with bt.TemplateStore.open(pg_url, key_provider=keys, read_only=True) as ro:
        assert ro.stats().records == 3
        assert ro.audit.verify().ok
        with pytest.raises(bt.ReadOnlyStore):
            ro.erase_subject("ro1", actor="t")
    assert pg_store.audit.checkpoint().seq == head


def test_a_restored_database_is_caught_by_a_checkpoint(pg_server, pg_url, keys, pg_store) -> None:
    enrol(pg_store, vectors(3, 8), "cp")
    cp = pg_store.audit.checkpoint()
    pg_store.close()
    schema = parse_url(pg_url).schema
    sql(pg_server, f"ALTER TABLE {schema}.audit_entries DISABLE TRIGGER audit_append_only")
    sql(pg_server, f"DELETE FROM {schema}.audit_entries WHERE seq >= %s", cp.seq)
    with pytest.raises(bt.IntegrityError, match="checkpoint"):
        bt.TemplateStore.open(pg_url, key_provider=keys, checkpoint=cp)
    assert not bt.verify_audit(pg_url, cp).ok


@pytest.fixture
def roles(pg_server):
    import secrets

    names = [f"bt_svc_{secrets.token_hex(4)}", f"bt_aud_{secrets.token_hex(4)}"]
    for name in names:
        sql(pg_server, f"CREATE ROLE {name} LOGIN")
    yield names
    for name in names:
        sql(pg_server, f"DROP OWNED BY {name}")
        sql(pg_server, f"DROP ROLE {name}")


def test_least_privilege_roles(pg_server, pg_url, keys, clock, pg_store, roles) -> None:
    enrol(pg_store, vectors(5, 9), "lp")
    service, auditor = roles
    grant_roles(pg_url, service=service, auditor=auditor)
    as_service = pg_url.replace("postgres@", f"{service}@")
    as_auditor = pg_url.replace("postgres@", f"{auditor}@")
    schema = parse_url(pg_url).schema
    with bt.TemplateStore.open(as_service, key_provider=keys, clock=clock) as svc:
        enrol(svc, vectors(2, 10), "svc")
        svc.erase_subject("lp1", actor="t")
        assert svc.search(vectors(5, 9)[3], purpose="watchlist", actor="t").decision
    service_server = pg_server.replace("postgres@", f"{service}@")
    with pytest.raises((psycopg.errors.InsufficientPrivilege,  # not granted, and
                        psycopg.errors.RaiseException)):  # append-only for anyone
        sql(service_server, f"UPDATE {schema}.audit_entries SET sig = sig")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # no DDL: triggers stay
        sql(service_server, f"ALTER TABLE {schema}.audit_entries DISABLE TRIGGER ALL")
    report = bt.verify_audit(as_auditor)
    assert report.ok and report.entries > 3
    auditor_server = pg_server.replace("postgres@", f"{auditor}@")
    for table in ("records", "subject_keys", "keyring", "meta"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sql(auditor_server, f"SELECT 1 FROM {schema}.{table}")
    with pytest.raises(bt.StorageError, match="permission"):
        bt.TemplateStore.open(as_auditor, key_provider=keys)


def test_partitions_index_disjoint_subjects_and_serve_every_subject(pg_url, keys, clock,
                                                                   pg_store) -> None:
    vecs = vectors(200, 11)
    enrol(pg_store, vecs, "pt")
    parts = [bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, partition=(i, 3))
             for i in range(3)]
    try:
        assert sum(p.stats().indexed for p in parts) == 200
        # verification and export work for any subject on any partition
        assert len(parts[0].export_subject("pt7", actor="t")) == 1
        new = vectors(30, 12)
        ids = enrol(parts[1], new, "nw")  # enrolled anywhere, indexed where it belongs
        for _ in range(200):
            if sum(p.stats().indexed for p in parts) == 230:
                break
            threading.Event().wait(0.05)
        assert sum(p.stats().indexed for p in parts) == 230
        merged = bt.merge_results([p.search(new[4], purpose="watchlist", k=5, actor="t")
                                   for p in parts], k=5)
        assert merged.candidates[0].record_id == ids[4]
        assert merged.audit_seq_of(ids[4]) in merged.audit_seqs
    finally:
        for p in parts:
            p.close()
    with pytest.raises(bt.InvalidInput):
        bt.TemplateStore.open(Path("/tmp/x"), key_provider=keys, partition=(0, 2))


def test_an_instance_reopens_from_its_own_snapshot_and_catches_up(pg_url, keys, clock,
                                                                  pg_store, tmp_path) -> None:
    vecs = vectors(40, 13)
    ids = enrol(pg_store, vecs, "sn")
    cache = tmp_path / "instance-cache"
    cache.mkdir()
    mine = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, snapshot_dir=cache)
    mine.close()  # writes its sealed snapshot
    assert any(cache.iterdir())
    late = enrol(pg_store, vectors(2, 14), "late")  # while it was away
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock,
                               snapshot_dir=cache) as again:
        opened = again.audit.get(again.audit.checkpoint().seq)
        assert opened.event == "open" and opened.fields["index"] == "snapshot"
        assert again.stats().indexed == 42
        got = again.search(vectors(2, 14)[1], purpose="watchlist", actor="t").candidates
        assert got[0].record_id == late[1]
    # a deletion anywhere destroys a key the snapshot was sealed under: the next open of
    # that instance rebuilds (and never serves the deleted template)
    pg_store.delete(ids[3], actor="t")
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock,
                               snapshot_dir=cache) as third:
        opened = third.audit.get(third.audit.checkpoint().seq)
        assert opened.fields["index"] == "rebuild" and third.stats().indexed == 41
        r = third.search(vecs[3], purpose="watchlist", k=10, actor="t", mode="investigation")
        assert ids[3] not in {c.record_id for c in r.candidates}
    with pytest.raises(bt.InvalidInput, match="snapshot"):
        pg_store.snapshot()  # this instance keeps none


def test_an_older_schema_is_migrated_and_a_newer_library_is_needed_for_a_newer_one(
        pg_server, pg_url, keys, clock, pg_store, monkeypatch) -> None:
    from biotemplate.backends import pg_schema, postgres

    pg_store.close()
    schema = parse_url(pg_url).schema
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(pg_schema.MIGRATIONS, 1, (
        f"CREATE INDEX records_epoch ON {schema}.records (epoch)",))
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, read_only=True):
        pass  # a reader migrates nothing
    assert sql(pg_server, f"SELECT version FROM {schema}.schema_version")[0][0] == 1
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock) as s:
        assert s.stats().records == 0
    assert sql(pg_server, f"SELECT version FROM {schema}.schema_version")[0][0] == 2
    assert sql(pg_server, "SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = "
               "'records_epoch'", schema)


def test_a_mutation_whose_session_dies_under_the_lock_never_goes_on_without_it(
        pg_server, pg_url, pg_store, monkeypatch) -> None:
    """The store's lock lives in the session: once that session is gone, the call in
    progress must fail rather than continue its writes on a new, unlocked session."""
    from biotemplate.vault import Vault

    enrol(pg_store, vectors(5, 15), "lk")
    real = Vault.prepare_rotation

    def killed_first(self: Vault, ref: bytes) -> int:
        terminate(pg_server, pg_url)
        return real(self, ref)

    monkeypatch.setattr(Vault, "prepare_rotation", killed_first)
    with pytest.raises(bt.StorageError, match="lost the connection"):
        pg_store.erase_subject("lk2", actor="t")
    monkeypatch.undo()
    assert len(pg_store.export_subject("lk2", actor="t")) == 1  # nothing happened
    assert pg_store.erase_subject("lk2", actor="t").key_destroyed  # and the next call works
    assert pg_store.audit.verify().ok
