"""Retention: deletion, erasure, purge of expired records, legal holds, policy changes.

Each operation validates, decides, commits its rows together with its audit entry (the
entry is written inside the records transaction, so the rows commit only if it is), takes
the records out of the gallery, and only then destroys the key material the commit
retired: the old key of the bucket a deletion or erasure resealed, the ratchet state of
past epochs, a released hold key. That order is what keeps old database copies unreadable
and the store openable after a crash at any point. The subject-key entries change in the
same transaction as the rows, decided from the entries (never from which rows exist).
The public methods are on :class:`~.store.TemplateStore`.
"""

from __future__ import annotations

from . import policy_change
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
            p.clock.now_us()  # a clock gone bad refuses the call before a key is saved
            bucket = vault.prepare_rotation(row.subject_ref)  # saved before the commit
            with p.gallery.changing([record_id]):
                with p.mutation():
                    vault.delete([record_id])
                    # out of the entry (the subject's last record: the entry goes), and
                    # the bucket resealed under its next key: old copies' entries die
                    gone = vault.unlist({row.subject_ref: [record_id]}, rotate=bucket)
                    gen = vault.stage(shred=gone, rotate=[bucket])
                    seq = p.trail.append("delete", actor=str(actor), gen=gen, **f)
                p.gallery.forget([record_id])  # committed: out of the index first
                p.gallery.drop_snapshot()  # it still holds the deleted template
            change = p.apply_key_change()
            vault.checkpoint()
            return DeleteReceipt(record_id=record_id,
                                 subject_key_destroyed=change.subjects_destroyed > 0,
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
            listed = sorted(set(vault.listed_ids(ref)) | set(ids))  # missing rows too
            p.clock.now_us()  # a clock gone bad refuses the call before a key is saved
            bucket = vault.prepare_rotation(ref)  # always: an older copy's entry dies
            with p.gallery.changing(listed):
                with p.mutation():
                    n = vault.delete(ids)
                    gone = vault.unlist({ref: None}, rotate=bucket)
                    gen = vault.stage(shred=gone, rotate=[bucket])
                    seq = p.trail.append("erase", actor=str(actor), count=n, gen=gen, **f)
                p.gallery.forget(listed)  # committed: out of the index before anything
            change = p.apply_key_change()
            vault.checkpoint()
            return ErasureReceipt(subject_ref=ref.hex(), records_erased=n,
                                  key_destroyed=change.subjects_destroyed > 0,
                                  at=from_us(p.clock.now_us()), audit_seq=seq)


def purge_expired(p: Parts) -> PurgeReport:
    """The ordering of :meth:`TemplateStore.purge_expired`."""
    p.alive()
    vault = p.vault
    with p.lock:
        now_us = p.clock.now_us()
        expired = vault.rows.expired(now_us)
        held = [r for r in expired if vault.held(r.subject_ref)]
        target = epoch_of(now_us, vault.epoch_us)
        below = vault.rows.below_epoch(target)
        doomed = {r.record_id for r in (*expired, *below) if not vault.held(r.subject_ref)}
        strays = _unsealed_for_hold(p)
        before = vault.ratchet_epoch
        with p.gallery.changing([*doomed, *(s.record_id for s in strays)]):
            with p.mutation():
                vault.update(strays)
                n = vault.delete(sorted(doomed))
                # Out of their entries, and a subject's key goes when its entry lists no id
                # any more: decided from the entries, so rows that vanished behind the
                # store's back stay listed and never cost a key. No bucket is rotated: the
                # ratchet step makes the purged records unreadable in every copy.
                by_subject: dict[bytes, list[str]] = {}
                for r in (*expired, *below):
                    if r.record_id in doomed:
                        by_subject.setdefault(r.subject_ref, []).append(r.record_id)
                gone = vault.unlist(by_subject)
                released = vault.released_holds_without_rows()
                gen = vault.stage(shred=gone, ratchet_to=target,
                                  holds=dict.fromkeys(released, True))
                seq = p.trail.append("purge", actor=None, count=n, held_retained=len(held),
                                     epoch_before=before, epoch_after=max(before, target),
                                     gen=gen)
            p.gallery.forget(sorted(doomed))  # committed: out of the index first
            p.gallery.remember(strays)  # resealed under their hold key
        if doomed:
            p.gallery.drop_snapshot()  # it may still hold purged templates
        change = p.apply_key_change()
        vault.checkpoint()
        return PurgeReport(purged=n, held_retained=len(held), epoch_before=before,
                           epoch_after=vault.ratchet_epoch,
                           subject_keys_destroyed=change.subjects_destroyed,
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
                    p.gallery.report_failure(row.record_id)  # left out
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
            rows = [r for r in vault.rows.by_subject(ref) if vault.listed(ref, r.record_id)
                    and (r.held or r.epoch >= vault.ratchet_epoch)]
            if not rows:
                raise RecordNotFound("the subject has no record to hold")
            previous = vault.open_hold(ref)  # the key is saved before rows use it
            try:
                moved = [vault.reseal(r, held=True) for r in rows if not r.held]
                with p.gallery.changing([m.record_id for m in moved]):
                    with p.mutation():
                        vault.update(moved)
                        # no key is destroyed, but the hold takes a generation, so one
                        # audited and never committed is seen on open like any change
                        gen = vault.stage(hold_keys=[ref])
                        seq = p.trail.append("hold", actor=str(actor), count=len(rows),
                                             gen=gen, **f)
                    p.gallery.remember(moved)
            except BaseException:
                vault.restore_hold(ref, previous)
                raise
            p.apply_key_change()
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
            rows = [r for r in vault.rows.by_subject(ref)
                    if r.held and vault.listed(ref, r.record_id)]
            back = [vault.reseal(r, held=False) for r in rows
                    if r.epoch >= vault.ratchet_epoch]
            with p.gallery.changing([b.record_id for b in back]):
                with p.mutation():
                    vault.update(back)
                    # the hold key goes unless expired records are still sealed under it
                    gen = vault.stage(holds={ref: len(back) == len(rows)})
                    seq = p.trail.append("release", actor=str(actor), count=len(rows), gen=gen,
                                         **f)
                p.gallery.remember(back)
            p.apply_key_change()
            return HoldReceipt(subject_ref=ref.hex(), records=len(rows), active=False,
                               audit_seq=seq)


def set_policy(p: Parts, policy: RetentionPolicy, *, actor: str,
               reason: str | None = None) -> PolicyReceipt:
    """The ordering of :meth:`TemplateStore.set_policy`: the records a tighter policy
    shortens (``policy_change``) are resealed, their subjects' buckets rotated, and the
    policy stored, all in one records transaction with the audit entry."""
    with p.audited("policy", actor, reason=reason) as f:
        check_text(reason, "reason", optional=True)
        if not isinstance(policy, RetentionPolicy):
            raise InvalidInput("policy must be a RetentionPolicy")
        current = p.vault.policy
        if policy.epoch != current.epoch:
            raise PolicyViolation("the epoch length is fixed when the store is created "
                                  f"({format_duration(current.epoch)})")
        with p.lock:  # no enrolment can slip in between the plan and the change
            plan = policy_change.shortening(p.vault, current, policy, p.clock.now_us())
            rows = plan.rows
            with p.gallery.changing([r.record_id for r in rows]):
                seq = p.vault.replace_policy(policy, lambda gen: p.trail.append(
                    "policy", actor=str(actor), policy=policy.to_dict(), gen=gen,
                    records_shortened=len(rows), records_expired=plan.expired, **f),
                    p.mutation, shortened=rows)
                p.gallery.shorten(rows)  # committed: searches see the new expiry
            p.apply_key_change()
            if rows:
                p.gallery.drop_snapshot()  # sealed under a key that died with the buckets
            return PolicyReceipt(digest=policy_digest(policy).hex(), audit_seq=seq,
                                 records_shortened=len(rows), records_expired=plan.expired)
