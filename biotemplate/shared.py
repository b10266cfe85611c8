"""Creating and opening a store on PostgreSQL: how an instance of a shared store starts.

The SQLite path (``store.py``) takes the folder's writer lock and checks three files
against each other. On PostgreSQL, rows, key state and audit trail are one database, so:

- there is no writer lock: any number of instances open the store; mutations are
  serialised across them by the store's advisory lock, which also refreshes each
  instance's key state before it acts (``_calls.StoreLock``, ``Vault.refresh``);
- the audit entry of a mutation commits in the same transaction as its rows, so open has
  no "announced but never committed" case to look for; the key-state generation is still
  checked against the rows (a crash between a commit and the key-state save is completed);
- each instance builds its own index (from its own sealed snapshot in ``snapshot_dir``, or
  from the rows), then follows the change feed (``feed.Follower``) from the change it
  read before building, so nothing committed meanwhile is missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .audit import Checkpoint
from .audit_pg import PgAuditTrail
from .backends.postgres import PostgresBackend, parse_url
from .clock import Clock, StoreClock, checked_clock, to_us
from .errors import IntegrityError, InvalidInput
from .feed import Follower
from .gallery import Progress
from .index import IndexParams
from .keys import KeyProvider
from .policy import RetentionPolicy
from .vault import Vault

if TYPE_CHECKING:
    from .store import TemplateStore

__all__ = ["create", "open"]


class Instance:
    """What a shared store's handle holds instead of a folder's writer lock."""

    def release(self) -> None:
        """Nothing to give back: instances do not exclude one another."""


def create(cls: type[TemplateStore], url: str, *, dim: int, model: str,
           policy: RetentionPolicy, key_provider: KeyProvider, clock: Clock | None,
           index_params: IndexParams | None) -> TemplateStore:
    """``TemplateStore.create`` for a URL (dim, model and policy checked by it): schema,
    key state, settings and genesis entry; if any step fails, the schema is dropped."""
    location = parse_url(url)
    store_clock = StoreClock(checked_clock(clock))
    kek = key_provider.master_key()
    db = PostgresBackend.create(location)
    try:
        vault = Vault.create_shared(db, kek=kek, dim=dim, model=model, policy=policy,
                                    clock=store_clock)
        sign, verify, public = vault.audit_keys()
        trail = PgAuditTrail.create_in(db, store_id=vault.store_id, signer=sign,
                                       verifier=verify, clock=store_clock, public_key=public)
    except BaseException:
        try:
            db.drop()
        finally:
            db.close()
        raise
    return _started(cls, location.display, vault, trail, store_clock, index_params,
                    partition=None, snapshot_path=None, progress=None, poll_interval=0.5)


def open(cls: type[TemplateStore], url: str, *, key_provider: KeyProvider,
         clock: Clock | None, index_params: IndexParams | None, progress: Progress | None,
         checkpoint: Checkpoint | None, read_only: bool, partition: tuple[int, int] | None,
         snapshot_dir: str | os.PathLike[str] | None, poll_interval: float) -> TemplateStore:
    """``TemplateStore.open`` for a URL: a new instance of the shared store."""
    location = parse_url(url)
    partition = _checked_partition(partition)
    if isinstance(poll_interval, bool) or not isinstance(poll_interval, int | float) or not (
            0.01 <= poll_interval <= 60):
        raise InvalidInput("poll_interval must be between 0.01 and 60 seconds")
    snapshot_path = None
    if snapshot_dir is not None:
        part = "" if partition is None else f".{partition[0]}of{partition[1]}"
        snapshot_path = Path(snapshot_dir) / f"{location.schema}{part}.snapshot"
    store_clock = StoreClock(checked_clock(clock))
    kek = key_provider.master_key()
    db = PostgresBackend.open(location, read_only=read_only)
    try:
        vault = Vault.open_shared(db, kek=kek, clock=store_clock, read_only=read_only)
    except BaseException:
        db.close()
        raise
    try:
        sign, verify, public = vault.audit_keys()
        trail = PgAuditTrail.open_in(db, store_id=vault.store_id, signer=sign,
                                     verifier=verify, clock=store_clock, public_key=public,
                                     read_only=read_only)
        if checkpoint is not None and not trail.verify(checkpoint=checkpoint).ok:
            raise IntegrityError("the audit trail does not reach the checkpoint (the "
                                 "database restored from an older backup?)")
        last = trail.last()
    except BaseException:
        vault.close()
        raise
    if last is not None:  # the clock never runs back past what the audit has seen
        store_clock.raise_to(to_us(last.ts_end))
    if read_only:
        return cls(location.display, vault, trail, store_clock, index_params, False, None)
    return _started(cls, location.display, vault, trail, store_clock, index_params,
                    partition=partition, snapshot_path=snapshot_path, progress=progress,
                    poll_interval=poll_interval)


def _started(cls: type[TemplateStore], label: str, vault: Vault, trail: PgAuditTrail,
             clock: StoreClock, index_params: IndexParams | None, *,
             partition: tuple[int, int] | None, snapshot_path: Path | None,
             progress: Progress | None, poll_interval: float) -> TemplateStore:
    """Build the index, then start following the feed from before the build."""
    db = vault.rows
    assert isinstance(db, PostgresBackend)
    store = cls(label, vault, trail, clock, index_params, snapshot_path is not None,
                Instance(), snapshot_path=snapshot_path, partition=partition,
                across=_across(db, vault, trail))
    try:
        with store._p.lock:  # completes (and audits) a change a dead instance left
            after = db.last_change()  # changes committed while the index builds: replayed
        store._load_index(progress=progress, lost=None, last=None)
        follower = Follower(store._p, db, after=after, poll_interval=poll_interval)
        follower.catch_up()
        follower.start()
        store._follower = follower
    except BaseException:
        store._p.release()
        raise
    return store


def _across(db: PostgresBackend, vault: Vault,
            trail: PgAuditTrail) -> Callable[[bool], AbstractContextManager[None]]:
    @contextmanager
    def across(shared: bool) -> Iterator[None]:
        with db.global_lock(shared=shared):
            vault.refresh(write=not shared)
            trail.generation = vault.generation
            if vault.rolled_forward:  # a change a dead instance committed, completed here
                vault.rolled_forward = False
                trail.append("rollforward", actor=None,
                             lost_subject_keys=vault.lost_subject_keys)
            yield

    return across


def _checked_partition(partition: object) -> tuple[int, int] | None:
    if partition is None:
        return None
    if (not isinstance(partition, tuple) or len(partition) != 2
            or not all(type(x) is int for x in partition)):
        raise InvalidInput("partition must be a tuple (i, n) of ints")
    i, n = partition
    if not 1 <= n <= 4096 or not 0 <= i < n:
        raise InvalidInput("partition (i, n) needs 1 <= n <= 4096 and 0 <= i < n")
    return (i, n)
