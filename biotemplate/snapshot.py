"""Sealed index snapshots: open a large store without re-decrypting every record.

A snapshot is the exported index state (hnswlib's graph and vectors, label tables, the
record id -> subject id map), sealed like everything else: nothing of it reaches disk in
plaintext, and nothing of the file reaches hnswlib's loader before it is authenticated.

File layout (``index.snapshot``)::

    "BTSN" | header length (4 bytes, big-endian) | header | sealed body
    header = msgpack({"v": 1, "seq": change seq covered, "epoch": e, "erasures": g})
    body   = seal(snapshot key, msgpack(state), ad = "BTSN" | store id | header)
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


def _pack_default(obj: object) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__nd__": [obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes()]}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot snapshot a {type(obj).__name__}")


def _unpack_hook(obj: dict[Any, Any]) -> Any:
    nd = obj.get("__nd__")
    if nd is not None:
        dtype, shape, data = nd
        if not isinstance(dtype, str) or not isinstance(data, bytes):
            raise TypeError("malformed array")
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    return obj


def _key(keyring: Keyring, epoch: int, erasures: int) -> bytes:
    scope = keyring.epoch_key(epoch)
    if keyring.snapshot_secret is not None:  # replaced at every key destruction
        scope = sealing.hkdf(scope + keyring.snapshot_secret, info=b"biotemplate/v1/snap-scope")
    return sealing.snapshot_key(scope, erasures)


def write(path: Path, keyring: Keyring, state: dict[str, Any], seq: int) -> int:
    """Seal ``state`` and replace the snapshot file atomically. Returns bytes written."""
    header = msgpack.packb({"v": 1, "seq": seq, "epoch": keyring.ratchet_epoch,
                            "erasures": keyring.erasures}, use_bin_type=True)
    body = msgpack.packb(state, use_bin_type=True, default=_pack_default)
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
        state = msgpack.unpackb(body, raw=False, object_hook=_unpack_hook,
                                strict_map_key=False)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            msgpack.ExtraData):
        raise IntegrityError("snapshot body is corrupt") from None
    del body  # the arrays in ``state`` hold their own copies: free the plaintext now
    if not isinstance(state, dict):
        raise IntegrityError("snapshot body is corrupt")
    return seq, state


def fingerprint(row: Any) -> bytes:
    """A row's header fields and AEAD tag, hashed: equal fingerprints mean the row is the
    one the snapshot saw (a changed header or a resealed blob changes it)."""
    fields = [row.record_id, row.subject_ref, row.epoch, row.expiry_us, list(row.purposes),
              row.model, row.held, bytes(row.blob[-16:])]
    return hashlib.blake2b(msgpack.packb(fields, use_bin_type=True), digest_size=16).digest()
