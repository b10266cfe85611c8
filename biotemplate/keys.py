"""Key providers: where the master key (the KEK) comes from.

The master key never lives in the store folder. A provider hands it over when a store is
created or opened; the store keeps it only to rewrap its key state (``keyring.py``).
Key material travels in :class:`SecretKey`, which never shows in a repr, a log or a pickle.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import NoReturn, Protocol

import msgpack

from . import _files, sealing
from .errors import InvalidInput, KeyFileExists, KeyUnavailable


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
    """Anything that can hand over the 32-byte master key (file, passphrase, env, HSM)."""

    def master_key(self) -> SecretKey: ...


class _NoPickle:
    def __reduce__(self) -> NoReturn:
        raise TypeError("key providers cannot be pickled")


def read_private(path: Path, what: str) -> bytes:
    """The bytes of a secret file (key, PIN) that only its owner may read.

    Raises:
        KeyUnavailable: missing file, or readable/writable by group or others.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyUnavailable(f"{what} {path} does not exist") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyUnavailable(f"{what} {path} is accessible to group/others "
                             f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
    return path.read_bytes()


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
            _files.write_exclusive(target, sealing.random_key().hex().encode() + b"\n")
        except FileExistsError:
            raise KeyFileExists(f"{target} exists; refusing to overwrite a key file") from None
        return cls(target)

    def master_key(self) -> SecretKey:
        """Raises:
        KeyUnavailable: missing file, unsafe mode (readable by group/others), bad content.
        """
        return _parse_key_text(read_private(self.path, "key file"), f"key file {self.path}")


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
                 ops_limit: int = sealing.ARGON2_OPS, mem_limit: int = sealing.ARGON2_MEM,
                 ) -> None:
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
            data = {"v": 1, "salt": sealing.random_id(sealing.ARGON2_SALT_SIZE),
                    "ops": self._ops, "mem": self._mem}
            _files.write_exclusive(self.salt_file, msgpack.packb(data, use_bin_type=True))
        try:
            data = msgpack.unpackb(self.salt_file.read_bytes(), raw=False)
            return bytes(data["salt"]), int(data["ops"]), int(data["mem"])
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                msgpack.ExtraData):
            raise KeyUnavailable(f"salt file {self.salt_file} is corrupt") from None

    def master_key(self) -> SecretKey:
        salt, ops, mem = self._salt_and_costs()
        return SecretKey(sealing.passphrase_key(self._passphrase, salt, ops, mem))
