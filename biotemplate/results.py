"""What the store's calls return. Plain frozen values: Python bools, floats and ints, no
numpy scalars, no templates, no clear subject ids except where the caller supplied them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
    """

    candidates: list[Candidate]
    decision: bool
    threshold: float
    mode: str
    purpose: str
    audit_seq: int


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
