"""Sealed index snapshots: open a large store without re-decrypting every record.

A snapshot is the exported index state (hnswlib's graph and vectors, label tables, the
record id -> subject id map), sealed like everything else: nothing of it reaches disk in
plaintext, and nothing of the file reaches hnswlib's loader before it is authenticated.

File layout (``index.snapshot``, version 2)::

    "BTSN" | header length (4 bytes, big-endian) | header | frames
    header = msgpack({"v": 2, "seq": change seq covered, "epoch": e, "erasures": g,
                      "salt": 32 random bytes, "size": plaintext bytes})
    frames = streaming.seal(snapshot key, salt, plain, ad = "BTSN" | store id | header)
             (STREAM, ChaCha20-Poly1305, 16 MiB frames, a key per file from the salt)
    plain  = meta length (8 bytes) | msgpack(state, arrays as [dtype, shape, offset, size])
             | the arrays' raw bytes (mapped, not copied, when read back)
    snapshot key = sealing.snapshot_key(K_epoch(e), g, snapshot secret)

Reading allocates the plaintext once (its size is checked against the file's before any
allocation), decrypts the frames into it, hands views of it to the index, and zeroes it:
the peak is about one plaintext, not the four copies of a one-shot AEAD call.

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

from . import _files, sealing, streaming
from .errors import IntegrityError, StorageError
from .keyring import Keyring

MAGIC = b"BTSN"
VERSION = 2  # v1 (one XChaCha20-Poly1305 message, row-wise tables) is simply rebuilt
_LEN = struct.Struct(">I")


_META_LEN = struct.Struct(">Q")


def _pack_body(state: dict[str, Any]) -> bytearray:
    """msgpack of the state with every array replaced by (dtype, shape, offset, size),
    followed by the raw array bytes: the reader maps arrays straight out of the decrypted
    body instead of copying each one out of msgpack."""
    parts: list[memoryview] = []
    offset = 0

    def default(obj: object) -> Any:
        nonlocal offset
        if isinstance(obj, np.ndarray):
            raw = memoryview(np.ascontiguousarray(obj).data).cast("B")
            parts.append(raw)
            offset += raw.nbytes
            return {"__nd__": [obj.dtype.str, list(obj.shape), offset - raw.nbytes, raw.nbytes]}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot snapshot a {type(obj).__name__}")

    meta = msgpack.packb(state, use_bin_type=True, default=default)
    body = bytearray(_META_LEN.size + len(meta) + offset)  # zeroed after sealing
    view, at = memoryview(body), _META_LEN.size + len(meta)
    view[:at] = _META_LEN.pack(len(meta)) + meta
    for raw in parts:
        view[at : at + raw.nbytes] = raw
        at += raw.nbytes
    return body


def _unpack_body(body: bytearray) -> Any:
    (m,) = _META_LEN.unpack_from(body, 0)
    base, size = _META_LEN.size + m, len(body)
    if base > size:
        raise ValueError("malformed snapshot body")

    def hook(obj: dict[Any, Any]) -> Any:
        nd = obj.get("__nd__")
        if nd is None:
            return obj
        dtype, shape, offset, nbytes = nd
        if not (isinstance(dtype, str) and all(type(v) is int for v in (offset, nbytes))
                and isinstance(shape, list) and all(type(v) is int for v in shape)):
            raise TypeError("malformed array")
        kind = np.dtype(dtype)
        if (offset < 0 or nbytes < 0 or base + offset + nbytes > size
                or kind.itemsize == 0 or nbytes != kind.itemsize * int(np.prod(shape))):
            raise ValueError("malformed array")
        return np.frombuffer(body, dtype=kind, count=nbytes // kind.itemsize,
                             offset=base + offset).reshape(shape)

    return msgpack.unpackb(memoryview(body)[_META_LEN.size : base], raw=False, object_hook=hook,
                           strict_map_key=False)


def _key(keyring: Keyring, epoch: int, erasures: int) -> bytes:
    return sealing.snapshot_key(keyring.epoch_key(epoch), erasures, keyring.snapshot_secret)


def write(path: Path, keyring: Keyring, state: dict[str, Any], seq: int) -> int:
    """Seal ``state`` and replace the snapshot file atomically. Returns bytes written."""
    body = _pack_body(state)
    salt = sealing.random_id(streaming.SALT_SIZE)
    header = msgpack.packb({"v": VERSION, "seq": seq, "epoch": keyring.ratchet_epoch,
                            "erasures": keyring.erasures, "salt": salt, "size": len(body)},
                           use_bin_type=True)
    key = _key(keyring, keyring.ratchet_epoch, keyring.erasures)
    aad = MAGIC + keyring.store_id + header

    def fill(fh: BinaryIO) -> None:
        fh.write(MAGIC + _LEN.pack(len(header)) + header)
        for frame in streaming.seal(key, salt, memoryview(body), aad):
            fh.write(frame)

    try:
        _files.atomic_replace(path, fill)
    except OSError as exc:
        raise StorageError("the index snapshot could not be written") from exc
    finally:
        _zero(body)
    return 8 + len(header) + streaming.sealed_size(len(body))


def _zero(buf: bytearray) -> None:
    """Overwrite a plaintext body: it holds every template of the index."""
    np.frombuffer(buf, dtype=np.uint8)[:] = 0


@contextlib.contextmanager
def opened(path: Path, keyring: Keyring) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (seq covered, state); the state's arrays are views of the decrypted body,
    which is zeroed on exit, so copy what must outlive the block.

    Raises IntegrityError when the file is missing, stale, forged or malformed; nothing of
    the body is parsed before every frame has been authenticated.
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
        if size < 0 or start + streaming.sealed_size(size) != end:
            raise IntegrityError("snapshot is truncated or extended")
        body = bytearray(size)
        try:
            streaming.open_into(_key(keyring, epoch, erasures), salt, fh.readinto, body,
                                MAGIC + keyring.store_id + header_bytes)
            try:
                state = _unpack_body(body)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                    struct.error, msgpack.ExtraData):
                raise IntegrityError("snapshot body is corrupt") from None
            if not isinstance(state, dict):
                raise IntegrityError("snapshot body is corrupt")
            yield seq, state
        finally:
            _zero(body)


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
