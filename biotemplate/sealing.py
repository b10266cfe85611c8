"""The crypto of biotemplate: every key derivation, label, nonce and AEAD call.

The module a security reviewer reads (STREAM, for snapshot files, is in ``streaming.py``;
a test fails if any other module calls a primitive): each function a thin, commented use.

Threat model (in full in SECURITY.md): whoever holds ``records.db`` and its backups reads
nothing without the keyring (sealed under a master key kept elsewhere); with a keyring
taken *after* a record expired or its subject was erased, nothing of that record either:
its epoch state, or the bucket key that sealed its subject's key, no longer exists.

Primitives: XChaCha20-Poly1305 (libsodium; random 192-bit nonces), HKDF-SHA256 (one label
per use), HMAC-SHA256 (subject refs, probe digests), Ed25519, SHA-256, Argon2id.

Sealed record (``blob`` column): version (1 byte, 0x01) | nonce (24) | ciphertext + tag (16).
record key = HKDF(ikm = scope key || subject key, salt = record id, "record"), where the
scope key is the epoch key of the expiry's epoch or, under legal hold, the hold key.
Associated data = msgpack([version, store id, model, record id, subject ref, sorted
purposes, expiry (us), epoch, held]). Edit or swap a field and ...

    version      a downgrade to another format is refused
    store id     a row copied from another store (same keys restored elsewhere) fails
    model id     templates of one model can't be passed off as another's (wrong scores)
    record id    blobs swapped between rows fail (the key is salted with it too)
    subject ref  a template re-attributed to another person fails
    purposes     widening a record's purposes (e.g. into a watch list) fails
    expiry       extending retention fails
    epoch        moving a record to a later epoch key fails (the key differs as well)
    held         claiming a legal hold to dodge a purge fails

Keyring file: "BTKR" | version | store id (16) | check | body; check = seal(HKDF(master,
"keyring-check"), b"", ad = header) tells a wrong master key (KeyUnavailable) from
tampering; body = seal(HKDF(master, "keyring-wrap"), msgpack(key state), ad = header).

Bound values (``seal_bound``): settings in records.db (kind "meta", v1 layout: key HKDF(
meta key, "meta"), ad "meta:" || name || ":" || store id); subject-key entries: seal(bucket
key, msgpack([subject key, sorted record ids]), ad = msgpack(["subject-key", version, store
id, subject ref, bucket])). Each field stops a move to another kind, store or subject, or
to a bucket whose key outlived a rotation (an old copy's entry dies with its bucket key).

Audit entries: SHA-256 chained, each signed with Ed25519 (seed in the keyring) or, for
searches, MAC'd: HMAC(HKDF(audit seed, "audit-mac"), entry hash), 32 bytes; a later
Ed25519 seal over a chained hash covers them for auditors (``audit.py``).

Order on open: length and version, key, AEAD, then decode. Every authentication failure
raises the same bare ``IntegrityError``; nothing here logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import pwhash
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
KEYRING_MAGIC = b"BTKR"


def random_key() -> bytes:  # the OS CSPRNG, for every key, id, salt and nonce
    return os.urandom(KEY_SIZE)


def random_id(size: int = 16) -> bytes:  # ids, salts
    return os.urandom(size)


def hkdf(ikm: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    # HKDF-SHA256 to 32 bytes; ``info`` separates every use, so no key serves two jobs
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(ikm)


def keyed_hash(key: bytes, data: bytes) -> bytes:  # HMAC-SHA256: linkable by key holders
    return hmac.new(key, data, hashlib.sha256).digest()


ARGON2_OPS, ARGON2_MEM = pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE
ARGON2_SALT_SIZE = pwhash.argon2id.SALTBYTES


def passphrase_key(passphrase: bytes, salt: bytes, ops: int, mem: int) -> bytes:  # Argon2id
    return bytes(pwhash.argon2id.kdf(KEY_SIZE, passphrase, salt, opslimit=ops, memlimit=mem))


def digest(data: bytes) -> bytes:  # identities that are not secrets (a policy)
    return hashlib.sha256(data).digest()


def subject_ref(lookup_key: bytes, subject_id: str) -> bytes:  # never the id in clear
    return keyed_hash(lookup_key, b"subject:" + subject_id.encode())


def probe_digest(digest_key: bytes, template: bytes) -> bytes:  # links a probe's entries
    return keyed_hash(digest_key, b"probe:" + template)


def master_key_id(master_key: bytes) -> bytes:  # names a master key in the audit, reveals none
    return hkdf(master_key, info=b"biotemplate/v1/master-key-id")[:16]


# --- key hierarchy ----------------------------------------------------------------------
# Epoch ratchet: S_{e+1} = HKDF(S_e, "ratchet"); K_epoch(e) = HKDF(S_e, "epoch"). HKDF is
# one-way, so whoever holds S_e derives every later epoch key but none of the earlier
# ones: purge overwrites S_e with S_{e+1} and the keys of past epochs are gone.


def ratchet_step(state: bytes) -> bytes:
    return hkdf(state, info=b"biotemplate/v1/ratchet")


def epoch_key_from_state(state: bytes) -> bytes:
    return hkdf(state, info=b"biotemplate/v1/epoch")


def record_key(scope_key: bytes, subject_key: bytes, record_id: bytes) -> bytes:
    """One key per record: destroying either the scope key or the subject key shreds it."""
    return hkdf(scope_key + subject_key, salt=record_id, info=b"biotemplate/v1/record")


def snapshot_key(epoch_key: bytes, erasure_generation: int,
                 secret: bytes | None = None) -> bytes:
    """Snapshots die with their epoch and the next key destruction (which replaces
    ``secret``, the keyring's snapshot secret; the generation counts them)."""
    scope = (epoch_key if secret is None
             else hkdf(epoch_key + secret, info=b"biotemplate/v1/snap-scope"))
    return hkdf(scope, info=b"biotemplate/v1/snapshot/" + str(erasure_generation).encode())


def stream_file_key(key: bytes, salt: bytes) -> bytes:  # a key per snapshot file (streaming)
    return hkdf(key, salt=salt, info=b"biotemplate/v1/stream")


def record_aad(*, store_id: bytes, model: str, record_id: bytes, subject_ref: bytes,
               purposes: Sequence[str], expiry_us: int, epoch: int, held: bool) -> bytes:
    """The associated data of a sealed record: every policy-relevant header field."""
    return bytes(msgpack.packb([VERSION, store_id, model, record_id, subject_ref,
                                sorted(purposes), expiry_us, epoch, held], use_bin_type=True))


# --- AEAD -------------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is required, never defaulted."""
    return _seal_with_nonce(key, plaintext, aad, os.urandom(NONCE_SIZE))


def _seal_with_nonce(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    """Deterministic seam for the frozen test vectors. Never call with a fixed nonce."""
    ct = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
    return bytes([VERSION]) + nonce + bytes(ct)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Authenticate and decrypt a sealed blob. Raises IntegrityError on any failure."""
    if len(blob) < 1 + NONCE_SIZE + TAG_SIZE or blob[0] != VERSION:
        raise IntegrityError("sealed data failed authentication")
    try:
        return bytes(crypto_aead_xchacha20poly1305_ietf_decrypt(
            blob[1 + NONCE_SIZE :], aad, blob[1 : 1 + NONCE_SIZE], key))
    except CryptoError:
        raise IntegrityError("sealed data failed authentication") from None


def _bound(key: bytes, kind: str, store_id: bytes, fields: Sequence[bytes | int],
           data: bytes) -> tuple[bytes, bytes, bytes]:
    """(AEAD key, data, associated data) of a value sealed for its place (see the top)."""
    if kind == "meta":  # the v1 layout of settings, kept byte for byte
        return (hkdf(key, info=b"biotemplate/v1/meta"), data,
                b"meta:" + bytes(fields[0]) + b":" + store_id)
    return key, data, bytes(msgpack.packb([kind, VERSION, store_id, *fields], use_bin_type=True))


def seal_bound(key: bytes, kind: str, store_id: bytes, fields: Sequence[bytes | int],
               body: bytes) -> bytes:
    """Seal a value bound to (kind, store, fields): moved anywhere else, it fails to open."""
    return seal(*_bound(key, kind, store_id, fields, body))


def open_bound(key: bytes, kind: str, store_id: bytes, fields: Sequence[bytes | int],
               blob: bytes) -> bytes:
    return open_sealed(*_bound(key, kind, store_id, fields, blob))


# --- keyring envelope, signatures ---------------------------------------------------------


def seal_keyring(master_key: bytes, store_id: bytes, body: bytes) -> bytes:
    return _seal_keyring_with_nonces(master_key, store_id, body,
                                     os.urandom(NONCE_SIZE), os.urandom(NONCE_SIZE))


def _seal_keyring_with_nonces(master_key: bytes, store_id: bytes, body: bytes,
                              check_nonce: bytes, body_nonce: bytes) -> bytes:
    # deterministic seam for the frozen test vectors
    header = KEYRING_MAGIC + bytes([VERSION]) + store_id
    check = _seal_with_nonce(hkdf(master_key, info=b"biotemplate/v1/keyring-check"),
                             b"", header, check_nonce)
    sealed = _seal_with_nonce(hkdf(master_key, info=b"biotemplate/v1/keyring-wrap"),
                              body, header, body_nonce)
    return header + check + sealed


def open_keyring(master_key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """Return (store id, body). A wrong master key raises KeyUnavailable, tampering
    IntegrityError: the two must not be confused, or operators chase the wrong problem."""
    head_len, check_len = len(KEYRING_MAGIC) + 1 + STORE_ID_SIZE, 1 + NONCE_SIZE + TAG_SIZE
    if (len(data) < head_len + check_len + 1 + NONCE_SIZE + TAG_SIZE
            or not data.startswith(KEYRING_MAGIC) or data[len(KEYRING_MAGIC)] != VERSION):
        raise IntegrityError("keyring file is corrupt or of an unknown version")
    header, store_id = data[:head_len], data[len(KEYRING_MAGIC) + 1 : head_len]
    check, body = data[head_len : head_len + check_len], data[head_len + check_len :]
    try:
        open_sealed(hkdf(master_key, info=b"biotemplate/v1/keyring-check"), check, header)
    except IntegrityError:
        raise KeyUnavailable("the master key does not open this keyring (wrong key?)") from None
    return store_id, open_sealed(hkdf(master_key, info=b"biotemplate/v1/keyring-wrap"),
                                 body, header)


def signer_from_seed(seed: bytes) -> tuple[Callable[[bytes], bytes], bytes]:
    private = Ed25519PrivateKey.from_private_bytes(seed)  # (sign, raw public key)
    return private.sign, private.public_key().public_bytes_raw()


def audit_mac(audit_seed: bytes) -> Callable[[bytes], bytes]:
    """HMAC-SHA256 of an audit entry's hash under a key of its own: proves a search entry
    to the store (which holds the seed) at a fraction of a signature's cost."""
    key = hkdf(audit_seed, info=b"biotemplate/v1/audit-mac")
    return lambda entry_hash: keyed_hash(key, entry_hash)


mac_equal = hmac.compare_digest  # constant time: a MAC check leaks no prefix


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
