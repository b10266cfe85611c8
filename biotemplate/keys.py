"""Key providers (where the master key comes from) and the keyring (what it protects).

The master key (KEK) never lives in the store folder. A provider hands it over when a store
is created or opened; the store keeps it only to rewrap the keyring.

The keyring is a small file of its own, not in SQLite, replaced atomically (write a temp
file, fsync, rename, fsync the folder), so a crash leaves either the old or the new keyring,
never neither and never a blend. It holds:

- the epoch ratchet state S_e (e = first epoch not yet shredded); purge advances it,
- one random key per subject (erasure destroys it),
- per-subject legal-hold keys (records under hold are resealed with them),
- the lookup key (subject refs), the digest key (probe digests), the audit signing seed,
- the erasure generation (snapshot keys change with it), and the time high-water mark.

Because the keyring is small and rewritten on every shredding event, back it up on its own
short schedule (no longer than one epoch): a keyring backup is what could resurrect
expired or erased records from an old database copy.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import msgpack
from nacl import pwhash

from . import sealing
from .errors import IntegrityError, InvalidInput, KeyFileExists, KeyUnavailable


class SecretKey:
    """32 bytes of key material that will not show up in a repr, a log or a pickle."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != sealing.KEY_SIZE:
            raise KeyUnavailable(f"a master key must be exactly {sealing.KEY_SIZE} bytes")
        self._key = bytes(key)

    def reveal(self) -> bytes:
        """The raw bytes, for the crypto module only."""
        return self._key

    def __repr__(self) -> str:
        return "SecretKey(<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")


class KeyProvider(Protocol):
    """Anything that can hand over the 32-byte master key (file, passphrase, env, KMS)."""

    def master_key(self) -> SecretKey: ...


class _NoPickle:
    def __reduce__(self) -> NoReturn:
        raise TypeError("key providers cannot be pickled")


def _parse_key_text(data: bytes, where: str) -> SecretKey:
    """Accept 32 raw bytes, 64 hex characters or standard base64 of 32 bytes."""
    if len(data) == sealing.KEY_SIZE:
        return SecretKey(data)
    text = data.strip()
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            raw = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == sealing.KEY_SIZE:
            return SecretKey(raw)
    raise KeyUnavailable(f"{where} does not hold a 32-byte key (raw, hex or base64)")


class FileKeyProvider(_NoPickle):
    """The master key in a file of mode 0600, ideally on another medium than the store."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileKeyProvider({str(self.path)!r})"

    @classmethod
    def generate(cls, path: str | os.PathLike[str]) -> FileKeyProvider:
        """Write a new random key (hex) to ``path`` with mode 0600; never overwrite.

        Raises:
            KeyFileExists: ``path`` already exists (overwriting would orphan a store).
        """
        target = Path(path)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileExists(f"{target} exists; refusing to overwrite a key file") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(sealing.random_key().hex().encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return cls(target)

    def master_key(self) -> SecretKey:
        """Raises:
        KeyUnavailable: missing file, unsafe mode (readable by group/others), bad content.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise KeyUnavailable(f"key file {self.path} does not exist") from None
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyUnavailable(f"key file {self.path} is accessible to group/others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
        return _parse_key_text(self.path.read_bytes(), f"key file {self.path}")


class EnvKeyProvider(_NoPickle):
    """The master key from an environment variable (hex or base64), e.g. set by a vault."""

    def __init__(self, variable: str = "BIOTEMPLATE_MASTER_KEY") -> None:
        self.variable = variable

    def __repr__(self) -> str:
        return f"EnvKeyProvider({self.variable!r})"

    def master_key(self) -> SecretKey:
        value = os.environ.get(self.variable)
        if not value:
            raise KeyUnavailable(f"environment variable {self.variable} is not set")
        return _parse_key_text(value.encode(), f"environment variable {self.variable}")


class PassphraseKeyProvider(_NoPickle):
    """The master key derived from a passphrase with Argon2id.

    The salt file (created on first use, mode 0600) keeps the salt and the cost parameters,
    so a later open derives the same key even if the defaults change.
    """

    def __init__(self, passphrase: str | bytes, *, salt_file: str | os.PathLike[str],
                 ops_limit: int = pwhash.argon2id.OPSLIMIT_MODERATE,
                 mem_limit: int = pwhash.argon2id.MEMLIMIT_MODERATE) -> None:
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        if not isinstance(secret, bytes) or not secret:
            raise InvalidInput("the passphrase must be a non-empty str or bytes")
        self._passphrase = secret
        self.salt_file = Path(salt_file)
        self._ops, self._mem = ops_limit, mem_limit

    def __repr__(self) -> str:
        return f"PassphraseKeyProvider(<redacted>, salt_file={str(self.salt_file)!r})"

    def _salt_and_costs(self) -> tuple[bytes, int, int]:
        if not self.salt_file.exists():
            data = {"v": 1, "salt": os.urandom(pwhash.argon2id.SALTBYTES),
                    "ops": self._ops, "mem": self._mem}
            fd = os.open(self.salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(msgpack.packb(data, use_bin_type=True))
                os.fsync(fh.fileno())
        try:
            data = msgpack.unpackb(self.salt_file.read_bytes(), raw=False)
            return bytes(data["salt"]), int(data["ops"]), int(data["mem"])
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                msgpack.ExtraData):
            raise KeyUnavailable(f"salt file {self.salt_file} is corrupt") from None

    def master_key(self) -> SecretKey:
        salt, ops, mem = self._salt_and_costs()
        raw = pwhash.argon2id.kdf(sealing.KEY_SIZE, self._passphrase, salt,
                                  opslimit=ops, memlimit=mem)
        return SecretKey(raw)


# --- the keyring ----------------------------------------------------------------------


def epoch_of(t_us: int, epoch_us: int) -> int:
    """The epoch number of a time: whole epoch lengths since the Unix epoch (UTC)."""
    return t_us // epoch_us


@dataclass(eq=False)
class Keyring:
    """The key material of one store. Mutate, then ``save`` (atomic) before relying on it."""

    store_id: bytes
    epoch_us: int
    ratchet_epoch: int
    ratchet_state: bytes
    lookup_key: bytes
    digest_key: bytes
    meta_key: bytes
    audit_seed: bytes
    subjects: dict[bytes, bytes] = field(default_factory=dict)
    holds: dict[bytes, tuple[bytes, bool]] = field(default_factory=dict)
    erasures: int = 0
    high_water_us: int = 0
    # Digests of the policy versions the store accepts (one; two while set_policy runs):
    # a sealed policy put back from an older database copy is refused on open.
    policies: list[bytes] = field(default_factory=list)
    # Mixed into the snapshot key and replaced whenever a subject key is destroyed: the
    # erasure generation is only a counter, this makes a snapshot copy from before an
    # erasure unopenable even with the current keyring.
    snapshot_secret: bytes | None = None
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _epoch_cache: dict[int, bytes] = field(default_factory=dict)
    _state_cache: dict[int, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Keyring(store={self.store_id.hex()}, epoch={self.ratchet_epoch}, "
                f"subjects={len(self.subjects)}, holds={len(self.holds)})")

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")

    @classmethod
    def new(cls, store_id: bytes, epoch_us: int, now_us: int) -> Keyring:
        rk = sealing.random_key
        return cls(store_id=store_id, epoch_us=epoch_us,
                   ratchet_epoch=epoch_of(now_us, epoch_us), ratchet_state=rk(),
                   lookup_key=rk(), digest_key=rk(), meta_key=rk(), audit_seed=rk(),
                   high_water_us=now_us, snapshot_secret=rk())

    # --- epochs ---

    def epoch_key(self, epoch: int) -> bytes:
        """K_epoch(e), derived forward from S_e. Raises KeyUnavailable for a shredded epoch."""
        with self._mutex:  # the ratchet (epoch, state) pair must be read as one
            return self._epoch_key(epoch)

    def _epoch_key(self, epoch: int) -> bytes:
        if epoch < self.ratchet_epoch:
            raise KeyUnavailable("that epoch has been shredded")
        cached = self._epoch_cache.get(epoch)
        if cached is not None:
            return cached
        # Step forward from the nearest state already derived. States of epochs >= the
        # ratchet epoch are derivable from S_e anyway, so caching them exposes nothing more.
        e = max((x for x in self._state_cache if x <= epoch), default=self.ratchet_epoch)
        state = self._state_cache.get(e, self.ratchet_state)
        for _ in range(epoch - e):
            state = sealing.ratchet_step(state)
            e += 1
            if e % 64 == 0:
                self._state_cache[e] = state
        key = sealing.epoch_key_from_state(state)
        self._epoch_cache[epoch] = key
        return key

    def advance(self, to_epoch: int) -> bool:
        """Ratchet S_e forward to S_to_epoch, forgetting the old state. True if it moved."""
        with self._mutex:
            return self._advance(to_epoch)

    def _advance(self, to_epoch: int) -> bool:
        if to_epoch <= self.ratchet_epoch:
            return False
        state = self.ratchet_state
        for _ in range(to_epoch - self.ratchet_epoch):
            state = sealing.ratchet_step(state)
        self.ratchet_state, self.ratchet_epoch = state, to_epoch
        self._epoch_cache = {e: k for e, k in self._epoch_cache.items() if e >= to_epoch}
        self._state_cache = {e: k for e, k in self._state_cache.items() if e >= to_epoch}
        return True

    # --- subjects and holds ---

    def subject_ref(self, subject_id: str) -> bytes:
        return sealing.keyed_hash(self.lookup_key, b"subject:" + subject_id.encode())

    def held(self, ref: bytes) -> bool:
        entry = self.holds.get(ref)
        return entry is not None and entry[1]

    # --- persistence ---

    def _body(self) -> bytes:
        data: dict[str, Any] = {
            "v": 1, "epoch_us": self.epoch_us,
            "ratchet": [self.ratchet_epoch, self.ratchet_state],
            "lookup": self.lookup_key, "digest": self.digest_key, "meta": self.meta_key,
            "audit": self.audit_seed, "subjects": self.subjects,
            "holds": {ref: [key, active] for ref, (key, active) in self.holds.items()},
            "erasures": self.erasures, "high_water_us": self.high_water_us,
        }
        if self.policies:  # optional in v1: absent in keyrings written before it existed
            data["policies"] = self.policies
        if self.snapshot_secret is not None:  # likewise optional
            data["snapshot"] = self.snapshot_secret
        return bytes(msgpack.packb(data, use_bin_type=True))

    def to_bytes(self, master_key: SecretKey) -> bytes:
        return sealing.seal_keyring(master_key.reveal(), self.store_id, self._body())

    @classmethod
    def from_bytes(cls, data: bytes, master_key: SecretKey) -> Keyring:
        """Raises KeyUnavailable (wrong master key) or IntegrityError (tampered/corrupt)."""
        store_id, body = sealing.open_keyring(master_key.reveal(), data)
        try:
            d = msgpack.unpackb(body, raw=False, strict_map_key=False)
            ratchet_epoch, ratchet_state = d["ratchet"]
            return cls(
                store_id=store_id, epoch_us=_int(d["epoch_us"]),
                ratchet_epoch=_int(ratchet_epoch), ratchet_state=_key(ratchet_state),
                lookup_key=_key(d["lookup"]), digest_key=_key(d["digest"]),
                meta_key=_key(d["meta"]), audit_seed=_key(d["audit"]),
                subjects=_keys(d["subjects"]),
                holds={_key(k): (_key(v[0]), _bool(v[1])) for k, v in d["holds"].items()},
                erasures=_int(d["erasures"]), high_water_us=_int(d["high_water_us"]),
                policies=[_key(x) for x in d.get("policies", [])],
                snapshot_secret=None if "snapshot" not in d else _key(d["snapshot"]))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                msgpack.ExtraData):
            raise IntegrityError("keyring content is malformed") from None

    def save(self, path: Path, master_key: SecretKey,
             before_rename: Callable[[], None] | None = None) -> None:
        """Atomically replace the keyring file: temp, fsync, rename, fsync the folder.

        ``before_rename`` is a test seam for the crash suite.
        """
        data = self.to_bytes(master_key)
        fd, tmp = tempfile.mkstemp(prefix=".keyring.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if before_rename is not None:
                before_rename()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # A process killed between mkstemp and rename leaves a temp keyring behind: it holds
        # key material the new keyring may just have shredded, so it must not outlive it.
        for stale in path.parent.glob(".keyring.*"):
            stale.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path, master_key: SecretKey) -> Keyring:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(f"keyring {path} is missing") from None
        return cls.from_bytes(data, master_key)


def _key(value: object) -> bytes:
    """A 32-byte key, ref or digest as stored: anything else means a corrupt keyring."""
    if not isinstance(value, bytes) or len(value) != sealing.KEY_SIZE:
        raise ValueError("not a 32-byte value")
    return value


def _keys(value: object) -> dict[bytes, bytes]:
    """The subject-key map: ``_key`` for every key and value, in C-level passes (a store
    of 100k subjects opens this map on every open)."""
    if not isinstance(value, dict):
        raise ValueError("not a map")
    for column in (value.keys(), value.values()):
        if not set(map(type, column)) <= {bytes} or not set(map(len, column)) <= {sealing.KEY_SIZE}:
            raise ValueError("not a 32-byte value")
    return dict(value)


def _int(value: object) -> int:
    if type(value) is not int:
        raise ValueError("not an int")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError("not a bool")
    return value
