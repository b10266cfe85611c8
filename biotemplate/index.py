"""Approximate nearest-neighbour search over face templates, on hnswlib.

This is the only module that imports ``hnswlib``. It wraps it so that the store never
meets hnswlib's sharp edges:

- **Filtering.** hnswlib's ``filter=`` callable collapses when selective, so every purpose
  gets its own sub-index: filtering by purpose costs nothing and recall holds when a
  purpose owns 2% of the records. A record in three purposes sits in three sub-indexes
  under one label. Expiry is enforced twice: expired labels are ``mark_deleted`` (so the
  graph stops returning them) and every result is checked against the expiry again.
- **Too few results.** hnswlib raises "Cannot return the results in a contiguous 2D
  array" when fewer than ``k`` live items are reachable. Small sub-indexes (at most
  ``exact_cutoff`` live items), exhausted over-fetches and that error all fall back to an
  exact dot product over the live vectors. Results are never padded.
- **Erasure.** ``mark_deleted`` only hides a vector, and the graph's links around it keep
  a usable approximation of it (``_subindex``). A removed record's bytes are zeroed before
  ``remove`` returns, and its neighbourhood is re-linked around a random vector, and the
  links into it dropped, by a background repair in short batches (or re-linked at once,
  through the API, where the block hnswlib keeps vectors in cannot be seen: ``_level0``).
  Once repaired, its slot is reused by later adds (``replace_deleted``), and a sub-index
  more than half deleted is rebuilt.
- **Concurrency.** hnswlib searches may run together but not beside add, delete or
  resize; a phase-fair readers-writer lock guards every hnswlib call, so a writer that
  works in batches (a purge, the repair) lets waiting searches in between its batches.
- **Errors.** hnswlib's bare ``RuntimeError`` becomes a fallback or a
  :class:`~biotemplate.errors.BiotemplateError`. Nothing here writes vectors to disk
  (no ``save_index``, no pickle); the caller seals ``export_state`` itself.

Search is cosine similarity on L2-normalised vectors in hnswlib's ``"ip"`` space, where
distance is ``1 - dot``; the score is ``dot`` clipped to [-1, 1].
"""

from __future__ import annotations

import functools
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol, cast

import hnswlib
import numpy as np
from numpy.typing import NDArray

from ._labels import LabelTable
from ._level0 import DELETED, locate
from ._repair import Repairs, RWLock, paced
from ._subindex import InLinks, SubIndex
from .errors import BiotemplateError, InvalidInput, InvalidTemplate

__all__ = ["Hit", "IndexParams", "TemplateIndex", "TunedEf", "auto_ef", "retune_due",
           "tuned_ef"]

_CHUNK = 10_000  # rows per add_items call, so `progress` ticks and the GIL is let go
_MIN_CAPACITY = 1_024
_BEST_FETCH = 13  # what a k=1 search fetches (3k + 10): the smallest beam of any search
_TRIAL_CHUNK = 256  # queries per write-lock hold while a trial ef is set
_NORM_TOLERANCE = 1e-3  # scores assume unit vectors; reject what the caller forgot to normalise

Labels = NDArray[np.uint64]
Vectors = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class IndexParams:
    """HNSW tuning. The defaults target face embeddings (d=128 to 512)."""

    # Links per node (2*M on the bottom layer). Higher M: better recall in high dimension
    # and a graph that tolerates deletions, at the cost of memory (~8*M bytes a node)
    # and slower inserts. 12-48 is the useful range. 32 because it is the cheaper graph
    # that keeps the index's added miss rate at 0.1 % (tune_index's target) on face-like
    # data: at its tuned ef a search costs 2.5x less graph CPU than M=16's at d=128 and
    # d=512 (100k), and at 1M (d=128) M=16 meets it at no ef up to 8192 while M=32 does at
    # 1536; at the default auto_ef it added no miss in any of those runs. The price: inserts
    # ~1.5-2.5x slower and ~130 more bytes a node (RESULTS.md, "M=16 or M=32"). Its
    # erasure repair drops every link into an erased element (``_subindex``), which
    # hnswlib's update alone did not at M=32 (SECURITY.md, "Erasure and the graph").
    M: int = 32
    # Beam width while building: a better graph for a slower add. Fixed once built.
    ef_construction: int = 200
    # Beam width while searching; hnswlib uses max(ef, k), so an over-fetch of k items
    # is always searched with ef >= k. None (the default): each sub-index's ef grows with
    # its live count (see ``auto_ef``), because a fixed ef that finds the mate at 100k
    # misses it at 1M, or follows the ef ``TemplateStore.tune_index`` measured for it
    # (``tuned_ef``). An int fixes ef for every sub-index and overrides a tuning (faster,
    # and your own measurement of what the index may miss).
    ef_search: int | None = None
    # Sub-indexes with this many live items or fewer are searched exactly.
    exact_cutoff: int = 2048
    # 0 = hnswlib's default (all cores).
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.M < 2 or self.ef_construction < 1 or (self.ef_search is not None
                                                       and self.ef_search < 1):
            raise InvalidInput("IndexParams: M must be >= 2 and ef values >= 1")
        if self.exact_cutoff < 0 or self.num_threads < 0:
            raise InvalidInput("IndexParams: exact_cutoff and num_threads must be >= 0")


# auto_ef, fitted by benchmarks/calibrate_ef.py (RESULTS.md, "Choosing ef"): the smallest
# ef at which rank-1 of mated probes is within 0.1 point of exact search, for galleries of
# one sample per identity (the hard case), M=16, face-like data, grows like n^0.9:
# ~128 at 30k, ~384 at 100k, ~1024 at 300k (d=128). The fit is used for every dimension
# and with a margin, so it is conservative where fewer is needed (d=512, several samples).
# With M=32 (the default since issue 13) it sits near what tune_index picks for the
# stricter threshold-level mates at d=128 (512 at 100k, 1536 at 1M) and well above it at
# d=512 (96 at 100k): there tune_index saves ~4x of the graph's CPU.
_EF_FLOOR = 64
_EF_SCALE = 0.0125
_EF_POWER = 0.9


def auto_ef(live: int) -> int:
    """The ef the index searches a sub-index of ``live`` records with by default:
    ``max(64, 0.0125 * live ** 0.9)``, rounded up to a multiple of 32."""
    grown: int = math.ceil(_EF_SCALE * math.pow(max(live, 0), _EF_POWER) / 32)
    return max(_EF_FLOOR, 32 * grown)


class TunedEf(NamedTuple):
    """An ef measured for one purpose's sub-index (``TemplateStore.tune_index``)."""

    ef: int  # the smallest ef that met the target added miss rate
    live: int  # live records when it was measured
    M: int  # the graph's M it was measured on: a tuning for another M is not used


def tuned_ef(tuned: TunedEf, live: int) -> int:
    """The ef a tuned sub-index searches with at ``live`` records: the measured value, and
    once the sub-index outgrows the measurement, that value grown like ``auto_ef``'s
    curve (``live ** 0.9``, rounded up to a multiple of 16), so growth between tunings
    does not silently add misses (``index_health`` flags a tuning after 2x growth)."""
    if live <= tuned.live or tuned.live < 1:
        return tuned.ef
    grown = tuned.ef * math.pow(live / tuned.live, _EF_POWER)
    return max(tuned.ef, 16 * math.ceil(grown / 16))


RETUNE_GROWTH = 2  # a tuning is due again once the sub-index has grown this many times


def retune_due(tuned: TunedEf, live: int) -> bool:
    """Whether the sub-index has outgrown its tuning (more than RETUNE_GROWTH x)."""
    return live > RETUNE_GROWTH * tuned.live


class Hit(NamedTuple):
    """One search result: the subject's best record for the probe (a NamedTuple: built
    for every candidate of every search, it must be cheap to make)."""

    record_id: str
    subject_ref: bytes
    score: float  # cosine similarity in [-1, 1]


class Blob(Protocol):
    """A large array still in a sealed snapshot (``snapshot.Section``), read in order."""

    nbytes: int

    def read_into(self, out: memoryview) -> None: ...

    def read(self) -> NDArray[Any]: ...


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn hnswlib's bare RuntimeError into our hierarchy (the cause stays chained)."""
    try:
        yield
    except RuntimeError as exc:
        raise BiotemplateError(f"the template index failed to {what}") from exc


def _scrub(array: NDArray[Any] | None) -> None:
    """Zero a private copy of templates before it is freed: an erased face survives nowhere."""
    if array is not None:
        array.fill(0)


def _purpose_tuple(purposes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(purposes, str):  # a str is an Iterable[str] of its characters
        raise InvalidInput("a record's purposes must be a collection of strings, not a string")
    tags = tuple(dict.fromkeys(purposes))
    if not tags or not all(isinstance(t, str) and t for t in tags):
        raise InvalidInput("every record needs at least one non-empty purpose string")
    return tags


def _check_int(value: Any, name: str, minimum: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError(name)
        number = operator.index(value)  # ints and numpy integers, not floats
    except TypeError:
        raise InvalidInput(f"{name} must be an int") from None
    if minimum is not None and number < minimum:
        raise InvalidInput(f"{name} must be >= {minimum}")
    return number


class TemplateIndex:
    """Per-purpose HNSW sub-indexes over normalised templates, filtered by expiry.

    Thread-safe: searches run concurrently; add, remove and hide_expired are exclusive.
    Holds vectors in memory only; the caller seals what it exports.
    """

    def __init__(self, dim: int, params: IndexParams | None = None) -> None:
        """Raises: InvalidInput: ``dim`` is not a positive int."""
        self._dim = _check_int(dim, "dim", 1)
        self._params = params if params is not None else IndexParams()
        self._threads = self._params.num_threads or -1
        self._lock = RWLock()
        self._rng = np.random.default_rng()  # OS-seeded: overwrite noise is unpredictable
        self._subs: dict[str, SubIndex] = {}
        self._t = LabelTable()
        # erased labels whose bytes are zero but whose graph links are not re-linked yet
        self._repairs = Repairs(self._lock, self._repair,
                                lambda sub: sub in self._subs.values(),
                                lambda sub, labels: sub.survey(labels))
        self._tuned: dict[str, TunedEf] = {}  # purpose -> measured ef (set_tuned)

    # -- writes ------------------------------------------------------------------------

    def add(self, record_ids: Sequence[str], subject_refs: Sequence[bytes],
            purposes: Sequence[Iterable[str]], expiries_us: Sequence[int],
            vectors: NDArray[np.float32], *,
            progress: Callable[[int, int], None] | None = None, checked: bool = False) -> None:
        """Index records; all or nothing (a failed add is rolled back and erased).

        ``checked=True``: the caller has already validated ``vectors`` as finite unit
        rows (the store validates every template once); only the shape is checked.

        Raises:
            InvalidInput: lengths differ, a record id is repeated or already indexed, a
                record has no purpose, or a field has the wrong type.
            InvalidTemplate: ``vectors`` is not finite, unit-norm, shape (n, dim).
            BiotemplateError: hnswlib failed (e.g. out of memory).
        """
        with self.adding(record_ids, subject_refs, purposes, expiries_us, vectors,
                         progress=progress, checked=checked):
            pass

    @contextmanager
    def adding(self, record_ids: Sequence[str], subject_refs: Sequence[bytes],
               purposes: Sequence[Iterable[str]], expiries_us: Sequence[int],
               vectors: NDArray[np.float32], *,
               progress: Callable[[int, int], None] | None = None,
               checked: bool = False) -> Iterator[None]:
        """:meth:`add`, with the hnswlib insert running in a worker thread while the body
        of the ``with`` block runs (the store seals and commits the same records there).

        The records become searchable only when the block and the insert have both
        succeeded; if either fails they are erased and never seen. The write lock is held
        throughout, so searches wait instead of seeing a partial batch.

        Raises:
            As :meth:`add`; and whatever the block raises, after the rollback.
        """
        ids, refs = list(record_ids), list(subject_refs)
        tags = [_purpose_tuple(p) for p in purposes]
        exps = [_check_int(e, "expiry_us") for e in expiries_us]
        rows = self._shaped(vectors) if checked else self._unit(vectors, 2)
        n = len(ids)
        if not len(refs) == len(tags) == len(exps) == rows.shape[0] == n:
            raise InvalidInput("add: record_ids, subject_refs, purposes, expiries_us and "
                               "vectors must have the same length")
        if not all(isinstance(r, str) for r in ids) or not all(isinstance(s, bytes) for s in refs):
            raise InvalidInput("add: record ids must be str and subject refs bytes")
        if len(set(ids)) != n:
            raise InvalidInput("add: a record id appears twice in the batch")
        with self._lock.write():
            if any(r in self._t.label_of for r in ids):
                raise InvalidInput("add: a record id is already indexed")
            labels = list(self._t.allocate(n))  # held by no record until put below
            failed: list[BaseException] = []

            def insert() -> None:
                try:
                    self._insert(labels, tags, rows, progress)
                except BaseException as exc:  # handed to the caller's thread below
                    failed.append(exc)

            worker = threading.Thread(target=insert, name="biotemplate-index-add")
            worker.start()
            try:
                try:
                    yield
                finally:
                    worker.join()
                if failed:
                    raise failed[0]
            except BaseException as exc:
                with _translated("roll back a failed add"):
                    for purpose, sub in list(self._subs.items()):
                        self._erase(purpose, sub, [x for x in labels if x in sub.live])
                if isinstance(exc, RuntimeError):
                    raise BiotemplateError("the template index failed to add records") from exc
                raise
            self._t.put(labels, ids, refs, exps, tags)

    def _insert(self, labels: list[int], tags: list[tuple[str, ...]], rows: Vectors,
                progress: Callable[[int, int], None] | None) -> None:
        rows_of: dict[str, list[int]] = {}
        for i, tag in enumerate(tags):
            for purpose in tag:
                rows_of.setdefault(purpose, []).append(i)
        for purpose, idx in rows_of.items():
            if purpose not in self._subs:
                self._subs[purpose] = SubIndex(self._new_index(len(idx)), purpose=purpose,
                                               mirror_labels=np.empty(0, np.uint64),
                                               mirror=np.empty((0, self._dim), np.float32))
        # A slot whose repair is pending must not go to a new record first: its old rows'
        # links to it, still to be dropped by the repair, would then name a live record.
        reuse = {p: not self._repairs.waiting(self._subs[p]) for p in rows_of}
        for purpose, idx in rows_of.items():
            self._reserve(self._subs[purpose], len(idx), reuse[purpose])
        label_arr = np.asarray(labels, dtype=np.uint64)
        per_purpose = {p: np.asarray(idx, dtype=np.intp) for p, idx in rows_of.items()}
        for start in range(0, len(labels), _CHUNK):
            stop = min(start + _CHUNK, len(labels))
            for purpose, picked in per_purpose.items():
                lo, hi = np.searchsorted(picked, [start, stop])
                if lo == hi:
                    continue
                sub, sel = self._subs[purpose], picked[lo:hi]
                chunk, chunk_labels = rows[sel], label_arr[sel]
                sub.live.update(chunk_labels.tolist())  # before the call: rollback sees it
                before: int = sub.index.get_current_count()
                try:
                    sub.index.add_items(chunk, chunk_labels, num_threads=self._threads,
                                        replace_deleted=reuse[purpose])
                    self._refresh_mirror(sub, add=(chunk_labels, chunk))
                finally:
                    _scrub(chunk)
                    sub.added(before, chunk_labels, self._t.next_label)
            if progress is not None:
                progress(stop, len(labels))

    def remove(self, record_ids: Iterable[str]) -> int:
        """Hide records at once and destroy their vectors; unknown ids are ignored.

        Their bytes are zeroed before this returns and their graph links re-linked by a
        background repair soon after (:meth:`settle` waits for it). Where the vectors'
        memory cannot be seen, both happen here through hnswlib, in batches that let
        searches run between them.

        Returns: how many known records were removed.

        Raises:
            InvalidInput: ``record_ids`` is a single string.
            BiotemplateError: hnswlib failed; the records are hidden all the same.
        """
        if isinstance(record_ids, str):
            raise InvalidInput("remove takes a collection of record ids, not one string")
        wanted = set(record_ids)
        later: list[tuple[str, deque[int]]] = []
        with self._lock.write():
            labels = [self._t.label_of[r] for r in wanted if r in self._t.label_of]
            by_purpose = self._t.by_purpose(labels)
            self._t.drop(labels)  # forget first: searches skip unknown labels from now on
            with _translated("erase removed templates"):
                for purpose, group in by_purpose.items():
                    sub = self._subs.get(purpose)
                    if sub is None:
                        continue
                    if (len(group) > 1 and sub.slots is None
                            and sub.view(self._t.next_label) is None):
                        later.append((purpose, deque(group)))
                    else:
                        self._erase(purpose, sub, group)
        for purpose, queue in later:
            paced(self._lock, functools.partial(self._erase_some, purpose, queue))
        return len(labels)

    def _erase_some(self, purpose: str, queue: deque[int], budget: int) -> bool:
        """One batch of an API erasure (write lock held); True while labels remain."""
        sub = self._subs.get(purpose)
        if sub is None:
            return False
        batch = [queue.popleft() for _ in range(min(budget, len(queue)))]
        with _translated("erase removed templates"):
            self._erase(purpose, sub, batch)
        return bool(queue)

    def shorten(self, expiries_us: Mapping[str, int]) -> int:
        """Bring records' expiry forward (a tighter policy applied to stored records);
        an expiry is never moved later, and unknown ids are ignored. Searches filter by
        the new expiry at once; ``hide_expired`` hides them when it passes.

        Returns: how many records' expiry moved.

        Raises:
            InvalidInput: an expiry is not an int.
        """
        new = {rid: _check_int(exp, "expiry_us") for rid, exp in expiries_us.items()}
        moved = 0
        with self._lock.write():
            table = self._t
            for rid, exp in new.items():
                label = table.label_of.get(rid)
                if label is None or exp >= int(table.expiry[label]):
                    continue
                table.expiry[label] = exp
                table.next_expiry = min(table.next_expiry, exp)  # hidden when it passes
                moved += 1
        return moved

    def hide_expired(self, now_us: int) -> int:
        """Hide every record whose expiry is <= ``now_us``; a purge removes them later.

        Returns: how many records were newly hidden.

        Raises:
            InvalidInput: ``now_us`` is not an int.
            BiotemplateError: hnswlib failed; searches still filter by expiry.
        """
        _check_int(now_us, "now_us")
        with self._lock.write():
            due = self._t.expire(now_us)
            with _translated("hide expired templates"):
                for purpose, group in self._t.by_purpose(due).items():
                    if (sub := self._subs.get(purpose)) is None:
                        continue
                    gone = [x for x in group if x in sub.live]
                    sub.live.difference_update(gone)
                    sub.hidden.update(gone)
                    self._refresh_mirror(sub, drop=gone)
                    sub.mark(gone, self._t.next_label)
            return int(due.size)

    def settle(self) -> None:
        """Finish the pending graph repairs of removed records now, in this thread
        (``export_state`` does; tests and benchmarks wait for them with it).

        Raises:
            BiotemplateError: hnswlib failed.
        """
        with self._lock.write(), _translated("repair the graph"):
            self._repairs.settle()

    def clear(self) -> None:
        """Drop every record and sub-index, zeroing the vectors they held."""
        with self._lock.write():
            for sub in self._subs.values():
                _scrub(sub.mirror)
                _zero_block(sub.index)
            self._subs.clear()
            self._repairs.clear()
            self._t.clear()

    # -- reads -------------------------------------------------------------------------

    def search(self, probe: NDArray[np.float32], purpose: str, k: int, now_us: int) -> list[Hit]:
        """Best record of up to ``k`` subjects for ``purpose``, best first, unexpired only.

        Raises:
            InvalidTemplate: ``probe`` is not a finite unit vector of shape (dim,).
            InvalidInput: ``k`` < 1 or ``now_us`` not an int.
        """
        return self.search_many(self._unit(probe, 1)[None, :], purpose, k, now_us)[0]

    def search_many(self, probes: NDArray[np.float32], purpose: str, k: int,
                    now_us: int) -> list[list[Hit]]:
        """:meth:`search` for each row of ``probes``, batched across hnswlib's threads.

        Raises:
            InvalidTemplate: ``probes`` is not finite unit rows of shape (m, dim).
            InvalidInput: ``k`` < 1 or ``now_us`` not an int.
        """
        return self.search_units(self._unit(probes, 2), purpose, k, now_us)

    def search_units(self, queries: Vectors, purpose: str, k: int,
                     now_us: int) -> list[list[Hit]]:
        """:meth:`search_many` for rows the caller has already checked to be finite unit
        vectors of shape (m, dim) in float32 (the store validates every probe once)."""
        _check_int(k, "k", 1)
        _check_int(now_us, "now_us")
        if now_us >= self._t.next_expiry:  # a stale read only delays the hiding: every
            self.hide_expired(now_us)      # result is checked against the expiry anyway
        lock = self._lock
        lock.acquire_read()
        try:
            sub = self._subs.get(purpose)
            if sub is None or not len(queries):
                return [[] for _ in range(len(queries))]
            fetch = 3 * k + 10
            if len(sub.live) <= self._params.exact_cutoff or fetch >= len(sub.live):
                return self._exact(sub, queries, k, now_us)
            try:
                found, dist = sub.index.knn_query(queries, k=fetch, num_threads=self._threads)
            except RuntimeError:  # some row had < fetch reachable: retry row by row
                return [self._search_one(sub, q, k, now_us, fetch) for q in queries]
            results = self._collect(found, 1.0 - dist, k, now_us)
            for i, hits in enumerate(results):
                if len(hits) < k:
                    results[i] = self._search_one(sub, queries[i], k, now_us, 2 * fetch)
            return results
        finally:
            lock.release_read()

    def _search_one(self, sub: SubIndex, query: Vectors, k: int, now_us: int,
                    fetch: int) -> list[Hit]:
        """Over-fetch, doubling, until k subjects are found; exact once fetch covers all."""
        while fetch < len(sub.live):
            try:
                found, dist = sub.index.knn_query(query, k=fetch, num_threads=1)
            except RuntimeError:  # "Cannot return the results in a contiguous 2D array"
                break
            hits = self._collect(found, 1.0 - dist, k, now_us)[0]
            if len(hits) >= k:
                return hits
            fetch *= 2
        return self._exact(sub, query[None, :], k, now_us)[0]

    def _exact(self, sub: SubIndex, queries: Vectors, k: int,
               now_us: int) -> list[list[Hit]]:
        """Brute-force dot products over the sub-index's live vectors."""
        labels, vectors, owned = sub.mirror_labels, sub.mirror, False
        if labels is None or vectors is None:
            labels = np.fromiter(sub.live, dtype=np.uint64, count=len(sub.live))
            vectors, owned = self._get_items(sub, labels), True
        try:
            sims = queries @ vectors.T
        finally:
            if owned:
                _scrub(vectors)
        out = []
        fetch = 3 * k + 10  # enough for k subjects unless many records share a subject
        for row in sims:
            hits: list[Hit] = []
            if fetch < row.shape[0]:  # sort only the best few, not the whole gallery
                top = np.argpartition(-row, fetch)[:fetch]
                top = top[np.argsort(-row[top], kind="stable")]
                hits = self._collect(labels[top][None, :], row[top][None, :], k, now_us)[0]
            if len(hits) < k:
                order = np.argsort(-row, kind="stable")
                hits = self._collect(labels[order][None, :], row[order][None, :], k,
                                     now_us)[0]
            out.append(hits)
        return out

    def _collect(self, labels: NDArray[Any], sims: NDArray[Any], k: int,
                 now_us: int) -> list[list[Hit]]:
        """For each row of best-first (labels, similarities): each subject's first (best)
        unexpired record, up to k. One array read filters expiry for every row."""
        table = self._t
        good = (table.expiry[labels.astype(np.intp)] > now_us).tolist()
        ids, refs = table.ids, cast(list[bytes], table.refs)
        out: list[list[Hit]] = []
        for row_labels, row_sims, row_good in zip(labels.tolist(), sims.tolist(), good,
                                                  strict=True):
            hits: list[Hit] = []
            seen: set[bytes] = set()
            for label, sim, ok in zip(row_labels, row_sims, row_good, strict=True):
                if not ok:
                    continue
                ref = refs[label]
                if ref in seen:
                    continue
                seen.add(ref)
                hits.append(Hit(cast(str, ids[label]), ref, min(1.0, max(-1.0, sim))))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def purposes(self) -> list[str]:
        """Purposes that have a sub-index, sorted."""
        with self._lock.read():
            return sorted(self._subs)

    def __len__(self) -> int:
        """Records held (added and not removed), including expired ones awaiting a purge."""
        return len(self._t)

    def stats(self) -> dict[str, Any]:
        """Counts and parameters for monitoring; never vectors."""
        with self._lock.read():
            per_purpose: dict[str, dict[str, int]] = {}
            for purpose, sub in sorted(self._subs.items()):
                slots: int = sub.index.get_current_count()
                capacity: int = sub.index.get_max_elements()
                per_purpose[purpose] = {"live": len(sub.live), "hidden": len(sub.hidden),
                                        "deleted": slots - len(sub.live), "capacity": capacity,
                                        "ef": sub.ef}
                if (tuned := self._tuned.get(purpose)) is not None:
                    per_purpose[purpose] |= {"tuned_ef": tuned.ef, "tuned_live": tuned.live,
                                             "retune": int(retune_due(tuned, len(sub.live)))}
            return {"dim": self._dim, "records": len(self._t),
                    "params": asdict(self._params), "purposes": per_purpose,
                    "repairs_pending": self._repairs.pending()}

    # -- measuring the graph against exact search (index_health, tune_index) -------------

    def set_tuned(self, tuned: Mapping[str, TunedEf]) -> None:
        """Search these purposes' sub-indexes at measured efs (see :func:`tuned_ef`); the
        others keep ``auto_ef``. A fixed ``IndexParams.ef_search`` still wins, and a
        tuning measured on a graph of another M than the sub-index's is not used (a
        snapshot keeps the M it was built with; a rebuild takes ``IndexParams.M``)."""
        with self._lock.write():
            self._tuned = dict(tuned)
            with _translated("set ef"):
                for sub in self._subs.values():
                    self._tune_ef(sub)

    def graph_m(self, purpose: str) -> int:
        """The M of ``purpose``'s graph (the one it was built or loaded with), or
        ``IndexParams.M`` when it has none yet."""
        with self._lock.read():
            sub = self._subs.get(purpose)
            return self._params.M if sub is None else int(sub.index.M)

    def ef_of(self, purpose: str) -> tuple[int, str, int]:
        """(ef in use, where it comes from, live records) for ``purpose``'s sub-index. The
        source is "exact" (at most ``exact_cutoff`` live: no graph is searched; ef 0),
        "fixed" (``IndexParams.ef_search``), "tuned" or "auto" (``auto_ef``)."""
        with self._lock.read():
            sub = self._subs.get(purpose)
            live = len(sub.live) if sub is not None else 0
            if sub is None or live <= self._params.exact_cutoff:
                return 0, "exact", live
            tuned = self._tuned.get(purpose)
            source = ("fixed" if self._params.ef_search else
                      "tuned" if tuned is not None and tuned.M == int(sub.index.M)
                      else "auto")
            return sub.ef, source, live

    def sample_live(self, purpose: str, n: int, rng: np.random.Generator,
                    ) -> tuple[Vectors, list[bytes]]:
        """Copies of ``n`` live vectors of ``purpose`` drawn with ``rng`` (with replacement
        when ``n`` exceeds the live count) and their subjects' refs. The copies are
        templates in memory: the caller scrubs them (``fill(0)``) when done."""
        with self._lock.read():
            sub = self._subs.get(purpose)
            if sub is None or not sub.live or n < 1:
                return np.empty((0, self._dim), dtype=np.float32), []
            labels = np.sort(np.fromiter(sub.live, dtype=np.uint64, count=len(sub.live)))
            picked = rng.choice(labels, size=n, replace=n > labels.size)
            return self._get_items(sub, picked), [cast(bytes, self._t.refs[int(x)]) for x in picked]

    def best_exact(self, queries: Vectors, purpose: str, now_us: int) -> list[Hit | None]:
        """Each query's best subject by exact search over the live vectors of ``purpose``
        (what a one-candidate search must return), read from the graph in chunks so that
        memory stays at a few tens of MB whatever the gallery's size."""
        fetch = _BEST_FETCH
        with self._lock.read():
            sub = self._subs.get(purpose)
            if sub is None or not sub.live or not len(queries):
                return [None] * len(queries)
            labels = np.sort(np.fromiter(sub.live, dtype=np.uint64, count=len(sub.live)))
            chunk = max(256, 4_000_000 // len(queries))  # queries x chunk float32 scores
            top_s = np.empty((len(queries), 0), dtype=np.float32)
            top_l = np.empty((len(queries), 0), dtype=np.uint64)
            for lo in range(0, labels.size, chunk):
                part = labels[lo:lo + chunk]
                vectors = self._get_items(sub, part)
                try:
                    sims = queries @ vectors.T
                finally:
                    _scrub(vectors)
                scores = np.concatenate([top_s, sims], axis=1)
                ids = np.concatenate([top_l, np.broadcast_to(part, sims.shape)], axis=1)
                if scores.shape[1] > fetch:
                    keep = np.argpartition(-scores, fetch, axis=1)[:, :fetch]
                    scores = np.take_along_axis(scores, keep, axis=1)
                    ids = np.take_along_axis(ids, keep, axis=1)
                top_s, top_l = scores, ids
            out: list[Hit | None] = []
            for row_s, row_l in zip(top_s, top_l, strict=True):
                order = np.argsort(-row_s, kind="stable")
                hits = self._collect(row_l[order][None, :], row_s[order][None, :], 1,
                                     now_us)[0]
                out.append(hits[0] if hits else None)
            return out

    def best_graph(self, queries: Vectors, purpose: str, now_us: int,
                   ef: int | None = None) -> tuple[list[Hit | None], float]:
        """Each query's best subject as the graph finds it for a one-candidate search (k=1:
        the smallest beam any search uses), at ``ef`` (None: the ef in use), and the CPU
        seconds the graph took (it runs on this thread: unlike wall time, CPU time does
        not grow when other work shares the machine). A trial ef is set and put back under the
        write lock, so no search runs at it; searches wait for one chunk of queries at a
        time (``_TRIAL_CHUNK``), not for the whole trial."""
        out: list[Hit | None] = []
        seconds = 0.0
        for lo in range(0, len(queries), _TRIAL_CHUNK):
            with self._lock.read() if ef is None else self._lock.write():
                sub = self._subs.get(purpose)
                if sub is None or not sub.live:
                    return [None] * len(queries), 0.0
                with _translated("search at a trial ef"):
                    if ef is not None:
                        sub.index.set_ef(_check_int(ef, "ef", 1))
                    try:
                        started = time.thread_time()  # one thread runs the query
                        found, dist = sub.index.knn_query(
                            queries[lo:lo + _TRIAL_CHUNK], k=min(_BEST_FETCH, len(sub.live)),
                            num_threads=1)
                        seconds += time.thread_time() - started
                    finally:
                        if ef is not None:
                            sub.index.set_ef(sub.ef)
                for hits in self._collect(found, 1.0 - dist, 1, now_us):
                    out.append(hits[0] if hits else None)
        return out, seconds

    # -- snapshots (the caller seals the state; nothing here touches disk) ---------------

    def export_state(self) -> dict[str, Any]:
        """The whole index as plain values and numpy arrays, for a sealed snapshot.

        Pending repairs are finished and expired (hidden) vectors erased first, so the
        state holds no template, and no graph neighbourhood, of a record that is not
        live. Its arrays are copies: the caller zeroes them once sealed.
        """
        with self._lock.write():
            self._repairs.settle()
            with _translated("compact before a snapshot"):
                for sub in self._subs.values():
                    sub.repair(sub.erase(list(sub.hidden), self._t.next_label, self._noise,
                                         self._threads), self._noise, self._threads)
            subs = {}
            for purpose, sub in self._subs.items():
                hnsw = dict(sub.index.__getstate__()[0])
                level0 = hnsw.pop("data_level0")  # last: a reader streams it into place
                subs[purpose] = {"hnsw": hnsw, "level0": level0,
                                 "live": np.fromiter(sub.live, np.uint64, len(sub.live))}
            return {"v": 3, "dim": self._dim, "next_label": self._t.next_label,
                    "records": self._t.columns(), "subs": subs}

    def import_state(self, state: dict[str, Any]) -> None:
        """Replace the index with an exported state. Call only with authenticated data;
        the shapes are still checked, so a state of another store or version is refused.
        Arrays may be numpy arrays or :class:`Blob` sections of a snapshot, which are
        read in the order ``export_state`` wrote them: each level-0 block is decrypted
        straight into the memory hnswlib allocated for it, without a second copy.

        Raises:
            BiotemplateError: the state does not fit this index (dimension, shape), or a
                snapshot section failed authentication; nothing is kept.
        """
        subs: dict[str, SubIndex] = {}
        try:
            if state["v"] != 3 or state["dim"] != self._dim:
                raise ValueError("version or dimension")
            cols, next_label = state["records"], int(state["next_label"])
            table = LabelTable.checked(cols["ids"], _array(cols["labels"], np.uint64),
                                cols["subjects"], _array(cols["expiry"], np.int64),
                                [tuple(str(t) for t in tags) for tags in cols["tag_sets"]],
                                _array(cols["tags"], np.uint32), next_label)
            pending = state["subs"]
            for purpose in list(pending):
                sub_state = pending.pop(purpose)  # let each state go once hnswlib has it
                index = self._restore(sub_state["hnsw"], sub_state["level0"])
                subs[str(purpose)] = sub = SubIndex(index, purpose=str(purpose))
                sub.live = set(_array(sub_state["live"], np.uint64).tolist())
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError,
                BiotemplateError) as exc:
            for sub in subs.values():
                _zero_block(sub.index)
            raise BiotemplateError("the index snapshot does not fit this store") from exc
        self.clear()
        with self._lock.write():
            self._subs, self._t = subs, table
            with _translated("load a snapshot"):
                for sub in subs.values():
                    self._refresh_mirror(sub)

    def _restore(self, hnsw: dict[str, Any], level0: NDArray[Any] | Blob) -> Any:
        """An hnswlib index from its exported parts. Fast path: set the state with an
        empty level-0 block (hnswlib copies only what it is given), then fill the block
        it allocated through the level-0 view; its deleted marks are applied through the
        API afterwards, so hnswlib's own count and free list agree with them."""
        params = {k: (_array(v, None) if _is_blob(v) else v) for k, v in hnsw.items()}
        index = hnswlib.Index.__new__(hnswlib.Index)
        index.__setstate__(({**params, "data_level0": np.empty(0, np.uint8),
                             "has_deletions": False},))
        view = locate(index)
        if view is None or view.block.nbytes != level0.nbytes:
            data = _array(level0, np.uint8)
            try:
                index = hnswlib.Index.__new__(hnswlib.Index)
                index.__setstate__(({**params, "data_level0": data},))
            finally:
                if data is not level0:
                    _scrub(data)
            return index
        block = view.block.reshape(-1)
        try:
            if isinstance(level0, np.ndarray):
                block[:] = level0.reshape(-1).view(np.uint8)
            else:
                level0.read_into(block.data)
        except BaseException:
            block[:] = 0  # what was decrypted before the failure
            raise
        marked = np.flatnonzero(view.flags & DELETED)
        deleted = view.labels[marked].tolist()
        view.flags[marked] &= np.uint8(~DELETED & 0xFF)
        for label in deleted:
            index.mark_deleted(label)
        return index

    # -- internals (callers hold the write lock unless noted) ----------------------------

    def _unit(self, x: NDArray[np.float32], ndim: int) -> Vectors:
        """Check shape, finiteness and unit norm; the caller normalises, we verify."""
        try:
            a = np.ascontiguousarray(x, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidTemplate("templates must be numeric arrays") from exc
        if a.ndim != ndim or a.shape[-1] != self._dim:
            want = f"({self._dim},)" if ndim == 1 else f"(n, {self._dim})"
            raise InvalidTemplate(f"expected shape {want}, got {a.shape}")
        if not np.isfinite(a).all():
            raise InvalidTemplate("templates must be finite")
        if a.size and float(np.abs(np.linalg.norm(a, axis=-1) - 1.0).max()) > _NORM_TOLERANCE:
            raise InvalidTemplate("templates must be L2-normalised")
        return a

    def _shaped(self, x: NDArray[np.float32]) -> Vectors:
        """Rows validated by the caller: only dtype, layout and shape are made sure of."""
        a = np.ascontiguousarray(x, dtype=np.float32)
        if a.ndim != 2 or a.shape[1] != self._dim:
            raise InvalidTemplate(f"expected shape (n, {self._dim}), got {a.shape}")
        return a

    def _new_index(self, expected: int) -> Any:
        index = hnswlib.Index(space="ip", dim=self._dim)
        index.init_index(max_elements=max(_MIN_CAPACITY, expected), M=self._params.M,
                         ef_construction=self._params.ef_construction,
                         allow_replace_deleted=True)
        return index  # its ef is set by _tune_ef once it holds records

    def _tune_ef(self, sub: SubIndex) -> None:
        """Set the sub-index's search ef for its size. set_ef mutates the index, so this
        runs under the write lock only, after every change to ``sub.live``."""
        tuned = self._tuned.get(sub.purpose)
        if tuned is not None and tuned.M != int(sub.index.M):
            tuned = None  # measured on another graph
        ef = self._params.ef_search or (tuned_ef(tuned, len(sub.live)) if tuned
                                        else auto_ef(len(sub.live)))
        if ef != sub.ef:
            sub.index.set_ef(ef)
            sub.ef = ef

    def _reserve(self, sub: SubIndex, extra: int, reuse: bool = True) -> None:
        """Double capacity until ``extra`` more fit (with ``reuse``, replace_deleted fills
        dead slots first)."""
        count: int = sub.index.get_current_count()
        need = max(count, len(sub.live) + extra) if reuse else count + extra
        capacity: int = sub.index.get_max_elements()
        if need > capacity:
            while capacity < need:
                capacity *= 2
            sub.index.resize_index(capacity)

    def _get_items(self, sub: SubIndex, labels: Labels) -> Vectors:
        """Copy live vectors out of hnswlib (exact fallback and compaction only)."""
        if not labels.size:
            return np.empty((0, self._dim), dtype=np.float32)
        with _translated("read templates"):
            return np.asarray(sub.index.get_items(labels), dtype=np.float32)

    def _noise(self, n: int) -> Vectors:
        """Random unit vectors: they overwrite erased templates and keep the graph sane."""
        noise = self._rng.standard_normal((n, self._dim), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        return noise

    def _repair(self, sub: SubIndex, labels: list[int], found: InLinks | None) -> None:
        """One batch of the background repair: on one thread, leaving the other cores to
        the searches it runs between."""
        sub.repair(labels, self._noise, 1, found or None)

    def _erase(self, purpose: str, sub: SubIndex, labels: list[int]) -> None:
        """Erase, then rebuild the sub-index if more than half its slots are dead."""
        queued = sub.erase(labels, self._t.next_label, self._noise, self._threads)
        self._refresh_mirror(sub, drop=labels)
        if queued:
            self._repairs.add(sub, queued)
        slots: int = sub.index.get_current_count()
        if sub.live and 2 * (slots - len(sub.live)) <= slots:
            return
        # expired bytes must not outlive the graph (its links go with it: no repair)
        sub.erase(list(sub.hidden), self._t.next_label, self._noise, self._threads)
        if not sub.live:
            _scrub(sub.mirror)
            _zero_block(sub.index)
            del self._subs[purpose]
            return
        live = np.fromiter(sub.live, dtype=np.uint64, count=len(sub.live))
        vectors = self._get_items(sub, live)
        try:
            fresh = self._new_index(2 * len(live))
            fresh.add_items(vectors, live, num_threads=self._threads)
        finally:
            _scrub(vectors)
        _zero_block(sub.index)
        sub.index, sub.ef, sub.slots, sub.dead = fresh, 0, None, {}
        self._tune_ef(sub)

    def _refresh_mirror(self, sub: SubIndex, drop: Sequence[int] = (),
                        add: tuple[Labels, Vectors] | None = None) -> None:
        """Keep ``sub.mirror`` equal to the live vectors while under the exact cut-off."""
        old = sub.mirror
        if len(sub.live) > self._params.exact_cutoff:
            labels, vectors = None, None
        elif old is None or sub.mirror_labels is None:  # back under the cut-off
            labels = np.fromiter(sub.live, dtype=np.uint64, count=len(sub.live))
            vectors = self._get_items(sub, labels)
        else:
            keep = ~np.isin(sub.mirror_labels, np.asarray(drop, dtype=np.uint64))
            labels, vectors = sub.mirror_labels[keep], old[keep]
            if add is not None:
                kept, vectors = vectors, np.concatenate([vectors, add[1]])
                labels = np.concatenate([labels, add[0]])
                _scrub(kept)
        sub.mirror_labels, sub.mirror = labels, vectors
        _scrub(old)
        self._tune_ef(sub)  # every change to sub.live ends here

def _zero_block(index: Any) -> None:
    """Zero the level-0 block of an index about to be dropped (vectors and links), when
    it can be seen: what it held must not outlive it in freed memory."""
    view = locate(index)
    if view is not None:
        view.block[:] = 0


def _is_blob(value: object) -> bool:
    return hasattr(value, "read_into") and hasattr(value, "nbytes")


def _array(value: Any, dtype: Any) -> NDArray[Any]:
    """A numpy array from a value of an exported state: an array, a list, or a Blob."""
    if _is_blob(value):
        value = value.read()
    return np.asarray(value, dtype=dtype)
