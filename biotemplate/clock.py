"""The store's time: an injected clock that is never allowed to run backwards.

Time is injected (``clock=``, a zero-argument callable returning an aware UTC datetime) so
that tests and operators can move it; nothing deep inside the library reads the system
clock. Expiry checks and audit timestamps both read the store's :class:`StoreClock`, so a
clock set back can neither un-expire a record nor write an audit entry that predates the
one before it. Its high-water mark is persisted (keyring, audit trail) and restored on open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .errors import InvalidInput

Clock = Callable[[], datetime]

_UNIX = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(2999, 12, 31, tzinfo=UTC)


def to_us(t: datetime) -> int:
    """Microseconds since 1970-01-01 UTC."""
    return (t - _UNIX) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return _UNIX + timedelta(microseconds=us)


def _checked_time(t: object) -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise InvalidInput("the clock must return an aware datetime (UTC)")
    if not _UNIX <= t <= _LATEST:  # expiries are computed from it: keep them in range
        raise InvalidInput("the clock returned a time outside 1970-2999")
    return t


def _utc_now() -> datetime:
    return datetime.now(UTC)


def checked_clock(clock: Clock | None) -> Clock:
    """The caller's clock after one trial call (the system clock when None).

    Raises:
        InvalidInput: not callable, or it returns a naive or out-of-range time.
    """
    if clock is None:
        return _utc_now
    if not callable(clock):
        raise InvalidInput("clock must be a zero-argument callable returning a datetime")
    _checked_time(clock())
    return clock


class StoreClock:
    """The injected clock behind a high-water mark: ``now_us`` never decreases."""

    def __init__(self, clock: Clock, high_water_us: int = 0) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # not the store lock: searches must not wait on it
        self.high_water_us = high_water_us

    def raise_to(self, t_us: int) -> None:
        with self._lock:
            self.high_water_us = max(self.high_water_us, t_us)

    def now_us(self) -> int:
        now = to_us(_checked_time(self._clock()))
        with self._lock:
            self.high_water_us = max(self.high_water_us, now)
            return self.high_water_us

    def __call__(self) -> datetime:
        return from_us(self.now_us())
