"""The index's lock, writers that work in batches, and the background graph repair.

A purge erases thousands of records and the repair of an erased element's graph links
costs ~6 ms at d=512 (``_subindex``): done in one go under the index's write lock, that
would stall every search for seconds. So the lock is phase-fair (searches that waited for
a writer go before its next batch) and long work is cut into batches sized to hold it
~20 ms each (:func:`paced`). :class:`Repairs` holds the erased labels whose bytes are
zero but whose links are not re-linked yet, and runs their repair in a background thread
in such batches, while there is work and a little after. At interpreter exit the
workers stop after their current batch (the bytes are zero already): a daemon thread cut
off inside hnswlib would abort the process.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["HOLD", "RWLock", "Repairs", "paced"]

HOLD = 0.02  # seconds a batched writer aims to hold the write lock
# The background repair's share of the time while it has work: after each batch it rests
# (1 / DUTY - 1) times as long as the batch took, so a search meets a batch a quarter of
# the time instead of every time (measured at 100k, d=512: search p50 23 ms during the
# repair at full duty, against 4 ms without one). The repair takes 4x longer; the erased
# bytes are zero from the start, only the graph's links wait.
REPAIR_DUTY = 0.25
LINGER = 1.0  # seconds the repair thread waits for more work before it leaves
_live: weakref.WeakSet[Repairs] = weakref.WeakSet()
_exiting = threading.Event()


class RWLock:
    """Many readers or one writer, phase-fair: a waiting writer blocks new readers (it
    cannot starve), and readers that waited for a writer go before the next writer (a
    writer working in batches cannot starve them either)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._readers_turn = False

    def acquire_read(self) -> None:
        with self._cond:
            if self._writer or (self._writers_waiting and not self._readers_turn):
                self._readers_waiting += 1
                while self._writer or (self._writers_waiting and not self._readers_turn):
                    self._cond.wait()
                self._readers_waiting -= 1
                if not self._readers_waiting:
                    self._readers_turn = False
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._readers_turn:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._readers_turn = self._readers_waiting > 0
                self._cond.notify_all()


def paced(lock: RWLock, step: Callable[[int], bool], duty: float = 1.0,
          stop: threading.Event | None = None) -> None:
    """Run ``step(budget)`` under the write lock until it returns False, sizing each
    batch so that one holds the lock for about ``HOLD``: searches run in between. With
    ``duty`` < 1, rest between batches so that the batches take that share of the time
    (``stop`` cuts a rest short)."""
    budget = 4
    while True:
        with lock.write():
            started = time.perf_counter()
            more = step(budget)
            took = time.perf_counter() - started
        if not more:
            return
        if duty < 1 and (stop or threading.Event()).wait(took * (1 / duty - 1)):
            return
        if took < HOLD / 2:
            budget *= 2
        elif took > HOLD:
            budget = max(1, budget // 2)


@dataclass(eq=False)
class _Job:
    sub: Any
    index: Any  # sub.index when queued: a sub-index rebuilt since took its links along
    labels: list[int]
    found: Any = None  # what ``survey`` gave for the whole job; None: not surveyed yet,
    #                    False: it could not see the block (``repair`` then reads it itself)
    surveying: bool = False  # its survey has begun: ``add`` no longer extends ``labels``


class Repairs:
    """Erased labels awaiting the repair of their graph links, and the thread doing it.

    ``repair(sub, labels, found)`` does the work (under the write lock), with what
    ``survey(sub, labels)`` found: a generator that reads the graph a step at a time, each
    step under the *read* lock, so that a scan of the whole block (the rows linking to an
    erased element can be anywhere in it) never holds searches up; ``found`` is None when
    no survey was taken (``settle``), and ``repair`` reads the block itself then.
    ``current(sub)`` says whether a sub-index is still the index's (a job of one rebuilt or
    dropped since, its links gone with it, is skipped). Every method but ``pending``
    expects the caller to hold the write lock of ``lock``.
    """

    def __init__(self, lock: RWLock, repair: Callable[[Any, list[int], Any], None],
                 current: Callable[[Any], bool],
                 survey: Callable[[Any, list[int]], Generator[None, None, Any]]) -> None:
        self._lock, self._repair, self._current = lock, repair, current
        self._survey = survey
        self._jobs: deque[_Job] = deque()
        self._worker: threading.Thread | None = None
        self._more = threading.Event()  # wakes a worker that waits for work
        _live.add(self)

    def add(self, sub: Any, labels: list[int]) -> None:
        last = self._jobs[-1] if self._jobs else None
        if (last is not None and last.sub is sub and last.index is sub.index
                and not last.surveying):  # one survey (a read of the block) for both
            last.labels.extend(labels)
        else:
            self._jobs.append(_Job(sub, sub.index, list(labels)))
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, daemon=True,
                                            name="biotemplate-index-repair")
            self._worker.start()
        else:  # working, or waiting for work a little while: no new thread
            self._more.set()

    def pending(self) -> int:
        return sum(len(job.labels) for job in list(self._jobs))

    def waiting(self, sub: Any) -> bool:
        """Whether labels of ``sub`` (its current index) still await their repair."""
        return any(job.sub is sub and job.index is sub.index for job in self._jobs)

    def clear(self) -> None:
        for job in self._jobs:
            _scrub(job.found)
        self._jobs.clear()

    def settle(self) -> None:
        """Every pending repair now, in this thread."""
        while (job := self._next(1 << 62)) is not None:
            try:
                self._repair(*job[:3])
            finally:
                if job[3]:
                    _scrub(job[2])

    @property
    def worker(self) -> threading.Thread | None:
        return self._worker

    def _next(self, budget: int,
              surveyed: bool = False) -> tuple[Any, list[int], Any, bool] | None:
        """Up to ``budget`` labels of the oldest job whose sub-index is still current, its
        survey, and whether they are the job's last (None when ``surveyed`` and the oldest
        job has no survey yet)."""
        while self._jobs:
            job = self._jobs[0]
            if job.sub.index is not job.index or not self._current(job.sub):
                _scrub(self._jobs.popleft().found)
                continue
            if surveyed and job.found is None:
                return None
            if len(job.labels) > budget:
                labels, job.labels = job.labels[:budget], job.labels[budget:]
                return job.sub, labels, job.found, False
            self._jobs.popleft()
            return job.sub, job.labels, job.found, True
        return None

    def _step(self, budget: int) -> bool:
        if _exiting.is_set():
            return False
        job = self._next(budget, surveyed=True)
        if job is None:
            return False
        try:
            self._repair(*job[:3])
        except RuntimeError:  # hnswlib failed: the bytes are zero already, links dropped
            pass
        finally:
            if job[3]:
                _scrub(job[2])
        return True

    def _survey_all(self) -> None:
        """Survey every queued job that has no survey yet, a step per read lock, resting
        between steps as the repair does (``REPAIR_DUTY``)."""
        for job in list(self._jobs):
            if job.found is not None:
                continue
            steps = self._survey(job.sub, job.labels)  # reads the labels at its first step
            while not _exiting.is_set():
                with self._lock.read():
                    if job.sub.index is not job.index:
                        break
                    job.surveying = True
                    started = time.perf_counter()
                    try:
                        next(steps)
                    except StopIteration as done:
                        job.found = done.value if done.value is not None else False
                        break
                    took = time.perf_counter() - started
                if _exiting.wait(took * (1 / REPAIR_DUTY - 1)):
                    return

    def _run(self) -> None:
        """Survey and repair in batches while there is work; then wait a while for more (a
        thread start would cost a lone deletion more than its erasure) and leave."""
        try:
            while True:
                self._more.clear()
                self._survey_all()
                paced(self._lock, self._step, REPAIR_DUTY, _exiting)
                if self._jobs and not _exiting.is_set():
                    continue  # a job queued since the survey: survey it
                if self._more.wait(LINGER) and not _exiting.is_set():
                    continue
                with self._lock.write():  # decided under the lock ``add`` runs under
                    if not self._jobs or _exiting.is_set():
                        self._worker = None
                        return
        except BaseException:
            with self._lock.write():
                if self._worker is threading.current_thread():
                    self._worker = None
            raise


def _scrub(found: Any) -> None:
    """Zero a survey once its job is done (it says which rows linked to an erased face)."""
    if found:
        found.scrub()


@atexit.register
def _stop_workers() -> None:
    """Let every repair thread finish its batch and leave before the interpreter goes."""
    _exiting.set()
    for repairs in list(_live):
        repairs._more.set()
        worker = repairs._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10)
