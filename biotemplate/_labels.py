"""What the index knows about each label: record id, subject ref, expiry, purposes.

Labels are ints handed out in order and never reused, so each table is a column indexed
by label instead of a dict keyed by it: Python lists for the record ids and subject refs
(a search hands those objects out), numpy arrays for expiry and purpose sets, and one dict
from record id to label (removal is by record id). A search then filters its ~40
candidate labels with one array read, and 100k records cost ~30 bytes a label besides
their strings instead of six dicts and a heap (~60 MB at 100k, measured in RESULTS.md).

Not thread-safe: the index changes it under its write lock and reads it under its read
lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["GONE", "NEVER", "LabelTable"]

GONE = np.iinfo(np.int64).min  # the expiry of a label that is not held (removed, failed)
NEVER = np.iinfo(np.int64).max  # no expiry due
_START = 1_024


class LabelTable:
    """The columns by label, and the record id -> label map."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self.refs: list[bytes | None] = []
        self.expiry: NDArray[np.int64] = np.full(_START, GONE, dtype=np.int64)
        self.tags: NDArray[np.uint32] = np.zeros(_START, dtype=np.uint32)
        self.hidden: NDArray[np.bool_] = np.zeros(_START, dtype=np.bool_)  # expired, seen
        self.tag_sets: list[tuple[str, ...]] = []
        self._tag_index: dict[tuple[str, ...], int] = {}
        self.label_of: dict[str, int] = {}
        self.next_expiry = int(NEVER)  # the earliest expiry not hidden yet

    def __len__(self) -> int:
        return len(self.label_of)

    @property
    def next_label(self) -> int:
        return len(self.ids)

    def allocate(self, n: int) -> range:
        """``n`` new labels, held by no record until :meth:`put` (a failed add leaves
        them GONE for ever: labels are never reused)."""
        start = len(self.ids)
        self.ids.extend([None] * n)
        self.refs.extend([None] * n)
        self._grow(start + n)
        return range(start, start + n)

    def put(self, labels: Sequence[int], ids: Sequence[str], refs: Sequence[bytes],
            expiries: Sequence[int], tags: Sequence[tuple[str, ...]]) -> None:
        at = np.asarray(labels, dtype=np.intp)
        for label, rid, ref in zip(labels, ids, refs, strict=True):
            self.ids[label], self.refs[label] = rid, ref
            self.label_of[rid] = label
        exp = np.asarray(expiries, dtype=np.int64)
        self.expiry[at] = exp
        self.tags[at] = [self._tag(t) for t in tags]
        if exp.size:
            self.next_expiry = min(self.next_expiry, int(exp.min()))

    def drop(self, labels: Iterable[int]) -> None:
        """Forget labels: from now on no search returns them."""
        for label in labels:
            rid = self.ids[label]
            if rid is not None:
                del self.label_of[rid]
            self.ids[label] = self.refs[label] = None
            self.expiry[label] = GONE

    def purposes(self, label: int) -> tuple[str, ...]:
        return self.tag_sets[int(self.tags[label])]

    def expire(self, now_us: int) -> NDArray[np.int64]:
        """Labels held whose expiry is <= ``now_us`` and that were not returned before;
        moves ``next_expiry`` past them."""
        if now_us < self.next_expiry:
            return np.empty(0, dtype=np.int64)
        n = len(self.ids)
        exp, hidden = self.expiry[:n], self.hidden[:n]
        due = np.flatnonzero((exp <= now_us) & (exp != GONE) & ~hidden)
        hidden[due] = True
        later = exp[exp > now_us]
        self.next_expiry = int(later.min()) if later.size else int(NEVER)
        return due.astype(np.int64)

    def by_purpose(self, labels: NDArray[np.int64] | Sequence[int]) -> dict[str, list[int]]:
        """The labels grouped by each of their purposes."""
        out: dict[str, list[int]] = {}
        if len(labels) < 64:  # a deletion's few labels: no array round trip
            for label in labels:
                for purpose in self.tag_sets[int(self.tags[label])]:
                    out.setdefault(purpose, []).append(int(label))
            return out
        at = np.asarray(labels, dtype=np.int64)
        tags = self.tags[at]
        for tag in np.unique(tags).tolist():
            group = at[tags == tag].tolist()
            for purpose in self.tag_sets[tag]:
                out.setdefault(purpose, []).extend(group)
        return out

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    # -- snapshots ---------------------------------------------------------------------

    def columns(self) -> dict[str, object]:
        """The held labels' columns, for a sealed snapshot (in label order)."""
        labels = [lb for lb, rid in enumerate(self.ids) if rid is not None]
        at = np.asarray(labels, dtype=np.intp)
        return {"ids": [self.ids[lb] for lb in labels],
                "labels": np.asarray(labels, dtype=np.uint64),
                "subjects": [self.refs[lb] for lb in labels],
                "expiry": self.expiry[at].copy(),
                "tag_sets": [list(t) for t in self.tag_sets],
                "tags": self.tags[at].copy()}

    @classmethod
    def checked(cls, ids: object, labels: NDArray[np.uint64], refs: object,
                expiry: NDArray[np.int64], tag_sets: list[tuple[str, ...]],
                tags: NDArray[np.uint32], next_label: int) -> LabelTable:
        """:meth:`from_columns` after checking them (a snapshot of another store or
        version must not load).

        Raises:
            ValueError: the columns disagree (lengths, types, bounds, a label or a record
                id twice).
        """
        if not isinstance(ids, list) or not isinstance(refs, list):
            raise ValueError("record columns")
        n = len(ids)
        if (not labels.shape == expiry.shape == tags.shape == (n,) or len(refs) != n
                or not set(map(type, ids)) <= {str} or not set(map(type, refs)) <= {bytes}
                or (n and (int(tags.max()) >= len(tag_sets)
                           or int(labels.max()) >= next_label))):
            raise ValueError("record columns")
        used = np.zeros(next_label, dtype=np.bool_)
        used[labels.astype(np.intp)] = True
        table = cls.from_columns(ids, labels, refs, expiry, tag_sets, tags, next_label)
        if int(used.sum()) != n or len(table) != n:
            raise ValueError("record columns")
        return table

    @classmethod
    def from_columns(cls, ids: list[str], labels: NDArray[np.uint64], refs: list[bytes],
                     expiry: NDArray[np.int64], tag_sets: list[tuple[str, ...]],
                     tags: NDArray[np.uint32], next_label: int) -> LabelTable:
        """Rebuild from :meth:`columns` (checked by the caller: lengths, types, bounds)."""
        table = cls()
        at = labels.astype(np.intp)
        table._grow(next_label)
        if len(ids) == next_label and np.array_equal(at, np.arange(next_label)):
            table.ids, table.refs = list(ids), list(refs)  # no label ever removed
        else:
            by_label = np.full(next_label, None, dtype=object)
            by_label[at] = ids
            table.ids = by_label.tolist()
            by_label[:] = None
            by_label[at] = refs
            table.refs = by_label.tolist()
        table.expiry[at] = expiry
        table.tags[at] = tags
        table.tag_sets = list(tag_sets)
        table._tag_index = {t: i for i, t in enumerate(tag_sets)}
        table.label_of = dict(zip(ids, labels.tolist(), strict=True))
        held = expiry[expiry != GONE]
        table.next_expiry = int(held.min()) if held.size else int(NEVER)
        return table

    # -- internals ---------------------------------------------------------------------

    def _tag(self, tags: tuple[str, ...]) -> int:
        index = self._tag_index.get(tags)
        if index is None:
            index = self._tag_index[tags] = len(self.tag_sets)
            self.tag_sets.append(tags)
        return index

    def _grow(self, n: int) -> None:
        size = self.expiry.shape[0]
        if n <= size:
            return
        while size < n:
            size *= 2
        self.expiry = np.concatenate([self.expiry, np.full(size - self.expiry.shape[0], GONE,
                                                           dtype=np.int64)])
        self.tags = np.concatenate([self.tags, np.zeros(size - self.tags.shape[0],
                                                        dtype=np.uint32)])
        self.hidden = np.concatenate([self.hidden, np.zeros(size - self.hidden.shape[0],
                                                            dtype=np.bool_)])
