"""What the modules that order a store's calls share: its parts, and how a call begins.

:class:`Parts` is the set of components of one open store (vault, gallery, audit trail,
clock, the store's writer lock, and the lock that serialises mutations). The store builds
it once and hands it to ``enrolment``, ``matching`` and ``retention``, which order their
calls over it; nothing else holds it.

One writer per store: a writable handle holds an exclusive OS lock on ``<store>/lock``
(:func:`writer_lock`) from before its first read to its close, so a second writer, in this
process or another, is refused with ``StoreLocked`` instead of racing the first one's
keyring saves and ratchet steps. A handle without it (``read_only=True``) is refused every
call that writes or touches templates or subject ids, here, in :meth:`Parts.alive`.

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

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from ._files import FileLock, read_note
from .audit import AuditTrail
from .clock import StoreClock
from .errors import (
    AuditError,
    BiotemplateError,
    InvalidInput,
    PolicyViolation,
    ReadOnlyStore,
    RecordNotFound,
    StorageError,
    StoreLocked,
    StoreNotFound,
)
from .gallery import Gallery
from .validation import check_subject_id, check_text
from .vault import KeyChange, Vault

LOCK = "lock"
READ_ONLY = ("this store was opened with read_only=True: it offers stats(), "
             "retention_report(), the policy and the audit trail (verify, checkpoint, get, "
             "entries); calls that write, or read templates or subject ids, belong to the "
             "one writable handle")


class StoreLock:
    """The lock every mutation holds: a re-entrant lock in this process and, on a store
    that several instances share (PostgreSQL), the store's lock across instances too.

    Taken outermost, the shared-store lock (``across(shared)``, supplied by the store)
    takes the database's advisory lock and brings this instance's key state up to date
    before the body runs, so a mutation always acts on the newest key state and no other
    instance is in the middle of one. :meth:`reading` is the same with the advisory lock
    shared: for reads that need current keys (verification, export) and for the change
    feed. On a SQLite store (one writer) ``reading`` takes nothing.
    """

    def __init__(self, across: Callable[[bool], AbstractContextManager[None]] | None = None,
                 ) -> None:
        self._local = threading.RLock()
        self._across = across
        self._depth = 0  # nesting of the thread that holds ``_local``

    def __enter__(self) -> None:
        self._enter(shared=False)

    def __exit__(self, *exc: object) -> None:
        self._exit()

    @contextmanager
    def reading(self) -> Iterator[None]:
        if self._across is None:
            yield
            return
        self._enter(shared=True)
        try:
            yield
        finally:
            self._exit()

    def _enter(self, *, shared: bool) -> None:
        self._local.acquire()
        if self._depth == 0 and self._across is not None:
            stack = ExitStack()
            try:
                stack.enter_context(self._across(shared))
            except BaseException:
                self._local.release()
                raise
            self._outer = stack
        self._depth += 1

    def _exit(self) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._across is not None:
                self._outer.close()
        finally:
            self._local.release()


class Releasable(Protocol):
    def release(self) -> None: ...


@dataclass(eq=False)
class Parts:
    """The components of one open store. ``closed`` is owned here: set once, by close."""

    vault: Vault
    gallery: Gallery
    trail: AuditTrail
    clock: StoreClock
    writer: Releasable | None  # the store's writer lock; None for a read-only handle
    lock: StoreLock = field(default_factory=StoreLock)  # serialises mutations
    closed: bool = False

    def alive(self, *, needs_writer: bool = True) -> None:
        """Check that the store may take this call: every call asks, before anything else.

        Raises:
            InvalidInput: the store is closed.
            ReadOnlyStore: the handle is read-only and the call is not one of the few
                (``needs_writer=False``) that read only counts and the audit trail.
        """
        if self.closed:
            raise InvalidInput("the store is closed")
        if needs_writer and self.writer is None:
            raise ReadOnlyStore(READ_ONLY)

    @contextmanager
    def mutation(self) -> Iterator[None]:
        """A records transaction with the call's audit entry written inside it (so the
        rows commit only if the entry is written). If the commit then fails, a
        "rollback" entry follows at once: the audit never claims what did not commit."""
        if self.trail.atomic_with_records:  # the entry rolls back with the rows
            try:
                with self.vault.transaction():
                    yield
            except BaseException:
                self.vault.discard_staged()
                raise
            return
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
        """:func:`audited` on this store's trail, once the store is known to be open and
        writable (every audited call writes its entry; a read-only handle writes none)."""
        self.alive()
        return audited(self.trail, event, actor, who=who, **fields)

    def release(self) -> None:
        """Close the files, then give up the writer lock; writes nothing (used by close,
        and by an open that fails midway). Everything is released even if a step fails."""
        self.closed = True
        with ExitStack() as stack:  # callbacks run last-in first-out
            if self.writer is not None:
                stack.callback(self.writer.release)
            stack.callback(self.vault.close)
            stack.callback(self.trail.close)
            self.gallery.close()


def writer_lock(folder: Path) -> FileLock:
    """Take the store's writer lock, before anything in ``folder`` is read or written.

    The lock file holds a note naming the holder (pid, host, since when: wall-clock time,
    for the operator who must find that process, not the store's clock).

    Raises:
        StoreLocked: another handle holds it; the message names the holder.
        StoreNotFound: ``folder`` is not a folder.
        StorageError: the lock file could not be created or locked (e.g. no permission:
            auditors open with ``read_only=True``).
    """
    note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).isoformat(timespec="seconds")})
    try:
        return FileLock.acquire(folder / LOCK, note.encode())
    except BlockingIOError:
        raise StoreLocked(_locked_message(folder)) from None
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFound(f"{folder} holds no biotemplate store") from None
    except OSError as exc:
        raise StorageError(f"cannot take the store's writer lock ({exc.strerror})") from None


def _locked_message(folder: Path) -> str:
    """Who holds the lock, from its note (checked: the file is not ours to trust)."""
    try:
        note = json.loads(read_note(folder / LOCK))
        pid, host, since = note["pid"], note["host"], note["since"]
        if type(pid) is not int or not (isinstance(host, str) and host.isprintable()):
            raise ValueError
        since = datetime.fromisoformat(since).isoformat()
        holder = f"process {pid} on host {host[:255]} since {since}"
        if pid == os.getpid() and host == socket.gethostname():
            holder += " (this process: another TemplateStore handle)"
    except (ValueError, TypeError, KeyError, RecursionError):
        holder = "a process that has not written its note yet"
    return (f"the store at {folder} is open for writing by {holder}: close the other handle "
            "or stop that process. A SQLite store folder has one writer; auditors open it "
            "with read_only=True or use biotemplate.verify_audit; several workers share a "
            "store through the PostgreSQL backend (planned), not one SQLite folder")


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
