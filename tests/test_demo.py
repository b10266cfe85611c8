"""``make demo`` must keep working: it is the README's first impression."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from biotemplate import demo


def test_demo_runs_to_the_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(tmp_path)
    out = capsys.readouterr().out
    assert "ok=True" in out  # the audit trail verifies
    assert "candidates=0" in out  # the stranger gets no candidate (open set)
    assert re.search(r"match=True score=", out)  # the traveller is verified
    # the old copy of records.db is refused: the keyring has seen a later key change
    assert "restored copy refused: records.db is older than the keyring" in out
    assert "Done." in out
