"""Clock abuse (docs/architecture.md §2, SECURITY.md §4 "Clock").

The store's time is max(clock(), the highest time it has seen), persisted in the keyring
and the audit trail, so:

- a clock set back never un-expires a record, in the running store or after a reopen;
- a clock jumped far forward hides live records as expired but shreds nothing until an
  explicit ``purge_expired()``; the high-water mark then keeps them hidden (fail closed);
- the ratchet epoch never moves backwards;
- a clock returning a naive datetime or a non-datetime is refused with InvalidInput,
  and such a refusal writes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.synthetic import strangers

DIM = 64
MODEL = "test-model-v1"
TEMPLATES = strangers(6, DIM, seed=31)
SHORT = "CLOCK-SHORT"  # enrolled for 1 hour
LONG = "CLOCK-LONG"  # enrolled for 30 days (the control)


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """Stores reopened by a test; closed at teardown."""
    stores: list[Any] = []
    yield stores
    for s in stores:
        try:
            s.close()
        except bt.BiotemplateError:
            pass


def reopen(store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
           opened: list[Any], **kwargs: Any) -> bt.TemplateStore:
    store.close()
    again = bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock, **kwargs)
    opened.append(again)
    return again


def enrol(store: bt.TemplateStore) -> dict[str, list[str]]:
    short = store.enroll_many(TEMPLATES[:2], subject_ids=[SHORT, SHORT], purposes=["rare"],
                              ttl=timedelta(hours=1), actor="svc")
    long = store.enroll_many(TEMPLATES[2:4], subject_ids=[LONG, LONG], purposes=["rare"],
                             ttl=timedelta(days=30), actor="svc")
    return {SHORT: short, LONG: long}


def visible(store: bt.TemplateStore, subject: str, template: np.ndarray) -> dict[str, bool]:
    """Whether search, verify and export each still see the subject's records."""
    found = store.search(template, purpose="rare", k=5, mode="investigation", actor="t")
    try:
        store.verify(template, subject_id=subject, purpose="rare", actor="t")
        verified = True
    except bt.RecordNotFound:
        verified = False
    return {"search": any(c.subject_id == subject for c in found.candidates),
            "verify": verified,
            "export": bool(store.export_subject(subject, actor="t"))}


HIDDEN = {"search": False, "verify": False, "export": False}
SHOWN = {"search": True, "verify": True, "export": True}


# --- a clock set back ------------------------------------------------------------------------


def test_clock_set_back_never_unexpires_in_the_running_store(store: bt.TemplateStore,
                                                             clock: Any) -> None:
    enrol(store)
    start = clock.now
    assert visible(store, SHORT, TEMPLATES[0]) == SHOWN
    clock.advance(hours=2)
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN  # observed expired
    clock.now = start - timedelta(days=1)  # set back before the enrolment
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN
    assert visible(store, LONG, TEMPLATES[2]) == SHOWN
    assert store.stats().records == 4  # hidden, not shredded


@pytest.mark.parametrize("snapshot_on_close", [True, False], ids=["snapshot", "rebuild"])
def test_clock_set_back_never_unexpires_after_a_reopen(
    store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
    opened: list[Any], snapshot_on_close: bool,
) -> None:
    """The record expired and was observed expired; then the host clock is set back
    while the store runs, and the store is reopened: the record must stay expired."""
    enrol(store)
    start = clock.now
    clock.advance(hours=2)
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN
    clock.now = start
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN
    store._snapshot_on_close = snapshot_on_close
    again = reopen(store, store_dir, keys, clock, opened)
    assert visible(again, LONG, TEMPLATES[2]) == SHOWN
    assert visible(again, SHORT, TEMPLATES[0]) == HIDDEN


def test_clock_set_back_after_close_never_unexpires(
    store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
    opened: list[Any],
) -> None:
    """Closed with the clock still ahead, reopened with it set back."""
    enrol(store)
    start = clock.now
    clock.advance(hours=2)
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN
    store.close()
    clock.now = start
    again = reopen(store, store_dir, keys, clock, opened)
    assert visible(again, SHORT, TEMPLATES[0]) == HIDDEN


def test_audit_times_never_run_backwards(store: bt.TemplateStore, clock: Any) -> None:
    """The audit is one of the two places the high-water mark lives: an entry written
    after the clock was set back must not carry an earlier time than the one before it."""
    enrol(store)
    clock.advance(hours=2)
    ahead = store.search(TEMPLATES[0], purpose="rare", actor="t").audit_seq
    clock.advance(hours=-3)
    later = store.search(TEMPLATES[0], purpose="rare", actor="t").audit_seq
    assert later > ahead
    t_ahead = store.audit.get(ahead).ts_end
    t_later = store.audit.get(later).ts_end
    assert t_later >= t_ahead, (t_ahead, t_later)


# --- a clock jumped forward ------------------------------------------------------------------


def test_forward_jump_hides_live_records_but_shreds_nothing(store: bt.TemplateStore,
                                                            clock: Any) -> None:
    enrol(store)
    before = store.stats()
    clock.advance(days=3653)  # ten years
    assert visible(store, LONG, TEMPLATES[2]) == HIDDEN
    after = store.stats()
    assert after.records == before.records == 4
    assert after.epoch == before.epoch  # the ratchet did not move
    assert after.shredded_rows == 0 and after.subjects == 2
    clock.advance(days=-3653)  # set back: the high-water mark keeps them hidden
    assert visible(store, LONG, TEMPLATES[2]) == HIDDEN
    assert store.stats().records == 4


def test_forward_jump_then_reopen_with_the_clock_still_ahead_shreds_nothing(
    store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
    opened: list[Any],
) -> None:
    enrol(store)
    epoch = store.stats().epoch
    clock.advance(days=3653)
    again = reopen(store, store_dir, keys, clock, opened)
    stats = again.stats()
    assert stats.records == 4 and stats.epoch == epoch and stats.shredded_rows == 0
    assert visible(again, LONG, TEMPLATES[2]) == HIDDEN


def test_forward_jump_then_set_back_and_reopen_keeps_records_hidden_until_purged(
    store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
    opened: list[Any],
) -> None:
    """SECURITY.md: after a jump the high-water mark keeps those records hidden (fail
    closed), and only an explicit purge shreds them."""
    enrol(store)
    start, epoch = clock.now, store.stats().epoch
    clock.advance(days=3653)
    assert visible(store, LONG, TEMPLATES[2]) == HIDDEN
    clock.now = start  # the operator fixes the host clock, the service restarts
    again = reopen(store, store_dir, keys, clock, opened)
    stats = again.stats()
    assert stats.records == 4 and stats.epoch == epoch  # present: not shredded
    assert visible(again, LONG, TEMPLATES[2]) == HIDDEN
    report = again.purge_expired()  # the explicit purge is what shreds them
    assert report.purged == 4
    assert again.stats().records == 0
    assert again.stats().epoch > epoch + 3600


# --- the ratchet ------------------------------------------------------------------------------


def test_ratchet_never_moves_backwards(store: bt.TemplateStore, store_dir: Path,
                                       keys: bt.FileKeyProvider, clock: Any,
                                       opened: list[Any]) -> None:
    enrol(store)
    start, e0 = clock.now, store.stats().epoch
    clock.advance(days=3)
    first = store.purge_expired()
    e1 = store.stats().epoch
    assert e1 == e0 + 3 and first.epoch_after == e1 and first.purged == 2
    epochs = [e1]
    clock.now = start - timedelta(days=5)
    report = store.purge_expired()
    assert report.epoch_before == report.epoch_after == e1
    epochs.append(store.stats().epoch)
    # A record enrolled with the clock set back is sealed from the store's time, so its
    # epoch key still exists: it is readable, not born shredded.
    new = store.enroll(TEMPLATES[4], subject_id="CLOCK-NEW", purposes=["rare"],
                       ttl=timedelta(hours=1), actor="svc")
    assert visible(store, "CLOCK-NEW", TEMPLATES[4]) == SHOWN
    again = reopen(store, store_dir, keys, clock, opened)
    epochs.append(again.stats().epoch)
    again.purge_expired()
    epochs.append(again.stats().epoch)
    assert epochs == sorted(epochs) and min(epochs) == e1, epochs
    assert [v.record_id for v in again.export_subject("CLOCK-NEW", actor="t")] == [new]


# --- bad clocks --------------------------------------------------------------------------------


BAD_CLOCK_VALUES = [
    pytest.param(datetime(2026, 1, 2), id="naive-datetime"),
    pytest.param(None, id="None"),
    pytest.param(1_767_225_600.0, id="float-timestamp"),
    pytest.param(1_767_225_600, id="int-timestamp"),
    pytest.param("2026-01-02T00:00:00+00:00", id="iso-string"),
    pytest.param(dt.date(2026, 1, 2), id="date"),
]


@pytest.mark.parametrize("value", BAD_CLOCK_VALUES)
def test_bad_clock_refused_at_create(store_dir: Path, policy: bt.RetentionPolicy,
                                     keys: bt.FileKeyProvider, value: object) -> None:
    with pytest.raises(bt.InvalidInput):
        bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=lambda: value)
    assert not store_dir.exists() or not any(store_dir.iterdir())


def test_clock_not_callable_is_refused(store_dir: Path, policy: bt.RetentionPolicy,
                                       keys: bt.FileKeyProvider) -> None:
    with pytest.raises(bt.InvalidInput):
        bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=datetime.now(UTC))  # type: ignore
    assert not store_dir.exists() or not any(store_dir.iterdir())


@pytest.mark.parametrize("value", BAD_CLOCK_VALUES)
def test_bad_clock_refused_at_open(store: bt.TemplateStore, store_dir: Path,
                                   keys: bt.FileKeyProvider, value: object) -> None:
    store.close()
    with pytest.raises(bt.InvalidInput):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=lambda: value)


class Switchable:
    """A clock that turns bad on demand."""

    def __init__(self, good: Any) -> None:
        self.good, self.bad, self.value = good, False, None

    def __call__(self) -> Any:
        return self.value if self.bad else self.good()


@pytest.mark.parametrize("value", BAD_CLOCK_VALUES)
def test_clock_turning_bad_mid_life_is_refused_and_writes_nothing(
    store_dir: Path, policy: bt.RetentionPolicy, keys: bt.FileKeyProvider, clock: Any,
    value: object,
) -> None:
    switch = Switchable(clock)
    store = bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                    key_provider=keys, clock=switch)
    try:
        ids = enrol(store)
        entries, stats = store.audit.verify().entries, store.stats()
        keyring = (store_dir / "keyring").read_bytes()
        switch.bad, switch.value = True, value
        calls = [
            lambda: store.enroll(TEMPLATES[5], subject_id="CLOCK-X", purposes=["rare"],
                                 actor="svc"),
            lambda: store.enroll_many(TEMPLATES[4:], subject_ids=["CLOCK-X", "CLOCK-Y"],
                                      purposes=["rare"], actor="svc"),
            lambda: store.search(TEMPLATES[0], purpose="rare", actor="t"),
            lambda: store.search_many(TEMPLATES[:2], purpose="rare", actor="t"),
            lambda: store.verify(TEMPLATES[2], subject_id=LONG, purpose="rare", actor="t"),
            lambda: store.export_subject(LONG, actor="t"),
            lambda: store.erase_subject(SHORT, actor="t"),
            lambda: store.purge_expired(),
        ]
        for call in calls:
            with pytest.raises(bt.InvalidInput):
                call()
        switch.bad = False
        assert store.stats() == stats
        assert (store_dir / "keyring").read_bytes() == keyring
        report = store.audit.verify()
        assert report.ok and report.entries == entries
        assert visible(store, SHORT, TEMPLATES[0]) == SHOWN  # still works
        assert [v.record_id for v in store.export_subject(SHORT, actor="t")] == ids[SHORT]
    finally:
        switch.bad = False
        store.close()


def test_aware_clock_in_another_timezone_is_the_same_instant(
    store: bt.TemplateStore, clock: Any,
) -> None:
    """A non-UTC aware clock is fine: only the instant counts."""
    enrol(store)
    plus5 = timezone(timedelta(hours=5))
    clock.now = (clock.now + timedelta(minutes=59)).astimezone(plus5)
    assert visible(store, SHORT, TEMPLATES[0]) == SHOWN
    clock.now = (clock.now + timedelta(minutes=2)).astimezone(plus5)
    assert visible(store, SHORT, TEMPLATES[0]) == HIDDEN
