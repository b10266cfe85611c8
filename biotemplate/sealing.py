"""The crypto of biotemplate: record keys, AEAD sealing, the keyring envelope, signatures.

This is the module a security reviewer reads. It is flat on purpose: every function is a
thin, commented use of a well-reviewed primitive; there is no home-made construction.

Threat model (the full one is in SECURITY.md). An attacker holds ``records.db`` and every
backup of it, and may edit it. Without the keyring (a separate small file, sealed under the
master key held outside the store) they read nothing. With a keyring copy taken *after* a
record expired or its subject was erased, they still read nothing of that record: its key
was derived from an epoch-ratchet state or a subject key that no longer exists. Editing any
header field of a row (purposes, expiry, subject, epoch, hold state) or moving a blob to
another row is detected, because those fields are the AEAD's associated data.

Primitives (all from pynacl/libsodium or pyca/cryptography):
- AEAD: XChaCha20-Poly1305 (libsodium IETF construction), 256-bit key, random 192-bit
  nonce per message, so nonce reuse is negligible even for millions of seals under one key.
- KDF: HKDF-SHA256 with a distinct ``info`` label per purpose (domain separation).
- Keyed hash: HMAC-SHA256 (subject refs, probe digests).
- Signatures: Ed25519 (audit entries and checkpoints).
- Large files (index snapshots): ChaCha20-Poly1305 (pyca/cryptography, OpenSSL) in the
  STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizar 2015; as in age and Tink): a
  key per file derived from a random 256-bit salt, the plaintext cut into frames, frame i
  sealed with nonce = i (11 bytes) || last-frame flag, so frames cannot be reordered,
  dropped, duplicated or truncated without an authentication failure. Frames are opened
  straight into the caller's buffer: a 230 MB snapshot needs no second plaintext copy, and
  OpenSSL opens it ~4x faster than libsodium's one-shot call here.

Sealed record layout (``blob`` column)::

    offset  size  field
    0       1     version (0x01)
    1       24    nonce (random)
    25      n+16  XChaCha20-Poly1305(record key, nonce, plaintext, associated data)

    record key = HKDF-SHA256(ikm = scope key || subject key, salt = record id (16 bytes),
                             info = "biotemplate/v1/record")
    scope key  = the epoch key of the epoch of the record's expiry, or, while the subject is
                 under legal hold, the subject's hold key.

Associated data = msgpack([version, store id, model id, record id, subject ref,
sorted purposes, expiry (us), epoch, held]). What each field stops:

    field        edit or swap it and ...
    version      a downgrade to another format is refused
    store id     a row copied from another store (same keys restored elsewhere) fails
    model id     templates of one model can't be passed off as another's (wrong scores)
    record id    blobs swapped between rows fail (the key is salted with it too)
    subject ref  a template re-attributed to another person fails
    purposes     widening a record's purposes (e.g. into a watch list) fails
    expiry       extending retention fails
    epoch        moving a record to a later epoch key fails (the key differs as well)
    held         claiming a legal hold to dodge a purge fails

Keyring layout (its own file)::

    "BTKR" | version (1) | store id (16) | check blob | body blob
    check blob = seal(check key, b"", ad = header)  - lets a wrong master key raise
                 KeyUnavailable instead of IntegrityError
    body blob  = seal(wrap key, msgpack(keyring), ad = header)
    check key, wrap key = HKDF(master key, info = "biotemplate/v1/keyring-check" | "-wrap")

Failure order on open: length and version, key check, AEAD, then decode. Every
authentication failure raises the same bare ``IntegrityError``: which byte failed is no
business of the caller's. Nothing here logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from .errors import IntegrityError, KeyUnavailable

VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16
STORE_ID_SIZE = 16
_HEADER = struct.Struct(">B")
KEYRING_MAGIC = b"BTKR"


def random_key() -> bytes:
    """A fresh 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def hkdf(ikm: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256 to 32 bytes. ``info`` separates every use, so no key serves two jobs."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(ikm)


def keyed_hash(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256: subject refs and probe digests, linkable only by the key's holder."""
    return hmac.new(key, data, hashlib.sha256).digest()


def digest(data: bytes) -> bytes:
    """SHA-256, for identities that are not secrets (which policy is current)."""
    return hashlib.sha256(data).digest()


# --- epoch ratchet --------------------------------------------------------------------
# S_{e+1} = HKDF(S_e, "ratchet"); K_epoch(e) = HKDF(S_e, "epoch"). HKDF is one-way, so
# whoever holds S_e can derive every later epoch key but none of the earlier ones: purge
# overwrites S_e with S_{e+1} and the keys of past epochs are gone.


def ratchet_step(state: bytes) -> bytes:
    return hkdf(state, info=b"biotemplate/v1/ratchet")


def epoch_key_from_state(state: bytes) -> bytes:
    return hkdf(state, info=b"biotemplate/v1/epoch")


def record_key(scope_key: bytes, subject_key: bytes, record_id: bytes) -> bytes:
    """One key per record: destroying either the scope key or the subject key shreds it."""
    return hkdf(scope_key + subject_key, salt=record_id, info=b"biotemplate/v1/record")


def snapshot_key(epoch_key: bytes, erasure_generation: int) -> bytes:
    """Index snapshots die with their epoch and with the next erasure."""
    info = b"biotemplate/v1/snapshot/" + str(erasure_generation).encode()
    return hkdf(epoch_key, info=info)


def record_aad(
    *,
    store_id: bytes,
    model: str,
    record_id: bytes,
    subject_ref: bytes,
    purposes: Sequence[str],
    expiry_us: int,
    epoch: int,
    held: bool,
) -> bytes:
    """The associated data of a sealed record: every policy-relevant header field."""
    fields = [VERSION, store_id, model, record_id, subject_ref, sorted(purposes),
              expiry_us, epoch, held]
    return bytes(msgpack.packb(fields, use_bin_type=True))


# --- AEAD -----------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is required, never defaulted."""
    return _seal_with_nonce(key, plaintext, aad, os.urandom(NONCE_SIZE))


def _seal_with_nonce(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    """Deterministic seam for the frozen test vectors. Never call with a fixed nonce."""
    ct = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return _HEADER.pack(VERSION) + nonce + bytes(ct)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Authenticate and decrypt a sealed blob. Raises IntegrityError on any failure."""
    if len(blob) < 1 + NONCE_SIZE + TAG_SIZE:
        raise IntegrityError("sealed data failed authentication")
    return open_sealed_parts(key, blob[0], blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :], aad)


def open_sealed_parts(key: bytes, version: int, nonce: bytes, ct: bytes, aad: bytes) -> bytes:
    """``open_sealed`` for a blob read in pieces, so a large snapshot is not copied by
    slicing. Same checks, same single error."""
    if version != VERSION or len(nonce) != NONCE_SIZE or len(ct) < TAG_SIZE:
        raise IntegrityError("sealed data failed authentication")
    try:
        return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(ct, aad, nonce, key))
    except CryptoError:
        raise IntegrityError("sealed data failed authentication") from None


# --- streams (snapshots) -------------------------------------------------------------
# STREAM over ChaCha20-Poly1305 with one key per file: the 96-bit nonce is the frame
# counter and a last-frame flag, unique under that key by construction (no randomness to
# fail), and the flag stops truncation at a frame boundary.

STREAM_FRAME = 1 << 24  # plaintext bytes per frame: bounds what is held unauthenticated
STREAM_SALT_SIZE = 32


def _stream_nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def stream_frames(size: int, frame: int = STREAM_FRAME) -> int:
    """How many frames a ``size``-byte plaintext is sealed in (an empty one: one frame)."""
    return max(1, -(-size // frame))


def stream_sealed_size(size: int, frame: int = STREAM_FRAME) -> int:
    return size + TAG_SIZE * stream_frames(size, frame)


def _zero(view: memoryview, step: int) -> None:
    blank = bytes(min(step, len(view)))
    for i in range(0, len(view), step):
        part = view[i : i + step]
        part[:] = blank[: len(part)]


def _stream_cipher(key: bytes, salt: bytes) -> ChaCha20Poly1305:
    if len(salt) != STREAM_SALT_SIZE:
        raise IntegrityError("sealed data failed authentication")
    return ChaCha20Poly1305(hkdf(key, salt=salt, info=b"biotemplate/v1/stream"))


def seal_stream(key: bytes, salt: bytes, plaintext: memoryview, aad: bytes,
                frame: int = STREAM_FRAME) -> Iterator[bytes]:
    """Yield the sealed frames of ``plaintext`` under a key derived from ``key`` and a
    fresh random ``salt`` (the caller stores the salt and binds it into ``aad``)."""
    cipher = _stream_cipher(key, salt)
    count = stream_frames(len(plaintext), frame)
    for i in range(count):
        chunk = plaintext[i * frame : (i + 1) * frame]
        yield cipher.encrypt(_stream_nonce(i, i == count - 1), chunk, aad)


def open_stream_into(key: bytes, salt: bytes, readinto: Callable[[memoryview], int],
                     out: bytearray, aad: bytes, frame: int = STREAM_FRAME) -> None:
    """Authenticate and decrypt frames read with ``readinto`` (a file's) into ``out``,
    whose length is the plaintext size (from the header, which is authenticated as the
    ``aad``; the caller checks it against the file size first). One frame buffer is
    reused, so nothing but ``out`` grows with the file. Raises IntegrityError on any
    failure; ``out`` is then zeroed."""
    cipher = _stream_cipher(key, salt)
    view = memoryview(out)
    count = stream_frames(len(out), frame)
    sealed = memoryview(bytearray(min(len(out), frame) + TAG_SIZE))
    try:
        for i in range(count):
            part = view[i * frame : (i + 1) * frame]
            ct = sealed[: len(part) + TAG_SIZE]
            if _fill(readinto, ct) != len(ct):
                raise InvalidTag
            cipher.decrypt_into(_stream_nonce(i, i == count - 1), ct, aad, part)
        if _fill(readinto, memoryview(bytearray(1))):  # bytes after the last frame
            raise InvalidTag
    except InvalidTag:
        _zero(view, frame)  # decrypt_into may have written unauthenticated plaintext
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


# --- keyring envelope -----------------------------------------------------------------


def _keyring_header(store_id: bytes) -> bytes:
    return KEYRING_MAGIC + _HEADER.pack(VERSION) + store_id


def seal_keyring(master_key: bytes, store_id: bytes, body: bytes) -> bytes:
    return _seal_keyring_with_nonces(master_key, store_id, body,
                                     os.urandom(NONCE_SIZE), os.urandom(NONCE_SIZE))


def _seal_keyring_with_nonces(
    master_key: bytes, store_id: bytes, body: bytes, check_nonce: bytes, body_nonce: bytes
) -> bytes:
    """Deterministic seam for the frozen test vectors."""
    header = _keyring_header(store_id)
    check = _seal_with_nonce(hkdf(master_key, info=b"biotemplate/v1/keyring-check"),
                             b"", header, check_nonce)
    sealed = _seal_with_nonce(hkdf(master_key, info=b"biotemplate/v1/keyring-wrap"),
                              body, header, body_nonce)
    return header + check + sealed


def open_keyring(master_key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """Return (store id, body). A wrong master key raises KeyUnavailable, tampering
    IntegrityError: the two must not be confused, or operators chase the wrong problem."""
    head_len = len(KEYRING_MAGIC) + 1 + STORE_ID_SIZE
    check_len = 1 + NONCE_SIZE + TAG_SIZE
    if (len(data) < head_len + check_len + 1 + NONCE_SIZE + TAG_SIZE
            or not data.startswith(KEYRING_MAGIC) or data[len(KEYRING_MAGIC)] != VERSION):
        raise IntegrityError("keyring file is corrupt or of an unknown version")
    header, store_id = data[:head_len], data[len(KEYRING_MAGIC) + 1 : head_len]
    check, body = data[head_len : head_len + check_len], data[head_len + check_len :]
    try:
        open_sealed(hkdf(master_key, info=b"biotemplate/v1/keyring-check"), check, header)
    except IntegrityError:
        raise KeyUnavailable("the master key does not open this keyring (wrong key?)") from None
    wrap_key = hkdf(master_key, info=b"biotemplate/v1/keyring-wrap")
    return store_id, open_sealed(wrap_key, body, header)


# --- signatures -----------------------------------------------------------------------


def signer_from_seed(seed: bytes) -> tuple[Callable[[bytes], bytes], bytes]:
    """An Ed25519 signing function and its raw public key, from a 32-byte seed."""
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes_raw()
    return private.sign, public


def verifier_for(public_key: bytes) -> Callable[[bytes, bytes], bool]:
    """A (message, signature) -> bool check, usable by auditors with the public key only."""
    key = Ed25519PublicKey.from_public_bytes(public_key)

    def verify(message: bytes, signature: bytes) -> bool:
        try:
            key.verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify
