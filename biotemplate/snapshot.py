"""Sealed index snapshots: open a large store without re-decrypting every record.

A snapshot is the exported index state (hnswlib's graph and vectors, label tables, the
record id -> subject id map), sealed like everything else: nothing of it reaches disk in
plaintext, and nothing of the file reaches hnswlib before it is authenticated.

File layout (``index.snapshot``, version 3)::

    "BTSN" | header length (4 bytes, big-endian) | header | frames
    header = msgpack({"v": 3, "seq": change seq covered, "epoch": e, "erasures": g,
                      "salt": 32 random bytes, "size": plaintext bytes})
    frames = streaming.seal(snapshot key, salt, plain, ad = "BTSN" | store id | header)
             (STREAM, ChaCha20-Poly1305, 4 MiB frames, a key per file from the salt)
    plain  = meta length (8 bytes) | msgpack(state, each array as {"__nd__": [dtype,
             shape, offset, size]}) | the arrays' raw bytes, in the order met
    snapshot key = sealing.snapshot_key(K_epoch(e), g, snapshot secret)

Writing seals the meta and the arrays as they are (no concatenated body) and zeroes the
arrays afterwards: they are the caller's copies of every template. Reading decrypts the
meta, then yields the state with each array as a :class:`Section`, which its consumer
reads in file order, straight into where it belongs (a level-0 block goes into the memory
hnswlib allocated for it): the peak is about one frame, not a plaintext of the whole
index. Every frame is authenticated before its bytes are handed over; the size (from the
authenticated header) is checked against the file's before anything is read, and what the
consumer did not read is authenticated at the end of the block, so a failure there still
rejects the snapshot (the caller discards what it loaded).

The key dies with its epoch (purge advances the ratchet) and with the next destruction of a
subject key (the keyring's snapshot secret is replaced and the erasure generation g moves),
so a snapshot holding an erased or expired template cannot be loaded afterwards, not even
a copy of it, with the current keyring. Any failure to load simply means: rebuild from the
sealed records.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
from numpy.typing import NDArray

from . import _files, sealing, streaming
from .errors import IntegrityError, StorageError
from .keyring import Keyring

__all__ = ["FRAME", "MAGIC", "VERSION", "Section", "fingerprint", "opened", "pack_fingerprints",
           "unpack_fingerprints", "write"]

MAGIC = b"BTSN"
VERSION = 3  # v1 (one message) and v2 (a body decrypted whole) are simply rebuilt
_LEN = struct.Struct(">I")
_META_LEN = struct.Struct(">Q")
_MAX_META = 1 << 34  # a bound for a corrupt (yet authentic) length, not a real limit
# Plaintext bytes per frame. A reader holds one frame of ciphertext, and one of plaintext
# for frames that straddle two arrays: 4 MiB keeps that under 1.3x the raw index's memory
# at d=128, at ~0.1% more tag bytes and calls than 16 MiB.
FRAME = 1 << 22


class Section:
    """One array of an open snapshot, still in the file: read it once, in file order
    (:meth:`read_into` its bytes into a buffer, or :meth:`read` a new array)."""

    __slots__ = ("_reader", "dtype", "nbytes", "offset", "shape")

    def __init__(self, reader: streaming.Reader, dtype: np.dtype[Any], shape: tuple[int, ...],
                 offset: int, nbytes: int) -> None:
        self._reader, self.dtype, self.shape = reader, dtype, shape
        self.offset, self.nbytes = offset, nbytes

    def read_into(self, out: memoryview) -> None:
        """Its bytes into ``out`` (flat, writable, ``nbytes`` long).

        Raises:
            IntegrityError: a frame failed, or an earlier section was read after a later
                one (its bytes are gone by then).
        """
        if len(out) != self.nbytes or self._reader.position > self.offset:
            raise IntegrityError("snapshot body is corrupt")
        self._reader.skip(self.offset - self._reader.position)
        self._reader.read_into(out)

    def read(self) -> NDArray[Any]:
        out = np.empty(self.shape, dtype=self.dtype)
        self.read_into(out.reshape(-1).view(np.uint8).data)
        return out


def _pack_meta(state: dict[str, Any]) -> tuple[bytes, list[NDArray[Any]]]:
    """msgpack of the state with every array replaced by its place in the array area."""
    arrays: list[NDArray[Any]] = []
    offset = 0

    def default(obj: object) -> Any:
        nonlocal offset
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            arrays.append(arr)
            offset += arr.nbytes
            return {"__nd__": [arr.dtype.str, list(arr.shape), offset - arr.nbytes, arr.nbytes]}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot snapshot a {type(obj).__name__}")

    meta = msgpack.packb(state, use_bin_type=True, default=default)
    return meta, arrays


def _unpack_meta(meta: bytearray, reader: streaming.Reader, base: int, size: int) -> Any:
    def hook(obj: dict[Any, Any]) -> Any:
        nd = obj.get("__nd__")
        if nd is None:
            return obj
        dtype, shape, offset, nbytes = nd
        if not (isinstance(dtype, str) and all(type(v) is int for v in (offset, nbytes))
                and isinstance(shape, list) and all(type(v) is int and v >= 0 for v in shape)):
            raise TypeError("malformed array")
        kind = np.dtype(dtype)
        if (offset < 0 or nbytes < 0 or base + offset + nbytes > size or kind.hasobject
                or kind.itemsize == 0 or nbytes != kind.itemsize * int(np.prod(shape))):
            raise ValueError("malformed array")
        return Section(reader, kind, tuple(shape), base + offset, nbytes)

    return msgpack.unpackb(meta, raw=False, object_hook=hook, strict_map_key=False)


def _key(keyring: Keyring, epoch: int, erasures: int) -> bytes:
    return sealing.snapshot_key(keyring.epoch_key(epoch), erasures, keyring.snapshot_secret)


def write(path: Path, keyring: Keyring, state: dict[str, Any], seq: int) -> int:
    """Seal ``state`` and replace the snapshot file atomically. Returns bytes written.
    Every array of ``state`` is zeroed afterwards, written or not: pass copies."""
    meta, arrays = _pack_meta(state)
    try:
        parts = [memoryview(_META_LEN.pack(len(meta))), memoryview(meta),
                 *(a.reshape(-1).view(np.uint8).data for a in arrays)]
        size = sum(len(p) for p in parts)
        salt = sealing.random_id(streaming.SALT_SIZE)
        header = msgpack.packb({"v": VERSION, "seq": seq, "epoch": keyring.ratchet_epoch,
                                "erasures": keyring.erasures, "salt": salt, "size": size},
                               use_bin_type=True)
        key = _key(keyring, keyring.ratchet_epoch, keyring.erasures)
        aad = MAGIC + keyring.store_id + header

        def fill(fh: BinaryIO) -> None:
            fh.write(MAGIC + _LEN.pack(len(header)) + header)
            for frame in streaming.seal_parts(key, salt, parts, aad, FRAME):
                fh.write(frame)

        try:
            _files.atomic_replace(path, fill)
        except OSError as exc:
            raise StorageError("the index snapshot could not be written") from exc
    finally:
        for arr in arrays:
            if arr.flags.writeable:
                arr.reshape(-1).view(np.uint8)[:] = 0
    return 8 + len(header) + streaming.sealed_size(size, FRAME)


@contextlib.contextmanager
def opened(path: Path, keyring: Keyring) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (seq covered, state), the state's arrays as :class:`Section`, to be read in
    file order inside the block; what was not read is authenticated when it ends.

    Raises IntegrityError when the file is missing, stale, forged or malformed (also at
    the end of the block, for a tail that fails: discard what was loaded from it).
    """
    try:
        fh = path.open("rb")
    except OSError:
        raise IntegrityError("no snapshot") from None
    with fh:
        head = fh.read(8)
        if len(head) != 8 or head[:4] != MAGIC:
            raise IntegrityError("snapshot header is corrupt")
        (n,) = _LEN.unpack_from(head, 4)
        header_bytes = fh.read(n) if n <= 4096 else b""
        try:
            header = msgpack.unpackb(header_bytes, raw=False, max_map_len=16)
            seq, epoch, erasures, salt, size = (header["seq"], header["epoch"],
                                                header["erasures"], header["salt"],
                                                header["size"])
            if not (header["v"] == VERSION and isinstance(salt, bytes)
                    and all(type(v) is int for v in (seq, epoch, erasures, size))):
                raise TypeError
        except (ValueError, KeyError, TypeError, struct.error, msgpack.ExtraData):
            raise IntegrityError("snapshot header is corrupt") from None
        if epoch != keyring.ratchet_epoch or erasures != keyring.erasures:
            raise IntegrityError("snapshot is stale (epoch or erasure since)")
        # The size is not authenticated yet: allocate only what the file can hold.
        start = fh.tell()
        end = fh.seek(0, os.SEEK_END)
        fh.seek(start)
        if size < _META_LEN.size or start + streaming.sealed_size(size, FRAME) != end:
            raise IntegrityError("snapshot is truncated or extended")
        reader = streaming.Reader(_key(keyring, epoch, erasures), salt, fh.readinto, size,
                                  MAGIC + keyring.store_id + header_bytes, FRAME)
        meta = bytearray(_META_LEN.size)
        try:
            reader.read_into(memoryview(meta))
            (m,) = _META_LEN.unpack_from(meta, 0)
            if m > min(size - _META_LEN.size, _MAX_META):
                raise IntegrityError("snapshot body is corrupt")
            meta = bytearray(m)
            reader.read_into(memoryview(meta))
            try:
                state = _unpack_meta(meta, reader, _META_LEN.size + m, size)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                    struct.error, msgpack.ExtraData):
                raise IntegrityError("snapshot body is corrupt") from None
            if not isinstance(state, dict):
                raise IntegrityError("snapshot body is corrupt")
            yield seq, state
            reader.finish()
        finally:
            streaming.zero(memoryview(meta))
            reader.close()


def fingerprint(row: Any) -> bytes:
    """A row's header fields and AEAD tag, hashed: equal fingerprints mean the row is the
    one the snapshot saw (a changed header or a resealed blob changes it)."""
    fields = [row.record_id, row.subject_ref, row.epoch, row.expiry_us, list(row.purposes),
              row.model, row.held, bytes(row.blob[-16:])]
    return hashlib.blake2b(msgpack.packb(fields, use_bin_type=True), digest_size=16).digest()


def pack_fingerprints(fingerprints: dict[str, bytes]) -> bytes:
    """Every row's fingerprint, packed as one opaque blob: decoded only when rows changed
    after the snapshot (see ``Gallery.load_snapshot``)."""
    return bytes(msgpack.packb(fingerprints, use_bin_type=True))


def unpack_fingerprints(blob: bytes) -> dict[str, bytes]:
    seen = msgpack.unpackb(blob, raw=False)
    if not (isinstance(seen, dict) and set(map(type, seen)) <= {str}
            and set(map(type, seen.values())) <= {bytes}):
        raise IntegrityError("snapshot body is corrupt")
    return seen
