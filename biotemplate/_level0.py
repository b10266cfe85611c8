"""A checked, writable view of the memory block where hnswlib keeps its vectors.

Why: hnswlib's Python API rewrites a stored vector only through ``add_items``, which also
re-links the graph around it (~6 ms a vector at d=512, 100k records): erasing a purge's
records that way holds the index for seconds. Zeroing the bytes in place costs
microseconds, and a snapshot can be decrypted straight into the block instead of into a
second plaintext copy that hnswlib then copies. The API hands out no pointer, so this
module finds the block through the memory layout of hnswlib 0.8.0's C++ objects (the
pybind11 instance, then ``Index<float>``, then ``HierarchicalNSW<float>``) and trusts it
only when every field it reads agrees with what the API reports: dimension, M, ef,
ef_construction, capacity, count, and the offsets these imply. Those fields are read
through ``/proc/self/mem``, so a wrong guess is a mismatch or an ``OSError``, never a
crash. Any other hnswlib version, platform or failed check gives ``None``, and the caller
uses the API (slower, same result).

A view is valid while the index is not resized, grown or freed: take it under the index's
write lock, use it, drop it. Nothing here imports hnswlib or keeps a pointer.

Layout of one element of level 0 (``hnswalg.h``), ``stride`` bytes::

    uint16 link count | uint8 flags (bit 0: deleted) | uint8 | maxM0 x uint32 links
    | dim x float32 vector | uint64 label
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["DELETED", "Level0", "locate"]

DELETED = 0x01  # hnswlib's DELETE_MARK, in the flags byte of an element's link header
_VERSION = "0.8.0"  # the only layout checked; any other version uses the API
_VALUE = 16  # a pybind11 instance: PyObject header (16 bytes), then the C++ object pointer
_INDEX = struct.Struct("<i4xQQ???xiQQ")  # Index<float> from .dim: dim, seed, default_ef,
#                                          flags, threads, cur_l, appr_alg
_INDEX_AT = 32  # after the std::string space_name
_ALG = struct.Struct("<8xQQQQQQQQQQ")  # HierarchicalNSW: vtable, max_elements, count, stride,
#                                        links per element, deleted, M, maxM, maxM0, ef_c, ef
_ALG_TAIL = struct.Struct("<QQQQQ")  # size_links_level0, offsetData, offsetLevel0,
_ALG_TAIL_AT = 216  #                   label_offset, data_level0_memory


@dataclass(frozen=True, slots=True)
class Level0:
    """Views of the first ``count`` elements of one index's level-0 block."""

    block: NDArray[np.uint8]  # (count, stride), every byte of each element
    dim: int
    data_at: int  # byte offset of the vector in an element
    label_at: int  # byte offset of the label

    @property
    def flags(self) -> NDArray[np.uint8]:
        """(count,) flags bytes; ``& DELETED`` is hnswlib's deleted mark."""
        return self.block[:, 2]

    @property
    def labels(self) -> NDArray[np.uint64]:
        """(count,) labels, a strided view."""
        labels: NDArray[np.uint64] = _strided(self.block, self.label_at, np.dtype("<u8"), ())
        return labels

    @property
    def vectors(self) -> NDArray[np.float32]:
        """(count, dim) vectors, a strided view."""
        vectors: NDArray[np.float32] = _strided(self.block, self.data_at, np.dtype("<f4"),
                                                (self.dim,))
        return vectors

    @property
    def links(self) -> NDArray[np.uint32]:
        """(count, maxM0) level-0 link lists, a strided view; row ``i`` holds
        ``link_counts[i]`` links, and whatever an earlier, longer list left after them."""
        width = (self.data_at - 4) // 4
        links: NDArray[np.uint32] = _strided(self.block, 4, np.dtype("<u4"), (width,))
        return links

    @property
    def link_counts(self) -> NDArray[np.uint16]:
        """(count,) how many of each row's ``links`` are in use."""
        counts: NDArray[np.uint16] = _strided(self.block, 0, np.dtype("<u2"), ())
        return counts

    def linking_to(self, targets: NDArray[np.int64], start: int,
                   stop: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """The (row, target) pairs of rows ``start:stop`` whose list names one of
        ``targets``: in use, or left behind after its end (a snapshot would keep those
        bytes too; an unused 0 is not counted as naming element 0)."""
        count = self.block.shape[0]
        stop = min(stop, count)
        empty = np.zeros(0, dtype=np.int64)
        targets = targets[(targets >= 0) & (targets < count)]
        if not targets.size or start >= stop:
            return empty, empty
        wanted = np.zeros(count, dtype=bool)
        wanted[targets] = True
        links = self.links[start:stop]
        inside = np.arange(links.shape[1]) < self.link_counts[start:stop, None]
        named = (links < count) & (inside | (links != 0))
        named[named] = wanted[links[named]]
        rows, cols = np.nonzero(named)
        return rows.astype(np.int64) + start, links[rows, cols].astype(np.int64)

    def unlink(self, rows: NDArray[np.int64], targets: NDArray[np.int64]) -> int:
        """Take every one of ``targets`` out of each of ``rows``' lists (later links move
        up) and out of what lies after each list's end. Returns how many links in use
        were dropped."""
        rows = np.unique(rows[(rows >= 0) & (rows < self.block.shape[0])])
        if not rows.size or not targets.size:
            return 0
        links, counts = self.links, self.link_counts
        listed = links[rows]  # (rows, maxM0): a copy
        named = np.isin(listed, targets)
        named &= (listed != 0) | (np.arange(links.shape[1]) < counts[rows, None])
        listed.fill(0)
        dropped = 0
        for i in np.flatnonzero(named.any(axis=1)).tolist():
            row, used = int(rows[i]), int(counts[rows[i]])
            row_links = links[row]
            gone = named[i]
            kept = row_links[:used][~gone[:used]]
            tail = row_links[used:].copy()
            tail[gone[used:]] = 0
            row_links[: kept.size] = kept
            row_links[kept.size : used] = 0
            row_links[used:] = tail
            counts[row] = kept.size
            dropped += used - kept.size
        return dropped

    def clear_tails(self, slots: NDArray[np.int64]) -> None:
        """Zero what lies after the end of ``slots``' own lists: an update that shortens
        a list (hnswlib's, on an erased element or a reused slot) leaves the old
        neighbours there, and a snapshot copies them."""
        links, counts = self.links, self.link_counts
        for slot in slots[(slots >= 0) & (slots < self.block.shape[0])].tolist():
            links[slot, int(counts[slot]) :] = 0

    def zero(self, slots: NDArray[np.int64], labels: NDArray[np.uint64]) -> bool:
        """Zero the vectors of ``slots`` after checking that each holds its label and is
        marked deleted (the caller marks first, through the API). False, and nothing
        written, if any check fails."""
        if not slots.size:
            return True
        if slots.min() < 0 or slots.max() >= self.block.shape[0]:
            return False
        if not (np.array_equal(self.labels[slots], labels)
                and bool(np.all(self.flags[slots] & DELETED))):
            return False
        self.vectors[slots] = 0.0
        return True


def _strided(block: NDArray[np.uint8], at: int, dtype: np.dtype[Any],
             tail: tuple[int, ...]) -> Any:
    count = block.shape[0]
    if not count:
        return np.zeros((0, *tail), dtype=dtype)
    strides = (block.strides[0], *((dtype.itemsize,) if tail else ()))
    return np.ndarray((count, *tail), dtype=dtype, buffer=block.base, offset=at,
                      strides=strides)


_mem_lock = threading.Lock()
_mem_fd: list[int] = []  # /proc/self/mem, opened once; [-1] if it cannot be


def _read(address: int, size: int) -> bytes | None:
    """``size`` bytes of this process's memory at ``address``, or None (unmapped, or no
    /proc): a wrong address found here costs an error code, not a segfault."""
    with _mem_lock:
        if not _mem_fd:
            try:
                _mem_fd.append(os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                _mem_fd.append(-1)
        fd = _mem_fd[0]
    if fd < 0 or not 0 < address < 1 << 63:
        return None
    try:
        data = os.pread(fd, size, address)
    except (OSError, OverflowError):
        return None
    return data if len(data) == size else None


def _supported() -> bool:
    if (sys.implementation.name != "cpython" or sys.byteorder != "little"
            or sys.maxsize <= 1 << 32 or not sys.platform.startswith("linux")):
        return False
    try:
        return metadata.version("hnswlib") == _VERSION
    except metadata.PackageNotFoundError:
        return False


_SUPPORTED = _supported()


def locate(index: Any) -> Level0 | None:
    """The level-0 block of ``index`` (an ``hnswlib.Index``), or None when the layout
    cannot be confirmed. Call it under the index's write lock; the view dies with it."""
    if not _SUPPORTED:
        return None
    try:
        dim, M, ef_c, ef = int(index.dim), int(index.M), int(index.ef_construction), int(index.ef)
        capacity, count = int(index.get_max_elements()), int(index.get_current_count())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    raw = _read(id(index) + _VALUE, 8)
    value = struct.unpack("<Q", raw)[0] if raw else 0
    raw = _read(value + _INDEX_AT, _INDEX.size) if value else None
    if raw is None:
        return None
    f_dim, _seed, _default_ef, inited, _ep, normalize, _threads, _cur, alg = _INDEX.unpack(raw)
    if f_dim != dim or not inited or normalize or not alg:
        return None
    head, tail = _read(alg, _ALG.size), _read(alg + _ALG_TAIL_AT, _ALG_TAIL.size)
    if head is None or tail is None:
        return None
    (max_el, n, stride, links_upper, deleted, m, max_m, max_m0, f_ef_c,
     f_ef) = _ALG.unpack(head)
    links0, data_at, level0_at, label_at, memory = _ALG_TAIL.unpack(tail)
    expected = (capacity, count, M, M, 2 * M, ef_c, ef, 4 * 2 * M + 4, links0, 0,
                links0 + 4 * dim, label_at + 8, 4 * M + 4)
    found = (max_el, n, m, max_m, max_m0, f_ef_c, f_ef, links0, data_at, level0_at,
             label_at, stride, links_upper)
    if found != expected or deleted > n or not memory or n > max_el:
        return None
    if not count:
        return Level0(np.zeros((0, stride), dtype=np.uint8), dim, data_at, label_at)
    buffer = (ctypes.c_uint8 * (count * stride)).from_address(memory)
    block = np.frombuffer(buffer, dtype=np.uint8).reshape(count, stride)
    return Level0(block, dim, data_at, label_at)
