"""What the modules that order a store's calls share: its parts, and how a call begins.

:class:`Parts` is the set of components of one open store (vault, gallery, audit trail,
clock, and the lock that serialises mutations). The store builds it once and hands it to
``matching`` and ``retention``, which order their calls over it; nothing else holds it.

A call validates its actor first (an anonymous call is refused outright), then runs its
body; a refusal the body raises (bad input, a policy violation, an unknown record) is
written to the audit trail as "refused" before it reaches the caller, so an operator
probing outside their purpose leaves a trace. Fields of a refused call are trimmed to
audit-safe primitives first: a malformed value must not stop the refusal from being
audited, and no input value is copied in full.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditTrail
from .clock import StoreClock
from .errors import AuditError, BiotemplateError, InvalidInput, PolicyViolation, RecordNotFound
from .gallery import Gallery
from .validation import MAX_SUBJECT_ID, check_text
from .vault import KeyChange, Vault


@dataclass(eq=False)
class Parts:
    """The components of one open store. ``closed`` is owned here: set once, by close."""

    vault: Vault
    gallery: Gallery
    trail: AuditTrail
    clock: StoreClock
    lock: threading.RLock = field(default_factory=threading.RLock)  # serialises mutations
    closed: bool = False

    def alive(self) -> None:
        """Raises: InvalidInput: the store is closed."""
        if self.closed:
            raise InvalidInput("the store is closed")

    @contextmanager
    def mutation(self) -> Iterator[None]:
        """A records transaction with the call's audit entry written inside it (so the
        rows commit only if the entry is written). If the commit then fails, a
        "rollback" entry follows at once: the audit never claims what did not commit."""
        head = self.trail.head_seq
        try:
            with self.vault.transaction():
                yield
        except BaseException:
            if self.trail.head_seq > head:
                with suppress(BiotemplateError):  # the original error matters more
                    self.trail.append("rollback", actor=None, ref_seq=head + 1)
            self.vault.discard_staged()
            raise

    def apply_key_change(self) -> KeyChange:
        """After a commit that staged a key change (``Vault.stage``): apply it, move the
        audit trail to the new generation, and drop the index snapshot if its key died."""
        change = self.vault.apply_staged()
        self.trail.generation = self.vault.generation
        if change.subjects_destroyed or change.ratchet_moved:
            self.gallery.drop_snapshot()
        return change

    def audited(self, event: str, actor: object, *, who: str = "actor",
                **fields: Any) -> AbstractContextManager[dict[str, Any]]:
        """:func:`audited` on this store's trail, once the store is known to be open."""
        self.alive()
        return audited(self.trail, event, actor, who=who, **fields)


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
