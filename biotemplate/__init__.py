"""biotemplate: a privacy-preserving store for biometric (face) templates.

Templates are encrypted at rest, every record carries purposes and an expiry, searches are
open-set and purpose-bound, and every call is written to a signed, hash-chained audit trail.
See the README for a quickstart and SECURITY.md for the threat model.
"""

from .audit import AuditEntry, AuditReport, Checkpoint
from .errors import (
    AuditError,
    BiotemplateError,
    IntegrityError,
    InvalidInput,
    InvalidPolicy,
    InvalidTemplate,
    InvalidTemplateError,
    KeyFileExists,
    KeyUnavailable,
    KeyUnavailableError,
    PolicyViolation,
    PolicyViolationError,
    RecordNotFound,
    RecordNotFoundError,
    StorageError,
    StoreExists,
    StoreExistsError,
    StoreNotFound,
    StoreNotFoundError,
)
from .index import IndexParams
from .keys import EnvKeyProvider, FileKeyProvider, KeyProvider, PassphraseKeyProvider
from .policy import Purpose, RetentionPolicy
from .records import RecordView
from .results import (
    Candidate,
    Confirmation,
    ErasureReceipt,
    PurgeReport,
    SearchResult,
    Verification,
)
from .store import TemplateStore

__version__ = "0.1.0"

__all__ = [
    "AuditEntry",
    "AuditError",
    "AuditReport",
    "BiotemplateError",
    "Candidate",
    "Checkpoint",
    "Confirmation",
    "EnvKeyProvider",
    "ErasureReceipt",
    "FileKeyProvider",
    "IndexParams",
    "IntegrityError",
    "InvalidInput",
    "InvalidPolicy",
    "InvalidTemplate",
    "InvalidTemplateError",
    "KeyFileExists",
    "KeyProvider",
    "KeyUnavailable",
    "KeyUnavailableError",
    "PassphraseKeyProvider",
    "PolicyViolation",
    "PolicyViolationError",
    "PurgeReport",
    "Purpose",
    "RecordNotFound",
    "RecordNotFoundError",
    "RecordView",
    "RetentionPolicy",
    "SearchResult",
    "StorageError",
    "StoreExists",
    "StoreExistsError",
    "StoreNotFound",
    "StoreNotFoundError",
    "TemplateStore",
    "Verification",
    "__version__",
]
