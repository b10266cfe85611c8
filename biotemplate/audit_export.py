"""The audit trail as a regulator reads it: one record per entry, nothing biometric.

EU AI Act Art. 12 asks a high-risk system to log, for each use: when (the period of use),
who (the person or service that used it, and for remote biometric identification who
verified the results), for what (the purpose, i.e. the reference database searched), why
(the stated reason), with what input, and what came out. :class:`AuditRecord` carries
exactly that, from the verified entries of ``audit.db``:

===================  ======================================================================
field                from the entry
===================  ======================================================================
seq, hash,           its position in the chain, its SHA-256 chain hash, its predecessor's,
prev_hash,           and the Ed25519 signature (checkable with the store's public key)
signature,           over the hash of entry ``signed_seq``: the entry itself, or for a
signed_seq           search the next seal, which the ``prev_hash`` links chain back to it
started, time        ts0 (when the call began) and ts1 (when it was written), UTC
event, outcome       what was called ("search", "erase", "policy", ...) and ok/refused/error
actor                who called (a reviewer for "confirm"); None for the store itself
purpose(s), mode     the purpose searched under / the purposes enrolled for; the mode
reason, error        the reason the caller gave; the error class of a refusal
result               counts and decisions only (``RESULT_FIELDS``): how many candidates,
                     the decision, records erased, reviewers, records shortened, ...
record_ids           record ids involved (random ids: candidates, enrolled, deleted)
subject_ref          the keyed pseudonym of a subject (erasure, hold, access request)
ref_seq              the entry referred to (a confirmation's search)
input_digest         a keyed digest of the probe (Art. 12(3)(c) "input data"; not the probe)
policy               for "policy" entries, the policy applied (the file's structure)
===================  ======================================================================

Left out on purpose: similarity scores (derived from biometric comparison), the probe
and templates (never in the trail), internal bookkeeping (key generations, key ids,
epoch numbers), and any field not listed above, so a field added to the trail later is
not exported until someone decides it belongs here. Subject ids are never in the trail.

Reading needs no master key and does not disturb a running writer (``mode=ro``):
:func:`export_audit` takes the store folder or its ``audit.db``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .audit import SignedEntry, offline_trail
from .clock import from_us

__all__ = ["RESULT_FIELDS", "AuditRecord", "export_audit", "record_of"]

# Entry fields exported under "result": counts, decisions and parameters, never scores.
RESULT_FIELDS = frozenset({
    "count", "decision", "match", "threshold", "k", "unconfirmed", "held_retained",
    "reviewers", "two_person", "records", "subjects", "holds", "records_shortened",
    "records_expired", "integrity_failures", "missing", "actor_invalid", "expires",
    "source", "index", "lost_subject_keys", "subject_keys", "of", "action",
})


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit entry as a regulator reads it (see the module docstring)."""

    seq: int
    started: datetime
    time: datetime
    event: str
    outcome: str
    actor: str | None
    purpose: str | None
    purposes: tuple[str, ...]
    mode: str | None
    reason: str | None
    error: str | None
    result: Mapping[str, Any]
    record_ids: tuple[str, ...]
    subject_ref: str | None
    ref_seq: int | None
    input_digest: str | None
    policy: Mapping[str, Any] | None
    hash: str
    prev_hash: str
    signature: str
    signed_seq: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 UTC, bytes as hex, absent fields as null."""
        return {"seq": self.seq, "started": self.started.isoformat(),
                "time": self.time.isoformat(), "event": self.event, "outcome": self.outcome,
                "actor": self.actor, "purpose": self.purpose, "purposes": list(self.purposes),
                "mode": self.mode, "reason": self.reason, "error": self.error,
                "result": dict(self.result), "record_ids": list(self.record_ids),
                "subject_ref": self.subject_ref, "ref_seq": self.ref_seq,
                "input_digest": self.input_digest,
                "policy": None if self.policy is None else dict(self.policy),
                "hash": self.hash, "prev_hash": self.prev_hash, "signature": self.signature,
                "signed_seq": self.signed_seq}

    def to_json(self) -> str:
        """One line of JSON Lines (keys sorted, no newline inside)."""
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)


def record_of(signed: SignedEntry) -> AuditRecord:
    """The regulator's view of one verified entry."""
    e, f = signed.entry, signed.entry.fields
    ids = f.get("record_ids")
    record_ids = [str(x) for x in ids] if isinstance(ids, list) else []
    if isinstance(f.get("record_id"), str):
        record_ids.append(f["record_id"])
    purposes = f.get("purposes")
    policy = f.get("policy")
    return AuditRecord(
        seq=e.seq, started=e.ts_start, time=e.ts_end, event=e.event, outcome=e.outcome,
        actor=e.actor, purpose=_text(f.get("purpose")),
        purposes=tuple(str(x) for x in purposes) if isinstance(purposes, list) else (),
        mode=_text(f.get("mode")), reason=_text(f.get("reason")), error=_text(f.get("error")),
        result={k: _result(k, v) for k, v in sorted(f.items()) if k in RESULT_FIELDS},
        record_ids=tuple(record_ids), subject_ref=_text(f.get("subject_ref")),
        ref_seq=f["ref_seq"] if type(f.get("ref_seq")) is int else None,
        input_digest=_hex(f.get("probe_digest")),
        policy=_plain(policy) if e.event == "policy" and isinstance(policy, Mapping) else None,
        hash=signed.hash.hex(), prev_hash=signed.prev.hex(), signature=signed.signature.hex(),
        signed_seq=signed.signed_seq)


def export_audit(path: str | os.PathLike[str], *, since: int = 1,
                 until: int | None = None) -> Iterator[AuditRecord]:
    """The verified entries ``since`` to ``until`` (inclusive) of the store at ``path``
    (its folder, or its ``audit.db``) as :class:`AuditRecord`, without the master key
    and beside a running writer.

    Each entry's hash and signature are checked against the public key the file names,
    and its link to the one before: a forged or missing entry stops the export with an
    error (what came before it was yielded; a search entry is yielded once the seal
    after it is checked). Search entries a live store has not sealed yet (at most
    ``audit.SYNC_WINDOW`` old) are left out: export again for them. This does not show
    that the file is the store's own or complete: run :func:`~biotemplate.audit.verify_audit` with a
    witness's checkpoint for that.

    Raises:
        StoreNotFound: no audit trail at ``path``.
        AuditError: the file is unreadable or names no public key.
        InvalidInput: bad bounds.
        IntegrityError: an entry fails verification or does not chain.
    """
    with offline_trail(path) as trail:
        for signed in trail.entries(since, until):
            yield record_of(signed)


def _result(name: str, value: Any) -> Any:
    if name == "expires" and type(value) is int:  # an enrolment's expiry, in µs
        return from_us(value).isoformat()
    return _plain(value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _hex(value: object) -> str | None:
    return value.hex() if isinstance(value, bytes) else None


def _plain(value: Any) -> Any:
    """Entry values as JSON takes them (bytes as hex; maps and lists copied)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
