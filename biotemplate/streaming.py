"""STREAM: sealing files too large for one AEAD message (index snapshots).

The construction of Hoang, Reyhanitabar, Rogaway and Vizar (2015), as in age and Tink,
over ChaCha20-Poly1305 (pyca/cryptography, OpenSSL): a key per file derived from a random
256-bit salt (``sealing.stream_file_key``), the plaintext cut into frames, frame i sealed
with nonce = i (11 bytes, big-endian) || last-frame flag (1 byte). The nonce is unique
under the file's key by construction (no randomness to fail), so frames cannot be
reordered, dropped, duplicated or truncated without an authentication failure.

Frames are opened straight into the caller's buffer: a 230 MB snapshot needs no second
plaintext copy, and OpenSSL opens it ~4x faster than libsodium's one-shot call here. On
any failure the buffer is zeroed, since ``decrypt_into`` may have written unauthenticated
plaintext into it. Every failure is the same bare ``IntegrityError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import sealing
from .errors import IntegrityError

FRAME = 1 << 24  # plaintext bytes per frame: bounds what is held unauthenticated
SALT_SIZE = 32
TAG_SIZE = 16


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def frames(size: int, frame: int = FRAME) -> int:
    """How many frames a ``size``-byte plaintext is sealed in (an empty one: one frame)."""
    return max(1, -(-size // frame))


def sealed_size(size: int, frame: int = FRAME) -> int:
    return size + TAG_SIZE * frames(size, frame)


def zero(view: memoryview, step: int = FRAME) -> None:
    """Overwrite a plaintext buffer in place, ``step`` bytes at a time."""
    blank = bytes(min(step, len(view)))
    for i in range(0, len(view), step):
        part = view[i : i + step]
        part[:] = blank[: len(part)]


def _cipher(key: bytes, salt: bytes) -> ChaCha20Poly1305:
    if len(salt) != SALT_SIZE:
        raise IntegrityError("sealed data failed authentication")
    return ChaCha20Poly1305(sealing.stream_file_key(key, salt))


def seal(key: bytes, salt: bytes, plaintext: memoryview, aad: bytes,
         frame: int = FRAME) -> Iterator[bytes]:
    """Yield the sealed frames of ``plaintext`` under a key derived from ``key`` and a
    fresh random ``salt`` (the caller stores the salt and binds it into ``aad``)."""
    cipher = _cipher(key, salt)
    count = frames(len(plaintext), frame)
    for i in range(count):
        yield cipher.encrypt(_nonce(i, i == count - 1), plaintext[i * frame : (i + 1) * frame],
                             aad)


def open_into(key: bytes, salt: bytes, readinto: Callable[[memoryview], int],
              out: bytearray, aad: bytes, frame: int = FRAME) -> None:
    """Authenticate and decrypt frames read with ``readinto`` (a file's) into ``out``,
    whose length is the plaintext size (from a header the caller authenticates as the
    ``aad`` and checked against the file size first). One frame buffer is reused, so
    nothing but ``out`` grows with the file.

    Raises:
        IntegrityError: any failure; ``out`` is then zeroed.
    """
    cipher = _cipher(key, salt)
    view = memoryview(out)
    count = frames(len(out), frame)
    sealed = memoryview(bytearray(min(len(out), frame) + TAG_SIZE))
    try:
        for i in range(count):
            part = view[i * frame : (i + 1) * frame]
            ct = sealed[: len(part) + TAG_SIZE]
            if _fill(readinto, ct) != len(ct):
                raise InvalidTag
            cipher.decrypt_into(_nonce(i, i == count - 1), ct, aad, part)
        if _fill(readinto, memoryview(bytearray(1))):  # bytes after the last frame
            raise InvalidTag
    except InvalidTag:
        zero(view, frame)
        raise IntegrityError("sealed data failed authentication") from None


def _fill(readinto: Callable[[memoryview], int], buf: memoryview) -> int:
    """Read until ``buf`` is full or the input ends; returns the bytes read."""
    got = 0
    while got < len(buf):
        n = readinto(buf[got:])
        if not n:
            break
        got += n
    return got
