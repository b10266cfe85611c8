"""biotemplate: a privacy-preserving store for biometric (face) templates.

Templates are encrypted at rest, every record carries purposes and an expiry, searches are
open-set and purpose-bound, and every call is written to a signed, hash-chained audit trail.
See the README for a quickstart, SECURITY.md for the threat model and docs/architecture.md
for how the parts fit together.
"""

from .audit import AuditEntry, AuditReport, AuditView, Checkpoint, checkpoint_audit, verify_audit
from .audit_export import AuditRecord, export_audit
from .calibration import CalibrationReport
from .errors import (
    AuditError,
    BiotemplateError,
    IntegrityError,
    InvalidInput,
    InvalidPolicy,
    InvalidTemplate,
    KeyFileExists,
    KeyUnavailable,
    PolicyViolation,
    ReadOnlyStore,
    RecordNotFound,
    StorageError,
    StoreExists,
    StoreLocked,
    StoreNotFound,
)
from .hsm import Pkcs11KeyProvider
from .index import IndexParams
from .keys import EnvKeyProvider, FileKeyProvider, KeyProvider, PassphraseKeyProvider
from .merge import merge_results
from .policy import Purpose, RetentionPolicy
from .results import (
    BackupReceipt,
    Candidate,
    Confirmation,
    DeleteReceipt,
    ErasureReceipt,
    HoldReceipt,
    IndexReport,
    KeyReceipt,
    PolicyDiff,
    PolicyReceipt,
    PurgeReport,
    PurposeChange,
    PurposeRetention,
    RecordView,
    RetentionReport,
    RotationReceipt,
    SearchResult,
    StoreStats,
    Verification,
)
from .store import TemplateStore
from .tuning import IndexHealth, TuneReport

__version__ = "0.1.0"

__all__ = [
    "AuditEntry",
    "AuditError",
    "AuditRecord",
    "AuditReport",
    "AuditView",
    "BackupReceipt",
    "BiotemplateError",
    "CalibrationReport",
    "Candidate",
    "Checkpoint",
    "Confirmation",
    "DeleteReceipt",
    "EnvKeyProvider",
    "ErasureReceipt",
    "FileKeyProvider",
    "HoldReceipt",
    "IndexHealth",
    "IndexParams",
    "IndexReport",
    "IntegrityError",
    "InvalidInput",
    "InvalidPolicy",
    "InvalidTemplate",
    "KeyFileExists",
    "KeyProvider",
    "KeyReceipt",
    "KeyUnavailable",
    "PassphraseKeyProvider",
    "Pkcs11KeyProvider",
    "PolicyDiff",
    "PolicyReceipt",
    "PolicyViolation",
    "PurgeReport",
    "Purpose",
    "PurposeChange",
    "PurposeRetention",
    "ReadOnlyStore",
    "RecordNotFound",
    "RecordView",
    "RetentionPolicy",
    "RetentionReport",
    "RotationReceipt",
    "SearchResult",
    "StorageError",
    "StoreExists",
    "StoreLocked",
    "StoreNotFound",
    "StoreStats",
    "TemplateStore",
    "TuneReport",
    "Verification",
    "__version__",
    "checkpoint_audit",
    "export_audit",
    "merge_results",
    "verify_audit",
]
