"""The audited-call wrapper: how every public call of the store begins.

A call validates its actor first (an anonymous call is refused outright), then runs its
body; a refusal the body raises (bad input, a policy violation, an unknown record) is
written to the audit trail as "refused" before it reaches the caller, so an operator
probing outside their purpose leaves a trace. Fields of a refused call are trimmed to
audit-safe primitives first: a malformed value must not stop the refusal from being
audited, and no input value is copied in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .audit import AuditTrail
from .errors import AuditError, BiotemplateError, InvalidInput, PolicyViolation, RecordNotFound
from .validation import MAX_SUBJECT_ID, check_text
from .vault import Vault


@contextmanager
def audited(trail: AuditTrail, event: str, actor: object, *, who: str = "actor",
            **fields: Any) -> Iterator[dict[str, Any]]:
    """Validate the actor, then audit a refusal if the body raises a policy/input error.

    The body fills the yielded dict with fields for its own success entry.
    """
    name = check_text(actor, who, limit=256)
    try:
        yield fields
    except AuditError:
        raise
    except BiotemplateError as exc:
        refused = isinstance(exc, InvalidInput | PolicyViolation | RecordNotFound)
        trail.append(event, actor=name, outcome="refused" if refused else "error",
                     error=type(exc).__name__, **_safe(fields))
        raise


def subject_field(vault: Vault, subject_id: object, fields: dict[str, Any]) -> bytes:
    """Validate a subject id and return its keyed ref, also recorded in the call's audit
    fields (the audit names subjects only by ref, never in clear)."""
    check_text(subject_id, "subject_id", limit=MAX_SUBJECT_ID)
    ref = vault.subject_ref(str(subject_id))
    fields["subject_ref"] = ref.hex()
    return ref


def listish(purposes: object) -> list[str]:
    """Purpose tags as the audit may record them: strings only, at most 16."""
    if isinstance(purposes, list | tuple):
        return [p for p in purposes if isinstance(p, str)][:16]
    return []


def _safe(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            out[key] = _text(value, 256)
        elif isinstance(value, int | float | bool) or value is None:
            out[key] = value
        elif isinstance(value, list):
            out[key] = [_text(str(v), 64) for v in value[:16]]
    return out


def _text(value: str, limit: int) -> str:
    try:
        return value[:limit].encode("utf-8").decode("utf-8")
    except UnicodeError:
        return "<invalid>"
