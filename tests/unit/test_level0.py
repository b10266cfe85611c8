"""Unit tests for biotemplate._level0: the checked view of hnswlib's level-0 block."""

from __future__ import annotations

from typing import Any

import hnswlib
import numpy as np
import pytest

from biotemplate import _level0
from biotemplate._level0 import DELETED, locate


def index_of(n: int = 300, d: int = 24, M: int = 8, capacity: int = 500) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = hnswlib.Index(space="ip", dim=d)
    index.init_index(max_elements=capacity, M=M, ef_construction=40, allow_replace_deleted=True)
    index.add_items(x, np.arange(1000, 1000 + n))
    index.set_ef(50)
    return index, x


def test_the_installed_hnswlib_is_seen() -> None:
    """The fast erasure and the snapshot load depend on it: an upgrade of hnswlib that
    changes the layout must fail here, not silently fall back to the slow path."""
    index, x = index_of()
    view = locate(index)
    assert view is not None
    assert view.block.shape == (300, (2 * 8 * 4 + 4) + 24 * 4 + 8)  # links, vector, label
    order = np.argsort(view.labels)
    assert np.array_equal(view.labels[order], np.arange(1000, 1300, dtype=np.uint64))
    assert np.array_equal(view.vectors[order], x)  # bit for bit what hnswlib stores
    assert not (view.flags & DELETED).any()


def test_the_view_follows_deletions_and_zeroes_only_what_it_is_told() -> None:
    index, x = index_of()
    view = locate(index)
    assert view is not None
    slot = int(np.flatnonzero(view.labels == 1005)[0])
    other = int(np.flatnonzero(view.labels == 1006)[0])
    slots, labels = np.array([slot], np.int64), np.array([1005], np.uint64)
    assert not view.zero(slots, labels)  # not marked deleted yet: refused
    index.mark_deleted(1005)
    assert view.flags[slot] & DELETED
    assert not view.zero(np.array([other], np.int64), labels)  # the slot holds another label
    assert not view.zero(np.array([10_000], np.int64), labels)  # out of range
    assert view.zero(slots, labels)
    assert not view.vectors[slot].any()
    assert np.array_equal(view.vectors[other], x[6])
    index.unmark_deleted(1005)
    assert not index.get_items([1005])[0].any()  # hnswlib reads the zeros too


def test_the_links_agree_with_hnswlib_and_a_survey_finds_every_row_naming_a_target() -> None:
    index, _ = index_of()
    view = locate(index)
    assert view is not None
    slot_of = {int(label): s for s, label in enumerate(view.labels)}
    assert view.links.shape == (300, 2 * 8)
    counts = view.link_counts.astype(int)
    assert counts.min() >= 1 and counts.max() <= 16
    for row in range(300):  # every link in use names another element
        used = view.links[row, : counts[row]]
        assert used.max() < 300 and row not in used.tolist()
    targets = np.array([slot_of[1005], slot_of[1200]], dtype=np.int64)
    rows, found = view.linking_to(targets, 0, 300)
    in_use = {(r, int(t)) for r in range(300) for t in targets
              if t in view.links[r, : view.link_counts[r]]}
    left = {(r, int(t)) for r in range(300) for t in targets  # by a list that shrank
            if t in view.links[r, view.link_counts[r]:]}
    assert in_use  # in-links exist
    expected = in_use | left
    assert {(int(r), int(t)) for r, t in zip(rows, found, strict=True)} == expected
    parts = [view.linking_to(targets, a, a + 64) for a in range(0, 300, 64)]  # in steps
    assert set(zip(np.concatenate([p[0] for p in parts]).tolist(),
                   np.concatenate([p[1] for p in parts]).tolist())) == expected


def test_unlink_drops_a_link_keeps_the_others_in_order_and_clears_what_lies_past_the_end(
        ) -> None:
    index, x = index_of()
    view = locate(index)
    assert view is not None
    target = 7
    rows, found = view.linking_to(np.array([target], np.int64), 0, 300)
    row = int(rows[0])
    before = view.links[row, : view.link_counts[row]].tolist()
    in_use = sum(target in view.links[r, : view.link_counts[r]].tolist() for r in set(rows))
    view.links[row, view.link_counts[row]:] = target  # as if a longer list had named it
    assert view.unlink(rows, found) == in_use  # a row can name it in use and after the end
    after = view.links[row, : view.link_counts[row]].tolist()
    assert after == [s for s in before if s != target]
    assert target not in view.links[row].tolist()  # nor after the end
    assert not view.linking_to(np.array([target], np.int64), 0, 300)[0].size
    assert view.unlink(rows, found) == 0  # gone already: nothing to drop
    labels, _ = index.knn_query(x[:20], k=5)  # the graph still searches
    assert (labels[:, 0] == np.arange(1000, 1020)).mean() >= 0.9


def test_an_unused_zero_does_not_name_element_zero() -> None:
    index, _ = index_of()
    view = locate(index)
    assert view is not None
    row = int(np.flatnonzero(view.link_counts < view.links.shape[1])[0])
    view.links[row, view.link_counts[row]:] = 0
    rows, _ = view.linking_to(np.array([0], np.int64), 0, 300)
    expected = [r for r in range(300) if 0 in view.links[r, : view.link_counts[r]]]
    assert sorted(rows.tolist()) == expected


@pytest.mark.parametrize("thing", [object(), 3, "index", np.zeros(4)])
def test_anything_else_is_not_an_index(thing: Any) -> None:
    assert locate(thing) is None


def test_a_proxy_around_an_index_is_refused() -> None:
    class Proxy:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    index, _ = index_of()
    assert locate(Proxy(index)) is None  # same answers from the API, another object


def test_an_empty_index_has_an_empty_view() -> None:
    index = hnswlib.Index(space="ip", dim=8)
    index.init_index(max_elements=10, M=4, ef_construction=10)
    view = locate(index)
    assert view is not None and view.block.shape[0] == 0
    assert view.labels.shape == (0,) and view.vectors.shape == (0, 8)


def test_a_field_that_disagrees_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field read is compared with the API: one off (here, the dimension the C++
    object reports) and the view is refused."""
    index, _ = index_of()
    real = _level0._read

    def skewed(address: int, size: int) -> bytes | None:
        data = real(address, size)
        if data is not None and size == _level0._INDEX.size:
            return (int.from_bytes(data[:4], "little") + 1).to_bytes(4, "little") + data[4:]
        return data

    monkeypatch.setattr(_level0, "_read", skewed)
    assert locate(index) is None


def test_without_proc_self_mem_or_another_version_nothing_is_seen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    index, _ = index_of()
    monkeypatch.setattr(_level0, "_read", lambda address, size: None)
    assert locate(index) is None
    monkeypatch.undo()
    monkeypatch.setattr(_level0, "_SUPPORTED", False)
    assert locate(index) is None
