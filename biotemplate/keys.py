"""Key providers: where the master key (the KEK) comes from.

The master key never lives in the store folder. A provider hands it over when a store is
created or opened; the store keeps it only to rewrap its key state (``keyring.py``).
Key material travels in :class:`SecretKey`, which never shows in a repr, a log or a pickle.

A raw master key is accepted in one typed text format only, ``biotemplate-key-v1:`` followed
by the standard base64 of the 32 key bytes (:func:`key_text` writes it). A bare 32-character
string, 64 hex digits or untagged base64 is refused: such a value is as likely to be a
passphrase put in a key variable by mistake as a key, and a passphrase taken as raw key
bytes has the strength of the passphrase, not of a key. To convert a hex key::

    from biotemplate.keys import key_text
    print(key_text(bytes.fromhex(old_hex)))

Rules a provider enforces on where its material lives (:func:`check_key_location`, called
by ``TemplateStore.create`` and ``open``): never inside the store folder, and a key file is
never reached through a symbolic link.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import threading
from pathlib import Path
from typing import NoReturn, Protocol

import msgpack

from . import _files, sealing
from .errors import InvalidInput, KeyFileExists, KeyUnavailable

KEY_PREFIX = "biotemplate-key-v1:"
"""The tag of a raw master key in text form: ``biotemplate-key-v1:<base64 of 32 bytes>``."""

ARGON2_MIN_OPS = 3
ARGON2_MIN_MEM = 64 * 1024 * 1024
"""The Argon2id cost floor: RFC 9106 §4's second recommended option, t=3 passes and 64 MiB
(libsodium's opslimit is t, its memlimit is in bytes; it runs one lane). Lower costs are
refused, for new salt files and in existing ones, so that a tampered salt file cannot lower
the guessing cost."""
ARGON2_MAX_OPS = 64
ARGON2_MAX_MEM = 4 * 1024**3  # nor make an open exhaust memory

_MAX_KEY_FILE = 4096  # a key file is one line; a larger one is not a key file


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
    """The bytes of a small secret file (key, PIN) that only its owner may read: a
    regular file, not a symbolic link, mode 0600 or stricter, at most 4 KiB.

    Raises:
        KeyUnavailable: missing, a link, not a regular file, readable or writable by
            group or others, or too large.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        if path.is_symlink():  # O_NOFOLLOW closes the race; this names the rule
            raise KeyUnavailable(f"{what} {path} is a symbolic link; point the provider "
                                 "at the file itself")
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyUnavailable(f"{what} {path} does not exist") from None
    except OSError:  # ELOOP: a link swapped in after the check; EACCES, ...
        raise KeyUnavailable(f"{what} {path} cannot be opened (a symbolic link, "
                             "or no permission)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyUnavailable(f"{what} {path} is not a regular file")
        if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyUnavailable(f"{what} {path} is accessible to group/others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it")
        data = b""
        while len(data) <= _MAX_KEY_FILE and (chunk := os.read(fd, _MAX_KEY_FILE + 1)):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise KeyUnavailable(f"{what} {path} is too large to be a {what}")
    return data


def key_text(key: bytes) -> str:
    """The text form of a raw 32-byte master key: ``biotemplate-key-v1:<base64>``.

    Raises:
        KeyUnavailable: ``key`` is not 32 bytes.
    """
    raw = SecretKey(key).reveal()
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def _parse_key_text(data: bytes, where: str) -> SecretKey:
    """Accept only ``biotemplate-key-v1:<standard base64 of 32 bytes>`` (surrounding
    whitespace ignored). The message never quotes the content: it may be a secret."""
    text = data.strip()
    prefix = KEY_PREFIX.encode("ascii")
    if text.startswith(prefix):
        try:
            raw = base64.b64decode(text[len(prefix):], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == sealing.KEY_SIZE:
            return SecretKey(raw)
    raise KeyUnavailable(
        f"{where} does not hold a key in the format '{KEY_PREFIX}<base64 of 32 bytes>' "
        "(bare raw, hex or base64 keys are refused: they look like passphrases). Convert "
        f"one by prefixing '{KEY_PREFIX}' to the base64 of its 32 bytes, e.g. "
        "biotemplate.keys.key_text(bytes.fromhex(hex_key))")


def check_key_location(provider: object, store_folder: str | os.PathLike[str]) -> None:
    """Refuse key material that lives where the store's own files are.

    Applies to providers with a ``path`` (a key file) or a ``salt_file`` (a passphrase's
    salt and costs, which let whoever holds the store guess the passphrase offline); any
    other provider (environment, KMS) passes. The rules: the file is not inside
    ``store_folder`` (before or after resolving symbolic links), and a key file is not a
    symbolic link (``FileKeyProvider.master_key`` refuses one too).

    Raises:
        KeyUnavailable: a rule is broken; the message names the rule and the path.
    """
    folder = Path(store_folder)
    for attribute in ("path", "salt_file"):
        value = getattr(provider, attribute, None)
        if not isinstance(value, str | os.PathLike):
            continue
        where = Path(value)
        what = "key file" if attribute == "path" else "salt file"
        if attribute == "path" and where.is_symlink():
            raise KeyUnavailable(f"{what} {where} is a symbolic link; point the provider at "
                                 "the file itself")
        inside = (Path(os.path.abspath(where)).is_relative_to(os.path.abspath(folder))
                  or Path(os.path.realpath(where)).is_relative_to(os.path.realpath(folder)))
        if inside:
            raise KeyUnavailable(f"{what} {where} is inside the store folder {folder}; keep "
                                 "key material off the store's folder (ideally its disk)")


class FileKeyProvider(_NoPickle):
    """The master key in a file of mode 0600, ideally on another medium than the store.

    The file holds one line, ``biotemplate-key-v1:<base64 of 32 bytes>`` (what
    :meth:`generate` writes). It is refused if it is a symbolic link, not a regular file,
    readable by group or others, or in another format.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileKeyProvider({str(self.path)!r})"

    @classmethod
    def generate(cls, path: str | os.PathLike[str]) -> FileKeyProvider:
        """Write a new random key to ``path`` with mode 0600; never overwrite.

        Raises:
            KeyFileExists: ``path`` already exists (overwriting would orphan a store).
        """
        target = Path(path)
        try:
            _files.write_exclusive(target, (key_text(sealing.random_key()) + "\n").encode())
        except FileExistsError:
            raise KeyFileExists(f"{target} exists; refusing to overwrite a key file") from None
        return cls(target)

    def master_key(self) -> SecretKey:
        """Raises:
        KeyUnavailable: missing file, symbolic link, not a regular file, unsafe mode
            (accessible to group/others), bad content.
        """
        return _parse_key_text(read_private(self.path, "key file"), f"key file {self.path}")


class EnvKeyProvider(_NoPickle):
    """The master key from an environment variable, e.g. set by a secrets manager.

    The value must be ``biotemplate-key-v1:<base64 of 32 bytes>`` (:func:`key_text`).
    The first call of :meth:`master_key` reads the variable and **removes it from
    ``os.environ``** (so child processes started later do not inherit it), then keeps the
    key in this provider object for later calls: reuse the same provider to reopen a store,
    and make a new one (after setting the variable again) to read a new value. The
    variable is removed even when its value is refused. Limit: the environment block the
    process was started with (``/proc/<pid>/environ`` on Linux, readable by the same user)
    still holds a value that was set before the process started.
    """

    def __init__(self, variable: str = "BIOTEMPLATE_MASTER_KEY") -> None:
        self.variable = variable
        self._key: SecretKey | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EnvKeyProvider({self.variable!r})"

    def master_key(self) -> SecretKey:
        """Raises:
        KeyUnavailable: the variable is not set (and no key was read before), or its
            value is not in the ``biotemplate-key-v1:`` format.
        """
        with self._lock:
            if self._key is None:
                value = os.environ.pop(self.variable, None)
                if not value:
                    raise KeyUnavailable(f"environment variable {self.variable} is not set")
                self._key = _parse_key_text(
                    value.encode("utf-8", "surrogateescape"),
                    f"environment variable {self.variable} (now removed from the "
                    "environment)")
            return self._key


class PassphraseKeyProvider(_NoPickle):
    """The master key derived from a passphrase with Argon2id.

    The salt file (created on first use, mode 0600) keeps the salt and the cost parameters,
    so a later open derives the same key even if the defaults change. Costs below the floor
    of RFC 9106 (t=3 passes, 64 MiB: :data:`ARGON2_MIN_OPS`, :data:`ARGON2_MIN_MEM`) are
    refused, both as arguments and when read from an existing salt file. Keep the salt file
    outside the store folder (``TemplateStore.create`` and ``open`` refuse it there).

    Raises:
        InvalidInput: an empty passphrase, or costs below the floor (or absurdly high).
    """

    def __init__(self, passphrase: str | bytes, *, salt_file: str | os.PathLike[str],
                 ops_limit: int = sealing.ARGON2_OPS, mem_limit: int = sealing.ARGON2_MEM,
                 ) -> None:
        self.salt_file = Path(salt_file)
        try:
            secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        except UnicodeEncodeError:
            secret = b""
        if not isinstance(secret, bytes) or not secret:
            raise InvalidInput("the passphrase must be a non-empty str (valid Unicode) or bytes")
        problem = _cost_problem(ops_limit, mem_limit)
        if problem:
            raise InvalidInput(f"Argon2id {problem}")
        self._passphrase = secret
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
            salt, ops, mem = data["salt"], data["ops"], data["mem"]
        except OSError:
            raise KeyUnavailable(f"salt file {self.salt_file} cannot be read") from None
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                msgpack.ExtraData):
            raise KeyUnavailable(f"salt file {self.salt_file} is corrupt") from None
        if not isinstance(salt, bytes) or len(salt) != sealing.ARGON2_SALT_SIZE:
            raise KeyUnavailable(f"salt file {self.salt_file} is corrupt")
        problem = _cost_problem(ops, mem)
        if problem:
            raise KeyUnavailable(f"salt file {self.salt_file} asks for Argon2id {problem}; "
                                 "refused (a tampered salt file must not lower the cost)")
        return salt, ops, mem

    def master_key(self) -> SecretKey:
        """Raises:
        KeyUnavailable: the salt file is corrupt or its costs are below the floor.
        """
        salt, ops, mem = self._salt_and_costs()
        return SecretKey(sealing.passphrase_key(self._passphrase, salt, ops, mem))


def _cost_problem(ops: object, mem: object) -> str | None:
    """What is wrong with Argon2id costs (None when they are within bounds)."""
    for value, low, high, name in ((ops, ARGON2_MIN_OPS, ARGON2_MAX_OPS, "ops_limit"),
                                   (mem, ARGON2_MIN_MEM, ARGON2_MAX_MEM, "mem_limit")):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an int"
        if value < low:
            return (f"{name} below the floor of RFC 9106 (at least t={ARGON2_MIN_OPS} passes "
                    f"and {ARGON2_MIN_MEM // 2**20} MiB)")
        if value > high:
            return f"{name} above {high}"
    return None
