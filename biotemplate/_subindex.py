"""One purpose's hnswlib index, which of its labels are live, and how a label is erased.

Erasing a record is two jobs. Its **bytes** must go before the call returns; and so must,
soon after, its **place in the graph**: the links from and to a deleted element stay
behind ``mark_deleted``, and the mean of the neighbours they name lies within ~0.84
cosine of the erased template (median over 200 erased records, synthetic d=128 faces; a
genuine mate scores ~0.70), so a graph that keeps them keeps a usable copy of the face.
hnswlib's only way to rewrite an element, ``add_items`` on its label, does both jobs at
once: it stores a new vector and re-links the element and its neighbours around it, at
~6 ms an element at d=512. But it leaves the links of rows that name the element without
being among its neighbours (with M=32 their mean kept a median ~0.5 cosine to the face).

So, when :mod:`._level0` can see the block the vectors live in, an erasure here zeroes
the bytes at once (microseconds; ``erase``), and leaves the re-linking, the same
``add_items`` with a random unit vector, to ``repair``, which the index runs in small
batches between searches; ``survey`` first finds every row that names the element (a
read of the whole block, in steps, under the read lock), and after the update ``repair``
takes every erased element out of those rows and of the rows the update rewrote, and
zeroes what the update left after the end of the element's own list (out-link and in-link
means then score ~0). Without that view, ``erase`` does both through the API, as before
(the in-links stay as the update leaves them). Either way the element stays marked
deleted, and once repaired a later add may take its slot (``replace_deleted``), which
re-links it too.

``slots`` maps label -> element (slot) in hnswlib's block, ``dead`` the marked slots to
the label each held, so that an erasure finds its bytes without a scan of the block. Both
are rebuilt by a scan when anything disagrees (the view checks every write).
Callers hold the index's write lock for everything that changes state here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from ._level0 import DELETED, Level0, locate

__all__ = ["InLinks", "SubIndex"]

SURVEY_ROWS = 8192  # rows a survey step reads: ~3 ms at 100k, M=32

Labels = NDArray[np.uint64]
Vectors = NDArray[np.float32]
Noise = Callable[[int], Vectors]


class InLinks(NamedTuple):
    """Row ``rows[i]``'s level-0 list named element ``targets[i]`` (an erased one)."""

    rows: NDArray[np.int64]
    targets: NDArray[np.int64]

    def scrub(self) -> None:
        """Zero both: which rows linked to an erased element is a trace of its face."""
        self.rows.fill(0)
        self.targets.fill(0)


@dataclass(slots=True, eq=False)
class SubIndex:
    """One purpose's hnswlib index and what the store knows about its labels."""

    index: Any
    live: set[int] = field(default_factory=set)  # present and searchable
    hidden: set[int] = field(default_factory=set)  # expired: marked deleted, bytes kept
    # A copy of the live vectors while the sub-index is under the exact cut-off, because
    # get_items costs ~60 ms for 2048 vectors at d=512 and the exact path runs per search.
    mirror_labels: Labels | None = None
    mirror: Vectors | None = None
    ef: int = 0  # what set_ef was last given
    purpose: str = ""  # its key in TemplateIndex._subs (for a tuned ef)
    slots: NDArray[np.int64] | None = None  # label -> element; None: to be scanned
    dead: dict[int, int] = field(default_factory=dict)  # marked element -> its label

    # -- where each label lives ----------------------------------------------------------

    def view(self, labels_needed: int) -> tuple[Level0, NDArray[np.int64]] | None:
        """The level-0 view and an up-to-date label -> element map covering
        ``labels_needed`` labels, or None when the block cannot be seen."""
        level0 = locate(self.index)
        if level0 is None:
            self.slots = None
            return None
        if self.slots is None:
            self._scan(level0, labels_needed)
        elif self.slots.shape[0] < labels_needed:
            grown = np.full(max(labels_needed, 2 * self.slots.shape[0]), -1, dtype=np.int64)
            grown[: self.slots.shape[0]] = self.slots
            self.slots = grown
        assert self.slots is not None
        return level0, self.slots

    def added(self, before: int, labels: Labels, labels_needed: int) -> None:
        """After ``add_items`` of ``labels`` (also a failed one): the new elements from
        ``before`` on, and any dead slot ``replace_deleted`` gave one of them."""
        seen = self.view(labels_needed)
        if seen is None:
            return
        level0, slots = seen
        fresh = level0.labels[before:]
        slots[fresh.astype(np.intp)] = np.arange(before, before + fresh.shape[0])
        if fresh.shape[0] >= labels.shape[0] or not self.dead:
            return
        reused = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        now = level0.labels[reused]
        taken = []
        for slot, label in zip(reused.tolist(), now.tolist(), strict=True):
            old = self.dead[slot]
            if label != old:  # replace_deleted gave this element to a new record
                del self.dead[slot]
                if slots[old] == slot:
                    slots[old] = -1
                self.hidden.discard(old)
                slots[label] = slot
                taken.append(slot)
        # hnswlib's update wrote the new record's list over the old one's: what it left
        # after the end is the old record's neighbourhood
        level0.clear_tails(np.asarray(taken, dtype=np.int64))

    def _scan(self, level0: Level0, labels_needed: int) -> None:
        labels = level0.labels.astype(np.int64)
        size = max(labels_needed, int(labels.max()) + 1 if labels.size else 0)
        self.slots = np.full(size, -1, dtype=np.int64)
        self.slots[labels] = np.arange(labels.shape[0])
        marked = np.flatnonzero(level0.flags & DELETED)
        self.dead = dict(zip(marked.tolist(), labels[marked].tolist(), strict=True))

    # -- erasure ---------------------------------------------------------------------------

    def mark(self, labels: Sequence[int], labels_needed: int,
             seen: tuple[Level0, NDArray[np.int64]] | None = None) -> list[int]:
        """``mark_deleted`` each label present; returns those it marked."""
        marked = [label for label in labels if _marked(self.index, label)]
        if marked and seen is None:
            seen = self.view(labels_needed)
        if seen is not None:
            slots = seen[1]
            for label in marked:
                slot = int(slots[label])
                if slot >= 0:
                    self.dead[slot] = label
        return marked

    def erase(self, labels: Sequence[int], labels_needed: int,
              noise: Noise, threads: int) -> list[int]:
        """Take live and hidden ``labels`` out of the graph and destroy their bytes.
        Returns the labels whose place in the graph still needs :meth:`repair` (none when
        the block cannot be seen: then the API has done both already)."""
        live = [x for x in labels if x in self.live]
        hidden = [x for x in labels if x in self.hidden]
        if not live and not hidden:
            return []
        self.live.difference_update(live)
        self.hidden.difference_update(hidden)
        seen = self.view(labels_needed)
        targets = self.mark(live, labels_needed, seen) + hidden
        if not targets:
            return []
        if seen is not None:
            level0, slots = seen
            want = np.asarray(targets, dtype=np.int64)
            at = slots[want]
            keep = at >= 0  # -1: a later add took its slot, the bytes are already gone
            if level0.zero(at[keep], want[keep].astype(np.uint64)):
                erased: list[int] = want[keep].tolist()
                return erased
            self.slots = None  # the map disagreed with the block: rescan next time
        self.rewrite(targets, noise, threads)
        return []

    def survey(self, labels: Sequence[int]) -> Generator[None, None, InLinks | None]:
        """Find the rows whose level-0 lists name erased ``labels``, ``SURVEY_ROWS`` rows
        a step: the caller holds the index's read lock for each step (searches go on) and
        may give the lock up between them (the view is located again each step). The
        labels are read at the first step. The result is for :meth:`repair`; None when
        the block cannot be seen."""
        level0 = locate(self.index)
        if level0 is None or self.slots is None:
            return None
        targets = self._erased_slots(level0, labels)
        rows, named, start = [], [], 0
        try:
            while True:
                r, t = level0.linking_to(targets, start, start + SURVEY_ROWS)
                rows.append(r)
                named.append(t)
                start += SURVEY_ROWS
                if start >= level0.block.shape[0]:
                    return InLinks(np.concatenate(rows), np.concatenate(named))
                yield
                level0 = locate(self.index)
                if level0 is None:
                    return None
        finally:
            for part in (*rows, *named):  # which rows linked to what: a trace of the faces
                part.fill(0)

    def repair(self, labels: Sequence[int], noise: Noise, threads: int,
               found: InLinks | None = None) -> None:
        """Re-link erased labels (bytes already zero) through hnswlib's update, then take
        every erased element out of the rows that named them or that the update rewrote.

        The update moves the element and re-links its own neighbours around a random
        vector, but a row that linked *to* it without being one of them keeps the link
        (with M=32 the mean of such rows scored a median ~0.5 cosine to the erased face;
        single elements up to ~0.8 at M=16); and the neighbours it rewrites take their new
        links from a two-hop set that holds other erased elements (zero or noise, linked
        when a list has room). So after it, the rows ``found`` (a :meth:`survey` taken
        since the erasure; without one it is taken here, under the caller's lock) and the
        elements' former neighbours drop their links to every erased element, and the
        elements' own lists lose what the update left after their end. Done even when the
        update fails: a slot whose repair ended is reused by later adds.
        """
        level0 = locate(self.index)
        if level0 is None or self.slots is None:
            self.rewrite(labels, noise, threads)
            return
        targets = self._erased_slots(level0, labels)
        own = found is None
        if own:
            found = _completed(self.survey(labels))
        links, counts = level0.links, level0.link_counts
        before = links[targets]  # the rows hnswlib's update rewrites: their neighbours
        rewritten = before[np.arange(before.shape[1]) < counts[targets, None]].astype(np.int64)
        before.fill(0)
        try:
            self.rewrite(labels, noise, threads)
        finally:
            level0 = locate(self.index)
            if level0 is not None and targets.size:
                rows = [targets, rewritten]
                if found is not None:  # the job's survey: this batch's part of it
                    rows.append(found.rows[np.isin(found.targets, targets)])
                level0.unlink(np.concatenate(rows), self._erased_all())
                level0.clear_tails(targets)
            rewritten.fill(0)
            if own and found is not None:
                found.scrub()

    def _erased_all(self) -> NDArray[np.int64]:
        """The elements of every erased record still in the graph (marked, not merely
        expired: an expired record's links are those of a record, kept until its purge)."""
        erased = [slot for slot, label in self.dead.items() if label not in self.hidden]
        return np.asarray(erased, dtype=np.int64)

    def _erased_slots(self, level0: Level0, labels: Sequence[int]) -> NDArray[np.int64]:
        """The elements that still hold erased ``labels``, marked deleted (a slot a later
        add took is that record's now: its links are its own)."""
        assert self.slots is not None
        want = np.asarray(labels, dtype=np.int64)
        want = want[(want >= 0) & (want < self.slots.shape[0])]
        slots = self.slots[want]
        ok = (slots >= 0) & (slots < level0.block.shape[0])
        want, slots = want[ok], slots[ok]
        ok = (level0.labels[slots] == want.astype(np.uint64)) & (
            (level0.flags[slots] & DELETED) != 0)
        erased: NDArray[np.int64] = slots[ok]
        return erased

    def rewrite(self, labels: Sequence[int], noise: Noise, threads: int) -> None:
        """Overwrite deleted labels' vectors with noise through ``add_items`` (which
        re-links the graph around them), then mark them deleted again. A label whose
        slot went to a later record is skipped: its bytes and links are gone already."""
        targets = []
        for label in labels:
            try:  # hnswlib refuses to rewrite a deleted label: undelete it briefly
                self.index.unmark_deleted(label)
            except RuntimeError:
                continue
            targets.append(label)
        if not targets:
            return
        try:
            self.index.add_items(noise(len(targets)), np.asarray(targets, dtype=np.uint64),
                                 num_threads=threads, replace_deleted=False)
        finally:
            for label in targets:
                with contextlib.suppress(RuntimeError):
                    self.index.mark_deleted(label)

    def dead_count(self) -> int:
        slots: int = self.index.get_current_count()
        return slots - len(self.live)


def _completed(survey: Generator[None, None, InLinks | None]) -> InLinks | None:
    """Every step of a survey at once (the caller holds the lock throughout)."""
    while True:
        try:
            next(survey)
        except StopIteration as done:
            result: InLinks | None = done.value
            return result


def _marked(index: Any, label: int) -> bool:
    try:
        index.mark_deleted(label)
    except RuntimeError:  # not in this index (a failed add), or deleted already
        return False
    return True
