"""The exception hierarchy of biotemplate.

Every error the library raises on purpose is a :class:`BiotemplateError`, so a caller can
catch one class at its boundary. Lower-layer exceptions (``sqlite3``, ``hnswlib``'s bare
``RuntimeError``, ``nacl``/``cryptography`` failures, ``msgpack`` decode errors) are
translated where they occur and never leak.

::

    BiotemplateError
    ├── InvalidInput (ValueError)          bad argument: type, range, shape
    │   └── InvalidTemplate                wrong dim, NaN/inf, zero norm, 2-D where 1-D expected
    ├── InvalidPolicy (ValueError)         the policy file/dict itself is malformed
    ├── PolicyViolation                    a well-formed call the policy forbids
    ├── IntegrityError                     tampered or corrupt data (no detail on purpose)
    ├── RecordNotFound (LookupError)       no live record for that id / subject / purpose
    ├── KeyUnavailable                     wrong master key, missing or unsafe key material
    ├── KeyFileExists (FileExistsError)    refusing to overwrite an existing key file
    ├── StoreExists (FileExistsError)      ``create`` on a folder that already holds a store
    ├── StoreNotFound (FileNotFoundError)  ``open`` on a folder that holds no store
    ├── StoreLocked                        another handle has the store open for writing
    ├── ReadOnlyStore                      a read-only handle refuses the call
    ├── StorageError (OSError)             the database could not be read or written
    └── AuditError                         the audit trail cannot be written or read

Integrity failures deliberately carry no detail (which byte, which field) that would help
an attacker iterate; the record id is the most they name.
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "BiotemplateError",
    "IntegrityError",
    "InvalidInput",
    "InvalidPolicy",
    "InvalidTemplate",
    "KeyFileExists",
    "KeyUnavailable",
    "PolicyViolation",
    "ReadOnlyStore",
    "RecordNotFound",
    "StorageError",
    "StoreExists",
    "StoreLocked",
    "StoreNotFound",
]


class BiotemplateError(Exception):
    """Base class of every error biotemplate raises on purpose."""


class InvalidInput(BiotemplateError, ValueError):
    """An argument has the wrong type or is out of range; nothing was written."""


class InvalidTemplate(InvalidInput):
    """A template is not a finite, non-zero, 1-D vector of the store's dimension."""


class InvalidPolicy(BiotemplateError, ValueError):
    """A retention policy is malformed; the message names the offending field."""


class PolicyViolation(BiotemplateError):
    """The call is well formed but the retention policy forbids it; nothing was written."""


class IntegrityError(BiotemplateError):
    """Stored data failed authentication: it was tampered with, corrupted or replayed."""


class RecordNotFound(BiotemplateError, LookupError):
    """No live record matches (unknown id, subject without a record for the purpose)."""


class KeyUnavailable(BiotemplateError):
    """The master key is wrong or missing, or the needed key material was destroyed."""


class KeyFileExists(BiotemplateError, FileExistsError):
    """Refusing to overwrite an existing key file (that would orphan a store)."""


class StoreExists(BiotemplateError, FileExistsError):
    """``TemplateStore.create`` was pointed at a folder that already holds a store."""


class StoreNotFound(BiotemplateError, FileNotFoundError):
    """``TemplateStore.open`` was pointed at a folder that holds no store."""


class StoreLocked(BiotemplateError):
    """Another handle (in this process or another) has the store open for writing: a
    SQLite store folder has one writer. The message names the holder (pid, host, since)."""


class ReadOnlyStore(BiotemplateError):
    """The store was opened with ``read_only=True``: it offers ``stats()`` and the audit
    trail (verify, checkpoint, get), and refuses every call that writes or reads templates
    or subject ids. Nothing was written (not even an audit entry)."""


class StorageError(BiotemplateError, OSError):
    """The records database could not be read or written (disk full, locked, I/O)."""


class AuditError(BiotemplateError):
    """The audit trail could not be written (the call failed closed) or read."""
