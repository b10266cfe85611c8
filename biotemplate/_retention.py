"""Retention: deletion, erasure, purge of expired records and legal holds.

Each operation audits inside the records transaction (fail closed), then destroys the key
material the commit retired: a deleted subject's key, an erased subject's key, the ratchet
state of past epochs. That is what keeps old database copies unreadable.
"""

from __future__ import annotations

from . import records as rec
from . import sealing
from ._core import (
    StoreCore,
    _from_us,
)
from .backends.base import RecordRow
from .errors import (
    BiotemplateError,
    PolicyViolation,
    RecordNotFound,
)
from .keys import epoch_of
from .results import (
    ErasureReceipt,
    PurgeReport,
)


class Retention(StoreCore):
    """delete, erase_subject, purge_expired, place_hold and release_hold."""

    def delete(self, record_id: str, *, actor: str, reason: str | None = None) -> None:
        """Delete one record at once (hidden from search before this returns).

        Raises:
            RecordNotFound: no such record. PolicyViolation: its subject is under legal hold.
        """
        with self._audited("delete", actor, record_id=rec.loggable_record_id(record_id),
                           reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            with self._lock:
                well_formed = rec.loggable_record_id(record_id) == record_id
                row = self._db.get(str(record_id)) if well_formed else None
                if row is None:
                    raise RecordNotFound("no record with that id")
                if self._keyring.held(row.subject_ref):
                    raise PolicyViolation("the subject is under legal hold (GDPR Art. 17(3)(e))")
                with self._db.transaction():
                    self._db.delete([record_id])
                    self._trail.append("delete", actor=str(actor), **f)
                self._forget([record_id])  # committed: out of the index before anything else
                if not self._db.by_subject(row.subject_ref):  # last record: shred the key
                    self._shred_subjects([row.subject_ref])
                    self._save_keyring()
                self._db.checkpoint()

    def erase_subject(self, subject_id: str, *, actor: str,
                      reason: str | None = None) -> ErasureReceipt:
        """Erase every record of a subject and destroy its key (crypto-shredding): copies
        of the database taken before this call can no longer be read for this subject.

        Raises:
            PolicyViolation: the subject is under legal hold.
        """
        with self._audited("erase", actor, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            ref = self._subject(subject_id, f)
            with self._lock:
                if self._keyring.held(ref):
                    raise PolicyViolation("the subject is under legal hold (GDPR Art. 17(3)(e))")
                ids = [r.record_id for r in self._db.by_subject(ref)]
                with self._db.transaction():
                    n = self._db.delete(ids)
                    seq = self._trail.append("erase", actor=str(actor), count=n, **f)
                self._forget(ids)  # committed: out of the index before anything else
                had_key = self._shred_subjects([ref]) > 0
                self._save_keyring()
                self._db.checkpoint()
                return ErasureReceipt(subject_ref=ref.hex(), records_erased=n,
                                      key_destroyed=had_key, at=_from_us(self._now_us()),
                                      audit_seq=seq)

    def purge_expired(self) -> PurgeReport:
        """Shred every expired record not under legal hold, and advance the epoch ratchet
        so the keys of past epochs are gone (old database copies stay unreadable)."""
        self._alive()
        with self._lock:
            now_us = self._now_us()
            expired = self._db.expired(now_us)
            doomed = [r for r in expired if not self._keyring.held(r.subject_ref)]
            held = [r for r in expired if self._keyring.held(r.subject_ref)]
            target = epoch_of(now_us, self._keyring.epoch_us)
            doomed_ids = {r.record_id for r in doomed}
            doomed_ids |= {r.record_id for r in self._db.below_epoch(target)
                           if not self._keyring.held(r.subject_ref)}
            strays = self._unsealed_for_hold()
            before = self._keyring.ratchet_epoch
            with self._db.transaction():
                self._db.update(strays)
                n = self._db.delete(sorted(doomed_ids))
                seq = self._trail.append("purge", actor=None, count=n, held_retained=len(held),
                                         epoch_before=before, epoch_after=max(before, target))
            self._forget(sorted(doomed_ids))  # committed: out of the index before anything
            if self._keyring.advance(target):
                self._drop_snapshot()
            live_refs = self._db.subject_refs()
            # keys of subjects with no row left (last record purged, an interrupted enrol)
            gone = self._shred_subjects([r for r in self._keyring.subjects if r not in live_refs])
            for r, (_, active) in list(self._keyring.holds.items()):
                if not active and not any(x.held for x in self._db.by_subject(r)):
                    del self._keyring.holds[r]  # a released hold with nothing left under it
            self._save_keyring()
            self._db.checkpoint()
            return PurgeReport(purged=n, held_retained=len(held), epoch_before=before,
                               epoch_after=self._keyring.ratchet_epoch,
                               subject_keys_destroyed=gone, at=_from_us(now_us),
                               audit_seq=seq)

    def _unsealed_for_hold(self) -> list[RecordRow]:
        """Rows of held subjects still under an epoch key (an interrupted place_hold, or a
        pre-hold row put back), resealed under the hold key before a ratchet step can
        shred them: a legal hold must not depend on every earlier call having finished."""
        out = []
        for ref, (_, active) in self._keyring.holds.items():
            if active:
                for row in self._db.by_subject(ref):
                    if not row.held and row.epoch >= self._keyring.ratchet_epoch:
                        try:
                            out.append(self._codec.reseal(row, held=True))
                        except BiotemplateError:
                            self._integrity_failures.add(row.record_id)  # forged: left out
        return out

    def place_hold(self, subject_id: str, *, actor: str, reason: str) -> int:
        """Put a subject under legal hold: its records survive purges (resealed under a
        hold key), stay exportable, and cannot be erased or deleted until released.
        Returns how many records are held.

        Raises:
            RecordNotFound: the subject has no record.
        """
        with self._audited("hold", actor, reason=reason) as f:
            rec.check_text(reason, "reason")
            ref = self._subject(subject_id, f)
            with self._lock:
                # Everything still readable is preserved, including records that expired
                # but were not purged yet: once a legal claim is known, data that still
                # exists must not be destroyed (the hold itself is audited with its reason).
                rows = [r for r in self._db.by_subject(ref)
                        if r.held or r.epoch >= self._keyring.ratchet_epoch]
                if not rows:
                    raise RecordNotFound("the subject has no record to hold")
                previous = self._keyring.holds.get(ref)
                self._keyring.holds[ref] = (previous[0] if previous else sealing.random_key(),
                                            True)
                try:
                    self._save_keyring()
                    moved = [self._codec.reseal(r, held=True) for r in rows if not r.held]
                    with self._db.transaction():
                        self._db.update(moved)
                        self._trail.append("hold", actor=str(actor), count=len(rows), **f)
                except BaseException:
                    _restore(self._keyring.holds, ref, previous)
                    self._save_keyring()
                    raise
                return len(rows)

    def release_hold(self, subject_id: str, *, actor: str, reason: str) -> int:
        """Lift a legal hold. Records still within retention go back under their epoch key;
        expired ones are shredded at the next purge. Returns how many records were held.

        Raises:
            PolicyViolation: the subject is not under legal hold.
        """
        with self._audited("release", actor, reason=reason) as f:
            rec.check_text(reason, "reason")
            ref = self._subject(subject_id, f)
            with self._lock:
                if not self._keyring.held(ref):
                    raise PolicyViolation("the subject is not under legal hold")
                rows = [r for r in self._db.by_subject(ref) if r.held]
                back = [self._codec.reseal(r, held=False) for r in rows
                        if r.epoch >= self._keyring.ratchet_epoch]
                with self._db.transaction():
                    self._db.update(back)
                    self._trail.append("release", actor=str(actor), count=len(rows), **f)
                key = self._keyring.holds[ref][0]
                if len(back) == len(rows):
                    del self._keyring.holds[ref]  # nothing sealed under it: shred it
                else:
                    self._keyring.holds[ref] = (key, False)
                self._save_keyring()
                return len(rows)



def _restore(holds: dict[bytes, tuple[bytes, bool]], ref: bytes,
             previous: tuple[bytes, bool] | None) -> None:
    if previous is None:
        holds.pop(ref, None)
    else:
        holds[ref] = previous
