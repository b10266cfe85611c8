"""Sealed index snapshots: open a large store without re-decrypting every record.

A snapshot is the exported index state (hnswlib's graph and vectors, label tables, the
record id -> subject id map), sealed like everything else: nothing of it reaches disk in
plaintext, and nothing of the file reaches hnswlib's loader before it is authenticated.

File layout (``index.snapshot``)::

    "BTSN" | header length (4 bytes, big-endian) | header | sealed body
    header = msgpack({"v": 1, "seq": change seq covered, "epoch": e, "erasures": g})
    body   = seal(snapshot key, plain, ad = "BTSN" | store id | header)
    plain  = meta length (8 bytes) | msgpack(state, arrays as [dtype, shape, offset, size])
             | the arrays' raw bytes (mapped, not copied, when read back)
    snapshot key = HKDF(HKDF(K_epoch(e) || snapshot secret, "snap-scope"), "snapshot/" + g)

The key dies with its epoch (purge advances the ratchet) and with the next destruction of a
subject key (the keyring's snapshot secret is replaced and the erasure generation g moves),
so a snapshot holding an erased or expired template cannot be loaded afterwards, not even
a copy of it, with the current keyring. Any failure to load simply means: rebuild from the
sealed records.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from . import sealing
from .errors import IntegrityError, StorageError
from .keys import Keyring

MAGIC = b"BTSN"
_LEN = struct.Struct(">I")


_META_LEN = struct.Struct(">Q")


def _pack_body(state: dict[str, Any]) -> bytes:
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
    return b"".join([_META_LEN.pack(len(meta)), meta, *parts])


def _unpack_body(body: bytes) -> Any:
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

    return msgpack.unpackb(body[_META_LEN.size : base], raw=False, object_hook=hook,
                           strict_map_key=False)


def _key(keyring: Keyring, epoch: int, erasures: int) -> bytes:
    scope = keyring.epoch_key(epoch)
    if keyring.snapshot_secret is not None:  # replaced at every key destruction
        scope = sealing.hkdf(scope + keyring.snapshot_secret, info=b"biotemplate/v1/snap-scope")
    return sealing.snapshot_key(scope, erasures)


def write(path: Path, keyring: Keyring, state: dict[str, Any], seq: int) -> int:
    """Seal ``state`` and replace the snapshot file atomically. Returns bytes written."""
    header = msgpack.packb({"v": 1, "seq": seq, "epoch": keyring.ratchet_epoch,
                            "erasures": keyring.erasures}, use_bin_type=True)
    body = _pack_body(state)
    aad = MAGIC + keyring.store_id + header
    sealed = sealing.seal(_key(keyring, keyring.ratchet_epoch, keyring.erasures), body, aad)
    del body
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".snapshot.", dir=path.parent)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for part in (MAGIC, _LEN.pack(len(header)), header, sealed):
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError("the index snapshot could not be written") from exc
        raise
    return len(sealed) + len(header) + 8


def read(path: Path, keyring: Keyring) -> tuple[int, dict[str, Any]]:
    """Return (seq covered, state). Raises IntegrityError when missing, stale or forged."""
    try:  # read in pieces: a 100k x 512 snapshot is ~230 MB, and slices would copy it
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8 or head[:4] != MAGIC:
                raise IntegrityError("snapshot header is corrupt")
            (n,) = _LEN.unpack_from(head, 4)
            if n > 4096:
                raise IntegrityError("snapshot header is corrupt")
            header_bytes = fh.read(n)
            version, nonce, ct = fh.read(1), fh.read(sealing.NONCE_SIZE), fh.read()
    except OSError:
        raise IntegrityError("no snapshot") from None
    try:
        header = msgpack.unpackb(header_bytes, raw=False, max_map_len=16)
        seq, epoch, erasures = (header["seq"], header["epoch"], header["erasures"])
        if not all(type(v) is int for v in (seq, epoch, erasures)):
            raise TypeError
    except (ValueError, KeyError, TypeError, struct.error, msgpack.ExtraData):
        raise IntegrityError("snapshot header is corrupt") from None
    if epoch != keyring.ratchet_epoch or erasures != keyring.erasures:
        raise IntegrityError("snapshot is stale (epoch or erasure since)")
    aad = MAGIC + keyring.store_id + header_bytes
    body = sealing.open_sealed_parts(_key(keyring, epoch, erasures),
                                     version[0] if version else -1, nonce, ct, aad)
    del ct
    try:
        state = _unpack_body(body)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, struct.error,
            msgpack.ExtraData):
        raise IntegrityError("snapshot body is corrupt") from None
    del body  # the arrays in ``state`` are views of it: it lives until hnswlib copied them
    if not isinstance(state, dict):
        raise IntegrityError("snapshot body is corrupt")
    return seq, state


def fingerprint(row: Any) -> bytes:
    """A row's header fields and AEAD tag, hashed: equal fingerprints mean the row is the
    one the snapshot saw (a changed header or a resealed blob changes it)."""
    fields = [row.record_id, row.subject_ref, row.epoch, row.expiry_us, list(row.purposes),
              row.model, row.held, bytes(row.blob[-16:])]
    return hashlib.blake2b(msgpack.packb(fields, use_bin_type=True), digest_size=16).digest()
