"""Fixtures of the command-line suites (helpers are in ``clihelp.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from clihelp import Site, make_site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A store of 10 identities x 2 samples (watchlist) plus 3 of them on "rare"."""
    return make_site(tmp_path)
