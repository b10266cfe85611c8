"""Retention: deletion, erasure, purge of expired records, legal holds, policy changes.

Each operation validates, decides, commits its rows together with its audit entry (the
entry is written inside the records transaction, so the rows commit only if it is), takes
the records out of the gallery, and only then destroys the key material the commit
retired: a deleted subject's last key, an erased subject's key, the ratchet state of past
epochs. That order is what keeps old database copies unreadable and the store openable
after a crash at any point. The public methods are on :class:`~.store.TemplateStore`.
"""

from __future__ import annotations

from ._calls import Parts, subject_field
from .backends.base import RecordRow
from .clock import from_us
from .errors import BiotemplateError, InvalidInput, PolicyViolation, RecordNotFound
from .keyring import epoch_of
from .policy import RetentionPolicy, format_duration
from .results import DeleteReceipt, ErasureReceipt, HoldReceipt, PolicyReceipt, PurgeReport
from .validation import check_text, loggable_record_id
from .vault import policy_digest

HOLD_REFUSAL = "the subject is under legal hold (GDPR Art. 17(3)(e))"


def delete(p: Parts, record_id: str, *, actor: str, reason: str | None = None) -> DeleteReceipt:
    """The ordering of :meth:`TemplateStore.delete`."""
    with p.audited("delete", actor, record_id=loggable_record_id(record_id),
                   reason=reason) as f:
        check_text(reason, "reason", optional=True)
        vault = p.vault
        with p.lock:
            well_formed = isinstance(record_id, str) and loggable_record_id(record_id) == record_id
            row = vault.rows.get(str(record_id)) if well_formed else None
            if row is None:
                raise RecordNotFound("no record with that id")
            if vault.held(row.subject_ref):
                raise PolicyViolation(HOLD_REFUSAL)
            with vault.transaction():
                vault.delete([record_id])
                seq = p.trail.append("delete", actor=str(actor), **f)
            p.gallery.forget([record_id])  # committed: out of the index first
            last = not vault.rows.by_subject(row.subject_ref)
            # the subject's last record: shred its key
            destroyed = last and _shred(p, [row.subject_ref]) > 0
            vault.checkpoint()
            return DeleteReceipt(record_id=record_id, subject_key_destroyed=destroyed,
                                 audit_seq=seq)


def erase_subject(p: Parts, subject_id: str, *, actor: str,
                  reason: str | None = None) -> ErasureReceipt:
    """The ordering of :meth:`TemplateStore.erase_subject`."""
    with p.audited("erase", actor, reason=reason) as f:
        check_text(reason, "reason", optional=True)
        vault = p.vault
        ref = subject_field(vault, subject_id, f)
        with p.lock:
            if vault.held(ref):
                raise PolicyViolation(HOLD_REFUSAL)
            ids = [r.record_id for r in vault.rows.by_subject(ref)]
            with vault.transaction():
                n = vault.delete(ids)
                seq = p.trail.append("erase", actor=str(actor), count=n, **f)
            p.gallery.forget(ids)  # committed: out of the index before anything
            had_key = _shred(p, [ref]) > 0
            vault.checkpoint()
            return ErasureReceipt(subject_ref=ref.hex(), records_erased=n,
                                  key_destroyed=had_key, at=from_us(p.clock.now_us()),
                                  audit_seq=seq)


def _shred(p: Parts, refs: list[bytes]) -> int:
    """Destroy subject keys after their rows' deletion committed, and the snapshot
    that their key destruction made unreadable anyway."""
    destroyed = p.vault.shred_subjects(refs)
    if destroyed:
        p.gallery.drop_snapshot()
    p.vault.save_keys()
    return destroyed


def purge_expired(p: Parts) -> PurgeReport:
    """The ordering of :meth:`TemplateStore.purge_expired`."""
    p.alive()
    vault = p.vault
    with p.lock:
        now_us = p.clock.now_us()
        expired = vault.rows.expired(now_us)
        held = [r for r in expired if vault.held(r.subject_ref)]
        target = epoch_of(now_us, vault.epoch_us)
        doomed = {r.record_id for r in expired if not vault.held(r.subject_ref)}
        doomed |= {r.record_id for r in vault.rows.below_epoch(target)
                   if not vault.held(r.subject_ref)}
        strays = _unsealed_for_hold(p)
        before = vault.ratchet_epoch
        with vault.transaction():
            vault.update(strays)
            n = vault.delete(sorted(doomed))
            seq = p.trail.append("purge", actor=None, count=n, held_retained=len(held),
                                 epoch_before=before, epoch_after=max(before, target))
        p.gallery.forget(sorted(doomed))  # committed: out of the index first
        if vault.advance_ratchet(target):
            p.gallery.drop_snapshot()
        # keys of subjects with no row left (last record purged, an interrupted enrol)
        gone = vault.shred_subjects(vault.orphan_subjects())
        if gone:
            p.gallery.drop_snapshot()
        vault.drop_released_holds()
        vault.save_keys()
        vault.checkpoint()
        return PurgeReport(purged=n, held_retained=len(held), epoch_before=before,
                           epoch_after=vault.ratchet_epoch, subject_keys_destroyed=gone,
                           at=from_us(now_us), audit_seq=seq)


def _unsealed_for_hold(p: Parts) -> list[RecordRow]:
    """Rows of held subjects still under an epoch key (an interrupted place_hold, or a
    pre-hold row put back), resealed under the hold key before a ratchet step can
    shred them: a legal hold must not depend on every earlier call having finished."""
    vault, out = p.vault, []
    for ref in vault.active_holds():
        for row in vault.rows.by_subject(ref):
            if not row.held and row.epoch >= vault.ratchet_epoch:
                try:
                    out.append(vault.reseal(row, held=True))
                except BiotemplateError:
                    p.gallery.integrity_failures.add(row.record_id)  # left out
    return out


def place_hold(p: Parts, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
    """The ordering of :meth:`TemplateStore.place_hold`."""
    with p.audited("hold", actor, reason=reason) as f:
        check_text(reason, "reason")
        vault = p.vault
        ref = subject_field(vault, subject_id, f)
        with p.lock:
            # Everything still readable is preserved, including records that expired
            # but were not purged yet: once a legal claim is known, data that still
            # exists must not be destroyed (the hold itself is audited with its reason).
            rows = [r for r in vault.rows.by_subject(ref)
                    if r.held or r.epoch >= vault.ratchet_epoch]
            if not rows:
                raise RecordNotFound("the subject has no record to hold")
            previous = vault.open_hold(ref)  # the key is saved before rows use it
            try:
                moved = [vault.reseal(r, held=True) for r in rows if not r.held]
                with vault.transaction():
                    vault.update(moved)
                    seq = p.trail.append("hold", actor=str(actor), count=len(rows),
                                         **f)
            except BaseException:
                vault.restore_hold(ref, previous)
                raise
            return HoldReceipt(subject_ref=ref.hex(), records=len(rows), active=True,
                               audit_seq=seq)


def release_hold(p: Parts, subject_id: str, *, actor: str, reason: str) -> HoldReceipt:
    """The ordering of :meth:`TemplateStore.release_hold`."""
    with p.audited("release", actor, reason=reason) as f:
        check_text(reason, "reason")
        vault = p.vault
        ref = subject_field(vault, subject_id, f)
        with p.lock:
            if not vault.held(ref):
                raise PolicyViolation("the subject is not under legal hold")
            rows = [r for r in vault.rows.by_subject(ref) if r.held]
            back = [vault.reseal(r, held=False) for r in rows
                    if r.epoch >= vault.ratchet_epoch]
            with vault.transaction():
                vault.update(back)
                seq = p.trail.append("release", actor=str(actor), count=len(rows), **f)
            vault.close_hold(ref, still_sealed=len(back) < len(rows))
            vault.save_keys()
            return HoldReceipt(subject_ref=ref.hex(), records=len(rows), active=False,
                               audit_seq=seq)


def set_policy(p: Parts, policy: RetentionPolicy, *, actor: str,
               reason: str | None = None) -> PolicyReceipt:
    """The ordering of :meth:`TemplateStore.set_policy`."""
    with p.audited("policy", actor, reason=reason) as f:
        check_text(reason, "reason", optional=True)
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy")
        current = p.vault.policy
        if policy.epoch != current.epoch:
            raise PolicyViolation("the epoch length is fixed when the store is created "
                                  f"({format_duration(current.epoch)})")
        with p.lock:  # no enrolment can slip in between the check and the change
            for name, live in p.gallery.live_per_purpose().items():
                if name not in policy.purposes and live > 0:
                    raise PolicyViolation(f"purpose {name!r} still has live records")
            seq = p.vault.replace_policy(policy, lambda: p.trail.append(
                "policy", actor=str(actor), policy=policy.to_dict(), **f))
            return PolicyReceipt(digest=policy_digest(policy).hex(), audit_seq=seq)

