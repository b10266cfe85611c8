"""What the modules that order a store's calls share: its parts, and how a call begins.

:class:`Parts` is the set of components of one open store (vault, gallery, audit trail,
clock, and the lock that serialises mutations). The store builds it once and hands it to
``matching`` and ``retention``, which order their calls over it; nothing else holds it.

A call validates its actor first, then runs its body; a refusal the body raises (bad
input, a policy violation, an unknown record) is written to the audit trail as "refused"
before it reaches the caller, so an operator probing outside their purpose leaves a trace.
A call with an invalid actor (None, blank, not a str, too long) is refused too, and audited
as refused with no actor and ``actor_invalid=True``: the README promises that every refused
call is audited. Fields of a refused call are trimmed to audit-safe primitives first: a
malformed value must not stop the refusal from being audited, and no input value is copied
beyond a short prefix of a str (a template passed by mistake as a purpose, a mode or a
reason leaves only its type's name).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditTrail
from .clock import StoreClock
from .errors import AuditError, BiotemplateError, InvalidInput, PolicyViolation, RecordNotFound
from .gallery import Gallery
from .validation import check_subject_id, check_text
from .vault import Vault


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
    try:
        name = check_text(actor, who, limit=256)
    except InvalidInput as exc:
        trail.append(event, actor=None, outcome="refused", error=type(exc).__name__,
                     actor_invalid=True, **_safe(fields))
        raise
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
    """Validate a subject id (normalised to NFC) and return its keyed ref, also recorded in
    the call's audit fields (the audit names subjects only by ref, never in clear)."""
    ref = vault.subject_ref(check_subject_id(subject_id))
    fields["subject_ref"] = ref.hex()
    return ref


def listish(purposes: object) -> list[str]:
    """Purpose tags as the audit may record them: strings only (each cut to 64
    characters), at most 16; anything else in the list is left out."""
    if isinstance(purposes, list | tuple):
        return [_text(p, 64) for p in purposes if isinstance(p, str)][:16]
    return []


def _safe(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a refused call as the audit may record them: a str cut to 64
    characters (a reason to 256), an int, bool or None as given, a list as its str items
    (:func:`listish`); any other value (a float, an array, an object) only as its type's
    name, so a template passed by mistake never lands in the audit."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, str):
            out[key] = _text(value, 256 if key == "reason" else 64)
        elif value is None or type(value) is bool or (
                type(value) is int and -(1 << 63) <= value < 1 << 63):
            out[key] = value
        elif isinstance(value, list | tuple):
            out[key] = listish(value)
        else:
            out[key] = f"<{type(value).__name__[:64]}>"  # e.g. "<ndarray>", "<float>"
    return out


def _text(value: str, limit: int) -> str:
    try:
        return value[:limit].encode("utf-8").decode("utf-8")
    except UnicodeError:
        return "<invalid>"
