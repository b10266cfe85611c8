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


DOCS = README.parent / "docs"
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_readme_links_every_doc() -> None:
    text = README.read_text()
    for doc in sorted(DOCS.glob("*.md")):
        assert f"docs/{doc.name}" in text, f"README.md does not link docs/{doc.name}"


def test_security_review_cites_real_tests() -> None:
    """Every claim in docs/security-review.md names a test that exists (and so do the
    other docs that cite tests)."""
    root = README.parent
    cited = [m for doc in DOCS.glob("*.md") for m in CITED.findall(doc.read_text())]
    assert len(cited) > 40
    for path, name in cited:
        source = root / path
        assert source.is_file(), path
        assert re.search(rf"^def {name}\(", source.read_text(), re.M), f"{path}::{name}"
