"""What every part of :class:`~biotemplate.store.TemplateStore` shares.

The store is one object assembled from a few mixins, each with one job (``_matching``:
search and verification; ``_retention``: deletion, erasure, purge and holds;
``_indexing``: the in-memory index and its sealed snapshots; ``store``: lifecycle and
enrolment). This module holds their shared state and the helpers every one of them uses:
the store's monotonic clock, the audited-call wrapper (a refusal from a known caller is
audited, then raised) and the bookkeeping of records leaving the index.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from . import records as rec
from . import sealing
from .audit import AuditReport, AuditTrail, Checkpoint
from .backends.base import Backend, RecordRow
from .codec import RecordCodec, Shredded
from .errors import (
    AuditError,
    BiotemplateError,
    InvalidInput,
    PolicyViolation,
    RecordNotFound,
)
from .index import IndexParams, TemplateIndex
from .keys import Keyring, SecretKey
from .policy import RetentionPolicy

Clock = Callable[[], datetime]
RECORDS, AUDIT, KEYRING, SNAPSHOT = "records.db", "audit.db", "keyring", "index.snapshot"
Progress = Callable[[int, int], None]
SEARCH_MODES = ("identification", "investigation")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _to_us(t: datetime) -> int:
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def _checked_time(t: object) -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise InvalidInput("the clock must return an aware datetime (UTC)")
    if not _EARLIEST <= t <= _LATEST:  # expiries are computed from it: keep them in range
        raise InvalidInput("the clock returned a time outside 1970-2999")
    return t


_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(2999, 12, 31, tzinfo=UTC)


class StoreClock:
    """The store's time: the injected clock, never allowed to run backwards.

    Expiry checks and audit timestamps both read it, so a clock set back can neither
    un-expire a record nor write an audit entry that predates the one before it. The
    high-water mark is persisted (keyring, audit trail) and restored on open.
    """

    def __init__(self, clock: Clock, high_water_us: int = 0) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # not the store lock: searches must not wait on it
        self.high_water_us = high_water_us

    def raise_to(self, t_us: int) -> None:
        with self._lock:
            self.high_water_us = max(self.high_water_us, t_us)

    def now_us(self) -> int:
        now = _to_us(_checked_time(self._clock()))
        with self._lock:
            self.high_water_us = max(self.high_water_us, now)
            return self.high_water_us

    def __call__(self) -> datetime:
        return _from_us(self.now_us())


def _checked_clock(clock: Clock | None) -> Clock:
    if clock is None:
        return _utc_now
    if not callable(clock):
        raise InvalidInput("clock must be a zero-argument callable returning a datetime")
    _checked_time(clock())
    return clock


def _safe(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields of a refused call, trimmed to audit-safe primitives (a malformed value must
    not stop the refusal from being audited: the trace is the point)."""
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


class AuditView:
    """The audit trail as callers see it: verify it, take checkpoints, read entries."""

    def __init__(self, trail: AuditTrail, public_key: bytes) -> None:
        self._trail = trail
        self.public_key = public_key  # Ed25519, raw 32 bytes: hand it to auditors

    def verify(self, checkpoint: Checkpoint | None = None) -> AuditReport:
        """Check chain, signatures and, given a checkpoint kept elsewhere, truncation."""
        return self._trail.verify(checkpoint=checkpoint)

    def checkpoint(self) -> Checkpoint:
        """A signed (seq, head hash): keep it outside this host (a witness)."""
        return self._trail.checkpoint()

    def get(self, seq: int) -> Any:
        return self._trail.get(seq)


class StoreCore:
    """Shared state of a store and the helpers its parts use. Not public."""

    def __init__(self, *, path: Path, backend: Backend, keyring: Keyring,
                 master_key: SecretKey, policy: RetentionPolicy, dim: int, model: str,
                 audit: AuditTrail, clock: StoreClock, index_params: IndexParams | None,
                 snapshot_on_close: bool = True) -> None:
        self._path, self._db, self._keyring, self._kek = path, backend, keyring, master_key
        self._policy, self.dim, self.model, self._clock = policy, dim, model, clock
        self._codec = RecordCodec(keyring, model=model, dim=dim)
        self._index_params = index_params
        self._index = TemplateIndex(dim, index_params)
        self._subjects: dict[str, str] = {}  # record id -> subject id, in memory only
        self._lock = threading.RLock()  # serialises mutations (keyring, rows)
        self._trail = audit
        self._integrity_failures: set[str] = set()
        self._shredded: set[str] = set()  # rows whose key is gone (from old copies)
        # Committed rows the index failed to take (e.g. out of memory): until a rebuild,
        # no snapshot may be written, or the next open would trust it and miss them.
        self._index_incomplete = False
        self._closed = False
        self._snapshot_on_close = snapshot_on_close
        self.audit = AuditView(audit, sealing.signer_from_seed(keyring.audit_seed)[1])

    def _now_us(self) -> int:
        """The store's time (see :class:`StoreClock`)."""
        return self._clock.now_us()

    def _alive(self) -> None:
        if self._closed:
            raise InvalidInput("the store is closed")

    @contextmanager
    def _audited(self, event: str, actor: object, *, who: str = "actor",
                 **fields: Any) -> Iterator[dict[str, Any]]:
        """Validate the actor, then audit a refusal if the body raises a policy/input error.

        The body fills the yielded dict with fields for its own success entry.
        """
        self._alive()
        name = rec.check_text(actor, who, limit=256)
        try:
            yield fields
        except AuditError:
            raise
        except BiotemplateError as exc:
            refused = isinstance(exc, InvalidInput | PolicyViolation | RecordNotFound)
            self._trail.append(event, actor=name, outcome="refused" if refused else "error",
                               error=type(exc).__name__, **_safe(fields))
            raise

    def _subject(self, subject_id: object, fields: dict[str, Any]) -> bytes:
        """Validate a subject id and return its keyed ref, also recorded in the call's
        audit fields (the audit names subjects only by ref, never in clear)."""
        rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
        ref = self._keyring.subject_ref(str(subject_id))
        fields["subject_ref"] = ref.hex()
        return ref

    def _save_keyring(self) -> None:
        self._keyring.high_water_us = max(self._keyring.high_water_us,
                                          self._clock.high_water_us)
        self._keyring.save(self._path / KEYRING, self._kek)

    def _forget(self, record_ids: Sequence[str]) -> None:
        self._index.remove(record_ids)
        for rid in record_ids:
            self._subjects.pop(rid, None)
            self._shredded.discard(rid)
            self._integrity_failures.discard(rid)

    def _readable(self, row: RecordRow, now_us: int, *, for_export: bool) -> rec.Plain | None:
        """Open a row if policy lets this call see it; shredded rows read as absent."""
        held = self._keyring.held(row.subject_ref)
        if row.expiry_us <= now_us and not (for_export and held):
            return None
        try:
            return self._codec.open(row)
        except Shredded:
            return None

    def _index_rows(self, items: Sequence[tuple[RecordRow, rec.Plain]],
                    progress: Progress | None = None, *, index: TemplateIndex | None = None,
                    subjects: dict[str, str] | None = None) -> None:
        if not items:
            return
        index = self._index if index is None else index
        subjects = self._subjects if subjects is None else subjects
        vectors = rec.normalised(np.stack([p.template for _, p in items]))
        index.add([r.record_id for r, _ in items], [r.subject_ref for r, _ in items],
                  [r.purposes for r, _ in items], [r.expiry_us for r, _ in items],
                  vectors, progress=progress)
        for r, p in items:
            subjects[r.record_id] = p.subject_id

    def _digest(self, vec: np.ndarray[Any, Any]) -> bytes:
        """A keyed digest of the probe: links audit entries of one probe, reveals nothing."""
        data = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        return sealing.keyed_hash(self._keyring.digest_key, b"probe:" + data)

    def _drop_snapshot(self) -> None:
        """After an erasure or a ratchet step the snapshot's key is gone: remove the file."""
        with contextlib.suppress(OSError):  # its key is gone either way
            (self._path / SNAPSHOT).unlink(missing_ok=True)

    def _shred_subjects(self, refs: Iterable[bytes]) -> int:
        """Destroy subject keys (and their hold keys); the caller saves the keyring.

        Any key destruction bumps the erasure generation, so an index snapshot that still
        holds those subjects' templates can never be opened again.
        """
        destroyed = 0
        for ref in list(refs):
            destroyed += self._keyring.subjects.pop(ref, None) is not None
            self._keyring.holds.pop(ref, None)
        if destroyed:
            self._keyring.erasures += 1
            self._keyring.snapshot_secret = sealing.random_key()
            self._drop_snapshot()
        return destroyed
