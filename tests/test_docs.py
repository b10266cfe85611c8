"""The README's Python blocks run as written (docs that match behaviour)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_a_quickstart() -> None:
    assert BLOCKS, "README.md lost its python quickstart"
    text = README.read_text()
    assert "make demo" in text and "make test" in text


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(block: str) -> None:
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
