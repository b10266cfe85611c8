"""What the store's calls return. Plain frozen values: Python bools, floats and ints, no
numpy scalars, no templates, no clear subject ids except where the caller supplied them.

Every audited call that changes the store returns a receipt carrying the ``audit_seq`` of
its audit entry (the exception is enrolment, whose receipt is the record ids themselves:
the audit entry lists them). Reprs never print a template or a subject id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class Candidate:
    """One subject proposed by a 1:N search (its best record for the purpose)."""

    record_id: str
    subject_id: str
    score: float
    rank: int
    above_threshold: bool

    def __repr__(self) -> str:  # subject ids stay out of logs that print results
        return (f"Candidate(rank={self.rank}, record_id={self.record_id!r}, "
                f"score={self.score:.4f}, above_threshold={self.above_threshold})")


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The answer to a 1:N search. An empty ``candidates`` list is a normal answer.

    ``decision`` is NIST's decision: True when at least one candidate scored at or above
    the purpose's threshold. ``audit_seq`` names the audit entry, for ``confirm_match``.
    A result merged from partitions (:func:`~biotemplate.merge.merge_results`) lists
    each partition's entry in ``audit_seqs``, and ``audit_seq_of`` names, per candidate,
    the entry of the search that returned it (the one ``confirm_match`` checks).
    """

    candidates: list[Candidate]
    decision: bool
    threshold: float
    mode: str
    purpose: str
    audit_seq: int
    audit_seqs: tuple[int, ...] = ()
    sources: tuple[int, ...] = ()  # per candidate: its partition's audit seq (merged only)

    def audit_seq_of(self, record_id: str) -> int:
        """The audit seq to pass to ``confirm_match`` for one of this result's candidates.

        Raises:
            KeyError: ``record_id`` is not a candidate of this result.
        """
        for i, c in enumerate(self.candidates):
            if c.record_id == record_id:
                return self.sources[i] if self.sources else self.audit_seq
        raise KeyError("not a candidate of this result")


@dataclass(frozen=True, slots=True)
class Verification:
    """The answer to a 1:1 verification against a subject's records for one purpose."""

    match: bool
    score: float
    record_id: str
    threshold: float
    audit_seq: int


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What ``purge_expired`` shredded, and what it kept because of a legal hold."""

    purged: int
    held_retained: int
    epoch_before: int
    epoch_after: int
    subject_keys_destroyed: int
    at: datetime
    audit_seq: int


@dataclass(frozen=True, slots=True)
class ErasureReceipt:
    """Proof of an erasure request handled (GDPR Art. 17), idempotent: 0 records is valid."""

    subject_ref: str
    records_erased: int
    key_destroyed: bool
    at: datetime
    audit_seq: int


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A human reviewer's confirmation of a candidate (EU AI Act Art. 14(5))."""

    search_seq: int
    record_id: str
    reviewers: tuple[str, ...]
    two_person_confirmed: bool
    audit_seq: int


@dataclass(frozen=True, slots=True)
class RecordView:
    """A decrypted record, as returned by ``export_subject`` (access requests, Art. 15)."""

    record_id: str
    subject_id: str
    template: NDArray[np.float32]
    purposes: tuple[str, ...]
    expires_at: datetime
    created_at: datetime
    source: str | None
    metadata: Mapping[str, Any]
    held: bool

    def __repr__(self) -> str:  # never print a template or a subject id by accident
        return (f"RecordView(record_id={self.record_id!r}, purposes={self.purposes!r}, "
                f"expires_at={self.expires_at.isoformat()}, held={self.held})")


@dataclass(frozen=True, slots=True)
class DeleteReceipt:
    """One record deleted (hidden from search before the call returned)."""

    record_id: str
    subject_key_destroyed: bool  # it was the subject's last record
    audit_seq: int


@dataclass(frozen=True, slots=True)
class HoldReceipt:
    """A legal hold placed or released; ``records`` is how many records it covers(ed)."""

    subject_ref: str
    records: int
    active: bool
    audit_seq: int


@dataclass(frozen=True, slots=True)
class PolicyReceipt:
    """A retention policy applied; ``digest`` names the policy version now in force.

    A tighter policy applies to what is stored: ``records_shortened`` records got an
    earlier expiry (resealed in the same transaction), ``records_expired`` of them expire
    at once (their new limit had already passed; the next purge shreds them)."""

    digest: str
    audit_seq: int
    records_shortened: int = 0
    records_expired: int = 0


@dataclass(frozen=True, slots=True)
class PurposeChange:
    """How one purpose differs between the policy in force and a proposed one.

    ``fields`` maps each field that differs to (current, proposed), spelled as in the
    policy file (None: absent). ``tightened``: a shorter ``max_retention``, or the purpose
    removed. ``records``: stored records tagged with the purpose (expired ones too, until
    purged); ``shortened``: those whose expiry the proposed policy would bring forward."""

    purpose: str
    status: str  # "added", "removed" or "changed"
    fields: Mapping[str, tuple[Any, Any]]
    tightened: bool
    records: int
    shortened: int


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What ``set_policy(proposed)`` would change, computed without changing anything.

    ``records_shortened`` and ``records_expired`` are what its receipt would count (each
    record once, whatever the number of its purposes). ``epoch_changed``: the proposal
    has another epoch length, which ``set_policy`` refuses."""

    changes: tuple[PurposeChange, ...]
    epoch_changed: bool
    records_shortened: int
    records_expired: int

    @property
    def changed(self) -> bool:
        return bool(self.changes) or self.epoch_changed


@dataclass(frozen=True, slots=True)
class PurposeRetention:
    """Retention of one purpose's stored records, from the rows' clear headers.

    Counts are of records tagged with the purpose (a record with two purposes counts in
    both). ``live``: not expired. ``expiring_24h/7d/30d``: live records whose expiry falls
    within that time from now (each window includes the shorter ones). ``oldest_expiry``:
    the earliest expiry still stored (in the past when expired records await a purge);
    ``latest_expiry``: the furthest. ``held``: records of subjects under legal hold,
    ``held_expired`` of them past their expiry (kept only by the hold). ``purge_removes``:
    what ``purge_expired()`` would shred now. ``beyond_limit``: records whose expiry lies
    further ahead than the purpose's ``max_retention`` from now (0 unless the policy was
    changed behind the store's back). ``in_policy`` is False for a purpose the policy no
    longer defines."""

    purpose: str
    in_policy: bool
    max_retention: str | None
    records: int
    live: int
    expiring_24h: int
    expiring_7d: int
    expiring_30d: int
    oldest_expiry: datetime | None
    latest_expiry: datetime | None
    held: int
    held_expired: int
    purge_removes: int
    beyond_limit: int


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What is stored, what is about to expire, and what the next purge would do.

    Built from the clear row headers (expiry, purposes, hold flag) and the keyring's
    holds, so it decrypts nothing and works on a read-only handle. ``records`` counts
    each stored row once; ``purge_removes`` and ``purge_keeps_held`` are what
    ``purge_expired()`` run at ``at`` would shred and keep (held) across all purposes."""

    at: datetime
    records: int
    purge_removes: int
    purge_keeps_held: int
    purposes: tuple[PurposeRetention, ...]


@dataclass(frozen=True, slots=True)
class KeyReceipt:
    """The key state was sealed under a new master key; ``master_key_id`` names it."""

    master_key_id: str
    audit_seq: int


@dataclass(frozen=True, slots=True)
class RotationReceipt:
    """Every key of the key state that protects records was replaced (``rotate_keys``)."""

    records_resealed: int
    subjects_rewrapped: int
    holds_rekeyed: int
    audit_seq: int


@dataclass(frozen=True, slots=True)
class BackupReceipt:
    """Where an online backup of ``records.db`` and ``audit.db`` was written."""

    path: Path
    audit_seq: int


@dataclass(frozen=True, slots=True)
class IndexReport:
    """An index rebuilt from the sealed rows, or a sealed snapshot of it written.

    ``change_seq`` is the last change of the records database the index covers."""

    records: int
    change_seq: int
    audit_seq: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts and sizes for operators. No keys, templates or subject ids."""

    dim: int
    model: str
    records: int  # rows stored (expired ones too, until purged)
    indexed: int  # records in the in-memory index
    subjects: int  # subjects with a key (entries in records.db)
    held_subjects: int
    epoch: int  # the first epoch whose key still exists
    epoch_seconds: int
    erasure_generation: int
    generation: int  # key-state changes committed (keyring, records.db, audit.db agree)
    shredded_rows: int  # rows whose key is gone (an old copy put back)
    integrity_failures: int  # rows that failed authentication or are not listed: excluded
    missing_rows: int  # listed in a subject's key entry, row gone (found by a rebuild)
    purposes: Mapping[str, Mapping[str, int]]  # per sub-index: live, hidden, deleted, ef...
    index_params: Mapping[str, Any]
    # PostgreSQL instances: the last change the index applied, and why the change feed is
    # stalled (None while it keeps up): a stalled instance misses others' enrolments
    feed_seq: int | None = None
    feed_error: str | None = None
