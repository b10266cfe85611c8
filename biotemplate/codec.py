"""Records <-> sealed rows: the plaintext format, which key seals a row, and its AD.

This is the glue between the keys (the keyring's epoch and hold keys; each subject's key
and live record ids, its entry, given by ``entries``), the crypto module (how to seal)
and the backend rows (where the headers live). It holds no policy: the vault and the
store decide whether a record may be read; the codec only knows whether it *can* be, and
a row its subject's entry does not list cannot (``Unlisted``).

Plaintext inside a sealed record is msgpack: ``{"t": float32 little-endian bytes,
"s": subject id, "m": metadata, "src": source, "c": created (us)}``. The subject id lives
only here, inside the ciphertext; rows carry a keyed hash of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from . import sealing
from .backends.base import RecordRow
from .errors import IntegrityError, KeyUnavailable
from .keyring import Keyring
from .subject_keys import Entry
from .validation import UNPACK_LIMITS


@dataclass(frozen=True, slots=True)
class Plain:
    """What a sealed record protects."""

    template: NDArray[np.float32]
    subject_id: str
    metadata: Mapping[str, Any]
    source: str | None
    created_us: int


def encode_plain(p: Plain) -> bytes:
    data = {"t": np.ascontiguousarray(p.template, dtype="<f4").tobytes(), "s": p.subject_id,
            "m": dict(p.metadata), "src": p.source, "c": p.created_us}
    return bytes(msgpack.packb(data, use_bin_type=True))


def decode_plain(raw: bytes, dim: int) -> Plain:
    """Authenticated bytes that do not decode mean a bug or a key compromise: fail closed."""
    try:
        d = msgpack.unpackb(raw, raw=False, **UNPACK_LIMITS)
        t = np.frombuffer(d["t"], dtype="<f4")
        if t.shape != (dim,):
            raise ValueError
        return Plain(template=t.astype(np.float32), subject_id=str(d["s"]),
                     metadata=d["m"], source=d["src"], created_us=int(d["c"]))
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
            msgpack.ExtraData):
        raise IntegrityError("record content is malformed") from None


class Shredded(KeyUnavailable):
    """The row's key material is gone (expired epoch, erased subject): it reads as absent."""


class Unlisted(IntegrityError):
    """The row authenticates, but its subject's entry does not list it: a row the store
    deleted, copied back. Never served; counted with the integrity failures."""


class RecordCodec:
    """Seal and open records of one store with the keys of its keyring and the subject-key
    entries ``entries`` returns (None: the subject has no key; it may raise
    IntegrityError for an entry that does not open)."""

    def __init__(self, keyring: Keyring, *, model: str, dim: int,
                 entries: Callable[[bytes], Entry | None]) -> None:
        self.keyring = keyring
        self.model = model
        self.dim = dim
        self._entries = entries

    def _aad(self, row: RecordRow) -> bytes:
        try:
            rid = bytes.fromhex(row.record_id)
        except ValueError:
            raise IntegrityError("sealed data failed authentication") from None
        # fromhex forgives case and spaces; an id must have exactly one spelling, and the
        # epoch is a function of the expiry: refuse any other combination outright.
        if rid.hex() != row.record_id or row.epoch != row.expiry_us // self.keyring.epoch_us:
            raise IntegrityError("sealed data failed authentication")
        return sealing.record_aad(store_id=self.keyring.store_id, model=row.model,
                                  record_id=rid, subject_ref=row.subject_ref,
                                  purposes=row.purposes, expiry_us=row.expiry_us,
                                  epoch=row.epoch, held=row.held)

    def _entry(self, row: RecordRow) -> Entry:
        entry = self._entries(row.subject_ref)
        if entry is None:
            raise Shredded("subject key destroyed")
        return entry

    def _key(self, row: RecordRow, subject_key: bytes) -> bytes:
        if row.held:
            hold = self.keyring.holds.get(row.subject_ref)
            if hold is None:
                raise Shredded("hold key destroyed")
            scope = hold[0]
        else:
            try:  # a purge may advance the ratchet between any check and this call
                scope = self.keyring.epoch_key(row.epoch)
            except KeyUnavailable:
                raise Shredded("epoch shredded") from None
        return sealing.record_key(scope, subject_key, bytes.fromhex(row.record_id))

    def seal(self, *, record_id: str, subject_ref: bytes, purposes: Sequence[str],
             expiry_us: int, held: bool, plain: Plain, subject_key: bytes) -> RecordRow:
        """A new row, sealed under ``subject_key`` (its entry lists it once committed)."""
        epoch = expiry_us // self.keyring.epoch_us
        row = RecordRow(record_id=record_id, subject_ref=subject_ref, epoch=epoch,
                        expiry_us=expiry_us, purposes=tuple(sorted(purposes)),
                        model=self.model, held=held, blob=b"")
        blob = sealing.seal(self._key(row, subject_key), encode_plain(plain), self._aad(row))
        return _with_blob(row, blob, held)

    def open(self, row: RecordRow) -> Plain:
        """Raises:
        Shredded: the key is gone (reads as absent, never as an error to the user).
        Unlisted: the subject's entry does not list the row (a deleted row put back).
        IntegrityError: the row or blob was tampered with, swapped or replayed.
        """
        if row.model != self.model:
            raise IntegrityError("sealed data failed authentication")
        aad = self._aad(row)
        entry = self._entry(row)
        raw = sealing.open_sealed(self._key(row, entry.key), row.blob, aad)
        # Authentic, but is it live? Only if its subject's entry lists it (checked after
        # the AEAD, so that an edited row is reported as tampering, not as a replay).
        if bytes.fromhex(row.record_id) not in entry.ids:
            raise Unlisted("sealed data failed authentication")
        return decode_plain(raw, self.dim)

    def reseal(self, row: RecordRow, *, held: bool) -> RecordRow:
        """Move a record between its epoch key and its subject's hold key."""
        plain = self.open(row)
        moved = _with_blob(row, b"", held)
        key = self._key(moved, self._entry(moved).key)
        return _with_blob(moved, sealing.seal(key, encode_plain(plain), self._aad(moved)),
                          held)

    def with_expiry(self, row: RecordRow, plain: Plain, expiry_us: int) -> RecordRow:
        """The record ``plain`` (opened from ``row``) sealed again with another expiry: a
        new epoch (the one its new expiry falls in) unless it is held, and a new nonce.

        Raises:
            Shredded: the new epoch's key is gone (the caller never moves a record into
                the past of the ratchet).
        """
        moved = RecordRow(record_id=row.record_id, subject_ref=row.subject_ref,
                          epoch=expiry_us // self.keyring.epoch_us, expiry_us=expiry_us,
                          purposes=row.purposes, model=row.model, held=row.held, blob=b"",
                          seq=row.seq)
        key = self._key(moved, self._entry(moved).key)
        return _with_blob(moved, sealing.seal(key, encode_plain(plain), self._aad(moved)),
                          row.held)

    def rekey(self, row: RecordRow) -> RecordRow:
        """The same record sealed under the keyring's pending ratchet state, or under its
        subject's pending hold key when held (``rotate_keys``): opened with the current
        keys first, so a row that does not open is never rewritten.

        Raises:
            Shredded, Unlisted, IntegrityError: as :meth:`open`.
        """
        plain = self.open(row)
        if row.held:
            scope = self.keyring.pending_holds[row.subject_ref]
        else:
            scope = self.keyring.pending_epoch_key(row.epoch)
        key = sealing.record_key(scope, self._entry(row).key, bytes.fromhex(row.record_id))
        return _with_blob(row, sealing.seal(key, encode_plain(plain), self._aad(row)), row.held)


def _with_blob(row: RecordRow, blob: bytes, held: bool) -> RecordRow:
    return RecordRow(record_id=row.record_id, subject_ref=row.subject_ref, epoch=row.epoch,
                     expiry_us=row.expiry_us, purposes=row.purposes, model=row.model,
                     held=held, blob=blob, seq=row.seq)
