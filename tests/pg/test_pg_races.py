"""Instances racing one another on PostgreSQL: the cases an adversarial review found.

Each test makes one interleaving happen on purpose (a paused thread, a patched step, a
stopped feed) instead of hoping for it; deadlines are generous and nothing is timed.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

import biotemplate as bt
from biotemplate.backends import postgres
from biotemplate.backends.pg_schema import grant_statements
from biotemplate.backends.postgres import CommitUnknown, PostgresBackend, parse_url
from biotemplate.vault import Vault
from tests.conftest import DIM, MODEL, FakeClock
from tests.pg.test_pg_store import enrol, sql, vectors


@pytest.fixture
def pg_store(pg_url, policy, keys, clock):
    s = bt.TemplateStore.create(pg_url, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    yield s
    s.close()


def crowded(store: bt.TemplateStore, pool: list[str]) -> tuple[str, list[str]]:
    """A subject of ``pool`` and the others that share its bucket (the most crowded one)."""
    vault = store._p.vault
    buckets: dict[int, list[str]] = {}
    for s in pool:
        buckets.setdefault(vault.keyring.bucket_of(vault.subject_ref(s)), []).append(s)
    members = max(buckets.values(), key=len)
    assert len(members) >= 4
    return members[0], members[1:]


def test_an_instance_opening_mid_change_waits_and_destroys_no_pending_key(
        pg_url, keys, clock, pg_store, monkeypatch) -> None:
    n = 3000  # enough subjects that some share the erased one's bucket
    enrol(pg_store, vectors(n, 20), "b")
    victim, neighbours = crowded(pg_store, [f"b{i}" for i in range(n)])
    prepared, go = threading.Event(), threading.Event()
    real = Vault.prepare_rotation

    def paused(self: Vault, ref: bytes) -> int:
        bucket = real(self, ref)  # the pending key is saved; the commit comes next
        prepared.set()
        go.wait(30)
        return bucket

    monkeypatch.setattr(Vault, "prepare_rotation", paused)
    erased: list[object] = []
    eraser = threading.Thread(target=lambda: erased.append(
        pg_store.erase_subject(victim, actor="t")))
    eraser.start()
    assert prepared.wait(30)
    opened: list[bt.TemplateStore] = []
    opener = threading.Thread(target=lambda: opened.append(
        bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)))
    opener.start()
    opener.join(1.0)  # it must wait for the store's lock, not act on the pending key
    go.set()
    eraser.join(60)
    opener.join(60)
    monkeypatch.undo()
    assert erased and opened
    other = opened[0]
    try:
        assert other.stats().generation == pg_store.stats().generation == 1
        for subject in neighbours[:5]:
            assert len(other.export_subject(subject, actor="t")) == 1
            assert len(pg_store.export_subject(subject, actor="t")) == 1
        assert other.erase_subject(neighbours[0], actor="t").key_destroyed
        assert pg_store.stats().generation == 2
        assert len(pg_store.export_subject(neighbours[-1], actor="t")) == 1
    finally:
        other.close()


def test_a_commit_whose_reply_is_lost_is_completed_not_reused(pg_store, monkeypatch) -> None:
    n = 3000
    enrol(pg_store, vectors(n, 21), "c")
    victim, neighbours = crowded(pg_store, [f"c{i}" for i in range(n)])
    real = PostgresBackend.transaction

    def reply_lost(self: PostgresBackend):  # committed, but the caller hears otherwise
        class Lost:
            def __enter__(inner):
                inner.cm = real(self)
                return inner.cm.__enter__()

            def __exit__(inner, *exc):
                inner.cm.__exit__(*exc)
                if exc[0] is None:
                    raise CommitUnknown("lost the connection to PostgreSQL during COMMIT")
                return False
        return Lost()

    monkeypatch.setattr(PostgresBackend, "transaction", reply_lost)
    with pytest.raises(CommitUnknown, match="COMMIT"):
        pg_store.erase_subject(victim, actor="t")
    monkeypatch.undo()
    receipt = pg_store.erase_subject(neighbours[0], actor="t")  # same bucket
    assert receipt.key_destroyed
    assert pg_store.stats().generation == 2  # not the first change's generation again
    for subject in neighbours[1:4]:
        assert len(pg_store.export_subject(subject, actor="t")) == 1
    assert pg_store.export_subject(victim, actor="t") == []
    events = [pg_store.audit.get(s).event for s in range(1, pg_store.audit.checkpoint().seq + 1)]
    assert "rollforward" in events


def test_a_purge_whose_key_save_never_came_is_completed_by_the_next_writer(
        pg_url, keys, pg_store, monkeypatch) -> None:
    clock = FakeClock()
    a = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    try:
        enrol(a, vectors(4, 22), "p", ttl=timedelta(days=2))
        clock.advance(days=5)
        epoch_before = a.stats().epoch

        def died(self: Vault) -> None:
            raise SystemExit("killed after the commit")  # stands for the process dying

        monkeypatch.setattr(Vault, "apply_staged", died)
        with pytest.raises(SystemExit):
            a.purge_expired()
        monkeypatch.undo()
        b = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
        try:
            stats = b.stats()
            assert stats.generation == 1 and stats.epoch > epoch_before  # the ratchet moved
            assert stats.records == 0
            events = [b.audit.get(s).event for s in range(1, b.audit.checkpoint().seq + 1)]
            assert events.count("rollforward") == 1
        finally:
            b.close()
    finally:
        a._follower.stop()
        a._p.release()


def test_a_snapshot_claims_only_what_the_index_applied(pg_url, keys, clock, pg_store,
                                                      tmp_path) -> None:
    vecs = vectors(20, 23)
    enrol(pg_store, vecs[:10], "old")
    cache = tmp_path / "cache"
    cache.mkdir()
    lagging = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, snapshot_dir=cache)
    lagging._follower.stop()  # its feed falls behind
    pg_store.erase_subject("old0", actor="t")
    new = enrol(pg_store, vecs[10:11], "new")
    lagging.close()  # catches up before it seals the snapshot
    with bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock,
                               snapshot_dir=cache) as again:
        assert again.stats().indexed == 10  # old1..old9 and new0, not old0
        hit = again.search(vecs[10], purpose="watchlist", actor="t").candidates
        assert hit and hit[0].record_id == new[0]
        r = again.search(vecs[0], purpose="watchlist", k=10, actor="t", mode="investigation")
        assert all(c.subject_id != "old0" for c in r.candidates)


def test_searches_go_on_while_another_instance_holds_the_store_lock(
        pg_url, keys, clock, pg_store) -> None:
    vecs = vectors(10, 24)
    enrol(pg_store, vecs, "s")
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pg_store._p.lock:  # what a long mutation holds
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        found: list[object] = []
        searcher = threading.Thread(target=lambda: found.append(
            other.search(vecs[3], purpose="watchlist", actor="t")))
        searcher.start()
        searcher.join(20)
        assert found, "a search waited for another instance's lock"
    finally:
        release.set()
        holder.join(30)
        other.close()


def test_a_record_resealed_elsewhere_is_served_before_the_feed_applies_it(
        pg_url, keys, clock, pg_store) -> None:
    vecs = vectors(10, 25)
    enrol(pg_store, vecs, "h")
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock)
    try:
        other._follower.stop()  # the feed will not bring the reseal
        pg_store.place_hold("h4", actor="legal", reason="case 9")
        with other._p.lock.reading():  # what any locked call does: the newest keys
            pass
        hit = other.search(vecs[4], purpose="watchlist", actor="t").candidates
        assert hit and hit[0].subject_id == "h4"  # authenticated again on demand
        assert other.stats().integrity_failures == 0
    finally:
        other.close()


def test_after_a_master_key_rotation_elsewhere_an_instance_fails_clearly_and_closes(
        pg_url, keys, clock, pg_store, tmp_path) -> None:
    enrol(pg_store, vectors(3, 26), "m")
    other = bt.TemplateStore.open(pg_url, key_provider=keys, clock=clock, poll_interval=0.05)
    pg_store.rotate_master_key(bt.FileKeyProvider.generate(tmp_path / "new.key"), actor="t")
    with pytest.raises(bt.KeyUnavailable):
        other.erase_subject("m1", actor="t")  # it cannot read the new key state
    for _ in range(200):
        if other._follower.lag_error:
            break
        threading.Event().wait(0.05)
    assert "master key" in str(other._follower.lag_error)
    with pytest.raises(bt.KeyUnavailable):
        other.close()
    assert other._p.closed  # released all the same: no connection left behind


def test_lock_waits_end_with_a_clear_error(pg_server, pg_url, pg_store, monkeypatch) -> None:
    enrol(pg_store, vectors(3, 27), "w")
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_S", 0.5)
    key = parse_url(pg_url).lock_key("writer")
    import psycopg

    with psycopg.connect(pg_server, autocommit=True) as squatter:
        squatter.execute("SELECT pg_advisory_lock(%s)", (key,))
        with pytest.raises(bt.StorageError, match="not granted"):
            pg_store.erase_subject("w1", actor="t")
    assert pg_store.erase_subject("w1", actor="t").key_destroyed


def test_the_server_defaults_do_not_change_isolation_or_durability(pg_server, pg_url, keys,
                                                                   clock, pg_store) -> None:
    options = ("options=-c%20default_transaction_isolation%3Dserializable"
               "%20-c%20synchronous_commit%3Doff")
    url = pg_url.replace("?", f"?{options}&")
    with bt.TemplateStore.open(url, key_provider=keys, clock=clock) as s:
        db = s._p.vault.rows
        with db.transaction():
            assert db._query("t", "SHOW transaction_isolation")[0][0] == "read committed"
            assert db._query("t", "SHOW synchronous_commit")[0][0] == "on"
        enrol(s, vectors(3, 28), "i")
        assert s.search(vectors(3, 28)[1], purpose="watchlist", actor="t").decision


def test_grants_refuse_names_that_reach_every_role() -> None:
    for name in ("public", "current_user", "session_user"):
        with pytest.raises(bt.InvalidInput):
            grant_statements("watch", service=name)
    with pytest.raises(bt.InvalidInput):
        grant_statements("watch", auditor="Robert'); DROP TABLE x;--")


def test_the_auditor_role_cannot_take_the_audit_lock(pg_server, pg_url, pg_store) -> None:
    import secrets

    import psycopg

    auditor = f"bt_aud_{secrets.token_hex(4)}"
    sql(pg_server, f"CREATE ROLE {auditor} LOGIN")
    try:
        postgres.grant_roles(pg_url, auditor=auditor)
        schema = parse_url(pg_url).schema
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with psycopg.connect(pg_server.replace("postgres@", f"{auditor}@")) as conn:
                conn.execute(f"SELECT 1 FROM {schema}.audit_lock FOR UPDATE")
    finally:
        sql(pg_server, f"DROP OWNED BY {auditor}")
        sql(pg_server, f"DROP ROLE {auditor}")

