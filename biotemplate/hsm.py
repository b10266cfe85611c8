"""An HSM-held master key: envelope encryption under a key that never leaves a PKCS#11 token.

Why: a key file, an environment variable or a passphrase can be copied; an AES key that a
hardware security module generated with ``CKA_EXTRACTABLE`` false cannot. That is how
banks and border agencies hold keys. The store still needs its 32-byte master key in
memory (it derives every key from it and reseals its keyring with it), so the token holds
a key-encryption key, the *token key*, and the master key (a data key) is kept on disk
encrypted by the token under it:

    create_token_key  the token generates an AES-256 key: CKA_TOKEN, CKA_PRIVATE,
                      CKA_SENSITIVE, not CKA_EXTRACTABLE, ENCRYPT/DECRYPT only, and
                      CKA_ALLOWED_MECHANISMS = [CKM_AES_GCM]
    generate          a random master key (``sealing.random_key``) is encrypted *by the
                      token* and written to ``wrapped_key_file`` (0600, never overwritten)
    master_key()      reads that file; the token decrypts it; the store gets a SecretKey

The token key never leaves the token. The master key is in clear only in this process's
memory: from ``master_key()`` (called by ``TemplateStore.create``/``open``) for as long as
that store object lives. Whoever runs code in the process, or reads its memory, gets it
(SECURITY.md, "HSM-held master key").

Mechanism: CKM_AES_GCM, always named explicitly (python-pkcs11 picks a default mechanism
when none is given: AES-CBC-PAD for encryption, unauthenticated). GCM gives a 128-bit tag
and associated data that binds the purpose and the file header, and the master key never
becomes a token object. CKM_AES_KEY_WRAP_PAD would have no associated data, and would need
the master key as an extractable token object to wrap it and as a non-sensitive one to
read it back after unwrapping. The 96-bit IV is random; one encryption per file.

Wrapped key file (version 1)::

    "BTHK" | version (1 byte, 0x01) | n (1 byte) | key label (n bytes, UTF-8)
           | IV (12) | ciphertext (32) | GCM tag (16)

    associated data = b"biotemplate/hsm/v1" | every byte before the IV

The clear key label names the token key the file needs, so a provider pointed at another
key says so instead of trial-decrypting. The associated data binds it with the version.

Order on open: length, magic and version, key label, token decryption, key length. Every
failure is a ``KeyUnavailable`` naming the library, token, key label or file, never the PIN
or key bytes; python-pkcs11's exceptions are translated here and none leak.
python-pkcs11 is imported lazily, so ``import biotemplate`` works without the ``hsm`` extra.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import _files, sealing
from .errors import InvalidInput, KeyFileExists, KeyUnavailable
from .keys import SecretKey, _NoPickle, read_private
from .validation import check_text

if TYPE_CHECKING:
    import pkcs11
    from pkcs11.attributes import AttributeMapper

__all__ = ["Pkcs11KeyProvider"]

MAGIC = b"BTHK"
VERSION = 1
IV_SIZE = 12
TAG_SIZE = 16
PURPOSE = b"biotemplate/hsm/v1"
INSTALL = "pip install 'biotemplate[hsm]'"
_LENGTH = struct.Struct(">B")
_ULONG = struct.Struct("L")  # CK_ULONG in the platform's own size (CK_MECHANISM_TYPE[])

# PKCS#11 login state belongs to the application, not the session: a second login to the
# same token while a session is open fails (CKR_USER_ALREADY_LOGGED_IN). Sessions of this
# module are short (one decryption) and taken one at a time.
_TOKEN_LOCK = threading.Lock()

# python-pkcs11 exception (by class name, stable across versions) -> what the operator reads.
_MESSAGES = {
    "PinIncorrect": "token {token!r} refused the PIN",
    "PinInvalid": "token {token!r} refused the PIN",
    "PinLenRange": "token {token!r} refused the PIN",
    "PinLocked": "the user PIN of token {token!r} is locked",
    "PinExpired": "the user PIN of token {token!r} has expired",
    "UserPinNotInitialized": "token {token!r} has no user PIN yet",
    "NoSuchToken": "no PKCS#11 token labelled {token!r} in {library}",
    "MultipleTokensReturned": "several PKCS#11 tokens are labelled {token!r}",
    "TokenNotPresent": "token {token!r} is not present",
    "DeviceRemoved": "token {token!r} was removed",
    "NoSuchKey": "token {token!r} holds no AES key labelled {key!r} "
                 "(Pkcs11KeyProvider.create_token_key makes one)",
    "MultipleObjectsReturned": "token {token!r} holds several keys labelled {key!r}",
    "UserAlreadyLoggedIn": "another session of this process is logged in to token {token!r}",
    "MechanismInvalid": "token {token!r} does not offer CKM_AES_GCM with key {key!r}",
    "AttributeTypeInvalid": "token {token!r} refused the template of key {key!r} (it needs "
                            "CKA_ALLOWED_MECHANISMS, PKCS#11 v2.40)",
    "AttributeValueInvalid": "token {token!r} refused the template of key {key!r}",
    "MechanismParamInvalid": "token {token!r} refuses CKM_AES_GCM with a caller-chosen IV",
}
# What a token reports when a GCM tag does not verify (SoftHSM2 2.6: CKR_GENERAL_ERROR, so
# a device fault during that one call reads as "does not open" too).
_NOT_OPENED = {"EncryptedDataInvalid", "EncryptedDataLenRange", "GeneralError",
               "FunctionFailed", "DataInvalid", "DataLenRange"}


def _require_pkcs11() -> None:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise KeyUnavailable(f"Pkcs11KeyProvider needs python-pkcs11: {INSTALL}") from None


def _check_key_label(label: str) -> None:
    check_text(label, "key_label", limit=64)
    if len(label.encode("utf-8")) > 255:  # its length is one byte of the file header
        raise InvalidInput("key_label is longer than 255 bytes in UTF-8")


def _allowed_mechanisms_mapper() -> AttributeMapper:
    """python-pkcs11 cannot encode CKA_ALLOWED_MECHANISMS by itself (an array of CK_ULONG)."""
    from pkcs11 import Attribute, Mechanism
    from pkcs11.attributes import AttributeMapper

    mapper = AttributeMapper()
    mapper.register_handler(
        Attribute.ALLOWED_MECHANISMS,
        lambda mechs: b"".join(_ULONG.pack(int(m)) for m in mechs),
        lambda raw: [Mechanism(v) for (v,) in _ULONG.iter_unpack(raw)])
    return mapper


class _Token(_NoPickle):
    """A PKCS#11 token reached through a library and logged in with the user PIN."""

    def __init__(self, library: str | os.PathLike[str], token_label: str, pin: str | None,
                 pin_file: str | os.PathLike[str] | None) -> None:
        if not isinstance(library, str | os.PathLike):
            raise InvalidInput("library must be the path of a PKCS#11 module (.so)")
        check_text(token_label, "token_label", limit=32)
        if (pin is None) == (pin_file is None):
            raise InvalidInput("give exactly one of pin and pin_file")
        if pin is not None:
            check_text(pin, "pin", limit=255)
        self.library = os.fspath(library)
        self.label = token_label
        self._pin = pin
        self._pin_file = None if pin_file is None else Path(pin_file)

    def __repr__(self) -> str:
        return f"_Token({self.library!r}, token_label={self.label!r}, pin=<redacted>)"

    def _read_pin(self) -> str:
        if self._pin is not None:
            return self._pin
        assert self._pin_file is not None
        try:
            pin = read_private(self._pin_file, "PIN file").decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise KeyUnavailable(f"PIN file {self._pin_file} is not UTF-8 text") from None
        if not pin:
            raise KeyUnavailable(f"PIN file {self._pin_file} is empty")
        return pin

    def failure(self, exc: Exception, key_label: str) -> KeyUnavailable:
        """The KeyUnavailable that stands for a python-pkcs11 exception (never chained)."""
        for cls in type(exc).__mro__:
            if cls.__name__ in _MESSAGES:
                return KeyUnavailable(_MESSAGES[cls.__name__].format(
                    token=self.label, key=key_label, library=self.library))
        return KeyUnavailable(f"PKCS#11 token {self.label!r} failed ({type(exc).__name__})")

    @contextlib.contextmanager
    def session(self, key_label: str, *, rw: bool = False,
                mapper: AttributeMapper | None = None) -> Iterator[pkcs11.Session]:
        """A logged-in session; every python-pkcs11 error inside becomes KeyUnavailable."""
        import pkcs11

        pin = self._read_pin()
        with _TOKEN_LOCK:
            try:
                lib = pkcs11.lib(self.library)
            except (RuntimeError, OSError):  # PKCS11Error is a RuntimeError
                raise KeyUnavailable(
                    f"cannot load the PKCS#11 library {self.library}") from None
            try:
                token = lib.get_token(token_label=self.label)
                with token.open(rw=rw, user_pin=pin, attribute_mapper=mapper) as session:
                    yield session
            except pkcs11.PKCS11Error as exc:
                raise self.failure(exc, key_label) from None


class Pkcs11KeyProvider(_NoPickle):
    """The master key, wrapped by an AES-256 key that never leaves a PKCS#11 token.

    The token (an HSM, a smart card, SoftHSM2 in tests) encrypts and decrypts the store's
    master key with CKM_AES_GCM under the key labelled ``key_label``; only the encrypted
    master key is on disk (``wrapped_key_file``). The decrypted master key lives in this
    process's memory from ``master_key()`` for as long as the store that asked for it.

    Set up once, then hand the provider to ``TemplateStore.create``/``open``::

        Pkcs11KeyProvider.create_token_key(lib, token_label="T", pin=pin, key_label="kek")
        keys = Pkcs11KeyProvider.generate(lib, token_label="T", pin=pin, key_label="kek",
                                          wrapped_key_file="/etc/biotemplate/master.wrapped")

    Args:
        library: path of the token's PKCS#11 module (e.g. ``libsofthsm2.so``).
        token_label: the token's label.
        pin: the user PIN; or ``pin_file``, a file of mode 0600 holding it (read on use).
        key_label: label of the token key (CKA_LABEL).
        wrapped_key_file: where the encrypted master key is kept.

    Raises:
        KeyUnavailable: python-pkcs11 is not installed (``pip install 'biotemplate[hsm]'``).
        InvalidInput: malformed arguments, or both or neither of ``pin`` and ``pin_file``.
    """

    def __init__(self, library: str | os.PathLike[str], *, token_label: str, key_label: str,
                 wrapped_key_file: str | os.PathLike[str], pin: str | None = None,
                 pin_file: str | os.PathLike[str] | None = None) -> None:
        _require_pkcs11()
        _check_key_label(key_label)
        self._token = _Token(library, token_label, pin, pin_file)
        self.key_label = key_label
        self.wrapped_key_file = Path(wrapped_key_file)

    def __repr__(self) -> str:
        return (f"Pkcs11KeyProvider({self._token.library!r}, token_label={self._token.label!r},"
                f" key_label={self.key_label!r}, wrapped_key_file="
                f"{str(self.wrapped_key_file)!r}, pin=<redacted>)")

    # --- set-up -------------------------------------------------------------------------

    @classmethod
    def create_token_key(cls, library: str | os.PathLike[str], *, token_label: str,
                         key_label: str, pin: str | None = None,
                         pin_file: str | os.PathLike[str] | None = None) -> bool:
        """Have the token generate its AES-256 key-encryption key, unless it holds one.

        The key is a token object that is private, sensitive, not extractable, can only
        encrypt and decrypt, and only with CKM_AES_GCM. Two processes creating the same
        label at once can leave two keys; ``master_key`` then refuses both (make the key
        once, at set-up).

        Returns:
            True if a key was generated, False if a suitable one was already there.

        Raises:
            KeyUnavailable: token, PIN or library problem, or a key of that label exists
                that could leave the token or is not AES-256.
        """
        _require_pkcs11()
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

        _check_key_label(key_label)
        token = _Token(library, token_label, pin, pin_file)
        with token.session(key_label, rw=True, mapper=_allowed_mechanisms_mapper()) as s:
            try:
                _check_token_key(s.get_key(object_class=ObjectClass.SECRET_KEY,
                                           key_type=KeyType.AES, label=key_label), key_label)
                return False
            except pkcs11.NoSuchKey:
                pass
            s.generate_key(
                KeyType.AES, 256, label=key_label, store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                          Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_GCM]})
        return True

    @classmethod
    def generate(cls, library: str | os.PathLike[str], *, token_label: str, key_label: str,
                 wrapped_key_file: str | os.PathLike[str], pin: str | None = None,
                 pin_file: str | os.PathLike[str] | None = None) -> Pkcs11KeyProvider:
        """Make a random master key, have the token encrypt it, write ``wrapped_key_file``.

        The file is created with mode 0600 and never overwritten (that would orphan the
        stores sealed under the old key). The token decrypts it once before it is written,
        so a token that cannot read back what it wrote fails here, before any store
        depends on the file.

        Raises:
            KeyFileExists: ``wrapped_key_file`` already exists.
            KeyUnavailable: token, PIN, library or token-key problem.
        """
        provider = cls(library, token_label=token_label, key_label=key_label,
                       wrapped_key_file=wrapped_key_file, pin=pin, pin_file=pin_file)
        target = provider.wrapped_key_file
        if target.exists():
            raise KeyFileExists(f"{target} exists; refusing to overwrite a wrapped key file")
        data_key = sealing.random_key()
        blob = provider._wrap(data_key)
        if provider._unwrap(blob) != data_key:
            raise KeyUnavailable(f"token {token_label!r} did not decrypt what it encrypted")
        try:
            _files.write_exclusive(target, blob)
        except FileExistsError:
            raise KeyFileExists(
                f"{target} exists; refusing to overwrite a wrapped key file") from None
        return provider

    # --- the KeyProvider contract -------------------------------------------------------

    def master_key(self) -> SecretKey:
        """Read the wrapped key file and have the token decrypt the master key.

        Raises:
            KeyUnavailable: missing or altered file, a file made under another token key,
                wrong PIN, missing token or key, unloadable library.
        """
        try:
            blob = self.wrapped_key_file.read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(
                f"wrapped key file {self.wrapped_key_file} does not exist") from None
        except OSError:
            raise KeyUnavailable(
                f"wrapped key file {self.wrapped_key_file} cannot be read") from None
        return SecretKey(self._unwrap(blob))

    # --- the envelope -------------------------------------------------------------------

    def _header(self) -> bytes:
        label = self.key_label.encode("utf-8")
        return MAGIC + _LENGTH.pack(VERSION) + _LENGTH.pack(len(label)) + label

    def _wrap(self, data_key: bytes) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        from pkcs11.types import EncryptMixin

        header, iv = self._header(), sealing.random_id(IV_SIZE)
        params = GCMParams(iv, PURPOSE + header, TAG_SIZE * 8)
        with self._token.session(self.key_label) as session:
            key = self._token_key(session)
            assert isinstance(key, EncryptMixin)  # checked by _check_token_key
            sealed = key.encrypt(data_key, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        if not isinstance(sealed, bytes) or len(sealed) != sealing.KEY_SIZE + TAG_SIZE:
            raise KeyUnavailable(f"token {self._token.label!r} returned a malformed "
                                 "CKM_AES_GCM ciphertext")
        return header + iv + sealed

    def _unwrap(self, blob: bytes) -> bytes:
        import pkcs11
        from pkcs11 import GCMParams, Mechanism
        from pkcs11.types import DecryptMixin

        where = f"wrapped key file {self.wrapped_key_file}"
        head = len(MAGIC) + 2
        if len(blob) < head or blob[: len(MAGIC)] != MAGIC or blob[len(MAGIC)] != VERSION:
            raise KeyUnavailable(f"{where} is not a biotemplate wrapped key (version 1)")
        end = head + blob[head - 1]
        if len(blob) != end + IV_SIZE + sealing.KEY_SIZE + TAG_SIZE:
            raise KeyUnavailable(f"{where} is truncated or altered")
        if blob[:end] != self._header():
            named = blob[head:end].decode("utf-8", errors="replace")
            raise KeyUnavailable(f"{where} was made under token key {named!r}, not "
                                 f"{self.key_label!r}")
        params = GCMParams(blob[end : end + IV_SIZE], PURPOSE + blob[:end], TAG_SIZE * 8)
        with self._token.session(self.key_label) as session:
            key = self._token_key(session)
            assert isinstance(key, DecryptMixin)  # checked by _check_token_key
            try:
                data_key = key.decrypt(blob[end + IV_SIZE :], mechanism=Mechanism.AES_GCM,
                                       mechanism_param=params)
            except pkcs11.PKCS11Error as exc:
                if type(exc).__name__ in _NOT_OPENED:
                    raise KeyUnavailable(f"token key {self.key_label!r} does not open {where}"
                                         " (another key, or the file was altered)") from None
                raise
        if not isinstance(data_key, bytes) or len(data_key) != sealing.KEY_SIZE:
            raise KeyUnavailable(f"{where} does not hold a {sealing.KEY_SIZE}-byte key")
        return data_key

    def _token_key(self, session: pkcs11.Session) -> pkcs11.Key:
        from pkcs11 import KeyType, ObjectClass

        key = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                              label=self.key_label)
        _check_token_key(key, self.key_label)
        return key


def _check_token_key(key: pkcs11.Key, label: str) -> None:
    """Refuse a token key that could leave the token: the envelope would protect nothing."""
    from pkcs11 import Attribute
    from pkcs11.types import DecryptMixin, EncryptMixin

    if not isinstance(key, EncryptMixin) or not isinstance(key, DecryptMixin):
        raise KeyUnavailable(f"token key {label!r} cannot encrypt and decrypt")
    if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
        raise KeyUnavailable(f"token key {label!r} can leave the token (extractable or not "
                             "sensitive); refusing it as a key-encryption key")
    if key[Attribute.VALUE_LEN] != sealing.KEY_SIZE:
        raise KeyUnavailable(f"token key {label!r} is not an AES-256 key")
