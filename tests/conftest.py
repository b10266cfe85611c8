"""Shared fixtures: a movable clock, the reference policy, a key, a small store, a gallery.

Keep this file small and general; suite-specific helpers belong in the suite's own module.
Stores use dim=64 so that the whole test run stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery, make_gallery

DIM = 64
MODEL = "test-model-v1"
START = datetime(2026, 1, 1, tzinfo=UTC)

POLICY: dict[str, Any] = {
    "epoch": "1d",
    "purposes": {
        "border-verification": {
            "max_retention": "12h", "default_retention": "12h",
            "modes": ["verification"], "match_threshold": 0.6,
        },
        "watchlist": {
            "max_retention": "3y", "modes": ["identification", "investigation"],
            "match_threshold": 0.55, "max_candidates": 20,
            "allowed_sources": ["enrolment-desk", "case-file"],
        },
        "rare": {
            "max_retention": "30d", "default_retention": "7d",
            "modes": ["identification", "investigation", "verification"],
            "match_threshold": 0.55,
        },
    },
}


class FakeClock:
    """A zero-argument callable returning an aware UTC datetime that tests move by hand."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        """Move forward by ``timedelta(**kwargs)``; returns the new time."""
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def policy() -> bt.RetentionPolicy:
    """Immutable, so one instance serves every test (and module-scoped fixtures)."""
    return bt.RetentionPolicy.from_dict(POLICY)


@pytest.fixture
def keys(tmp_path: Path) -> bt.FileKeyProvider:
    return bt.FileKeyProvider.generate(tmp_path / "master.key")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path, policy: bt.RetentionPolicy, keys: bt.FileKeyProvider,
          clock: FakeClock) -> Iterator[bt.TemplateStore]:
    s = bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    yield s
    with contextlib.suppress(Exception):
        s.close()


@pytest.fixture
def gallery() -> Gallery:
    """50 identities x 2 samples, dim 64; row i belongs to ``subject_ids[i]``."""
    return make_gallery(50, 2, DIM, seed=3)
