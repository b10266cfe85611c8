"""1:N search, 1:1 verification, the human review of candidates, and access requests.

The public methods are on :class:`~.store.TemplateStore`; this module orders them over the
store's parts. Every search or verification is audited with a keyed digest of the probe
(never the probe) before it returns.

Open-set by default: "identification" returns only candidates at or above the purpose's
threshold (an empty list is a normal answer, and the right one for a stranger);
"investigation", where the policy allows it, returns up to k, each marked
``above_threshold``. At most one candidate per subject, best first. ``decision`` is NIST's:
True when at least one candidate is at or above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import NDArray

from ._calls import Parts, subject_field
from .clock import from_us
from .codec import Unlisted
from .errors import InvalidInput, PolicyViolation, RecordNotFound
from .index import Hit
from .policy import Purpose, RetentionPolicy
from .results import Candidate, Confirmation, RecordView, SearchResult, Verification
from .validation import (
    as_templates,
    check_subject_id,
    check_text,
    loggable_record_id,
    normalised,
    shown,
    unit_template,
)

SEARCH_MODES = ("identification", "investigation")


def search_rule(policy: RetentionPolicy, purpose: str, mode: str, k: object,
                reason: object) -> Purpose:
    """The purpose a search runs under, once its mode, k and reason are checked.

    Raises:
        InvalidInput: bad mode, k or reason. PolicyViolation: unknown purpose, or the
            mode is not allowed for it.
    """
    check_text(reason, "reason", optional=True)
    if not isinstance(mode, str) or mode not in SEARCH_MODES:  # an array must not compare
        raise InvalidInput(f"mode must be one of {SEARCH_MODES}, got {shown(mode)}")
    rule = policy.purpose(purpose)
    if not rule.allows_mode(mode):
        raise PolicyViolation(f"mode {mode!r} is not allowed for purpose {rule.name!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput("k must be a positive int")
    return rule


def candidates(hits: Sequence[Hit], rule: Purpose, mode: str,
               subject_of: Callable[[str], str | None]) -> tuple[list[Candidate], bool]:
    """Apply the open-set rule to index hits: (candidates, decision)."""
    t, open_set = rule.match_threshold, mode == "identification"
    cands: list[Candidate] = []
    decision = False
    for h in hits:
        above = h.score >= t
        if open_set and not above:
            continue
        sid = subject_of(h.record_id)
        if not sid:  # a record removed while this search ran has no subject any more
            continue
        cands.append(Candidate(h.record_id, sid, float(h.score), len(cands) + 1, above))
        decision = decision or above
    return cands, decision


def cosine(template: NDArray[np.float32], unit: NDArray[np.float32]) -> float:
    """Cosine similarity of a stored template and a unit probe, clipped to [-1, 1]."""
    score = float(np.dot(normalised(template[None, :])[0], unit))
    return max(-1.0, min(1.0, score))


def search(p: Parts, probes: object, purpose: str, k: int, actor: str, reason: str | None,
           mode: str, *, batch: bool) -> list[SearchResult]:
    """The ordering of :meth:`TemplateStore.search` (one probe) and ``search_many``.

    A batch is searched in steps of ``STEP`` probes: the index searches the next step in
    a worker thread (hnswlib lets go of the GIL) while this one confirms and audits the
    last, so the second core is not idle while Python works. Each step's candidates are
    confirmed in one query and its entries written in one commit; an entry's
    ``unconfirmed`` counts its step's. A failure part way leaves the steps before it
    audited (they were searched) and raises.
    """
    now_us = p.clock.now_us()  # one reading: the entry's ts0 and the expiry cut-off
    started = from_us(now_us)
    with p.audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
        rule = search_rule(p.vault.policy, purpose, mode, k, reason)
        units = (normalised(as_templates(probes, p.vault.dim)) if batch
                 else unit_template(probes, p.vault.dim)[None, :])
        threshold, name, gallery = rule.match_threshold, rule.name, p.gallery
        suspects = gallery.trusted()  # before the index walk: see Gallery.trusted
        out: list[SearchResult] = []
        for i, (step, lists) in enumerate(_searched(p, units, purpose,
                                                   min(k, rule.max_candidates), now_us)):
            if i:  # a long batch: another connection may have committed since the last step
                suspects = gallery.trusted()
            if mode == "identification":  # only what can become a candidate is confirmed
                lists = [[h for h in hits if h.score >= threshold] for hits in lists]
            lists, dropped = gallery.confirm(lists, now_us, suspects)
            fields = {**f, "unconfirmed": dropped} if dropped else f
            found = [candidates(hits, rule, mode, gallery.subject_of) for hits in lists]
            entries = [{"k": k, "threshold": threshold, "count": len(cands),
                        "decision": decision, "probe_digest": p.vault.probe_digest(unit),
                        "record_ids": [c.record_id for c in cands],
                        "scores": [round(c.score, 6) for c in cands], **fields}
                       for unit, (cands, decision) in zip(step, found, strict=True)]
            if batch:  # one commit for the step's entries
                seqs = p.trail.append_many("search", entries, actor=str(actor),
                                           started=started)
            else:
                seqs = [p.trail.append("search", actor=str(actor), started=started,
                                       durable=False, **entries[0])]
            out.extend(SearchResult(cands, decision, threshold, mode, name, seq)
                       for (cands, decision), seq in zip(found, seqs, strict=True))
        return out


STEP = 128  # probes per step of a batch (see ``search``)


def _searched(p: Parts, units: NDArray[np.float32], purpose: str, k: int,
              now_us: int) -> Iterator[tuple[NDArray[np.float32], list[list[Hit]]]]:
    """(probes, the index's hits for them), step by step; the next step is searched in
    a worker thread while the caller handles this one."""
    if len(units) <= STEP:
        yield units, p.gallery.search(units, purpose, k, now_us)
        return
    steps = [units[i : i + STEP] for i in range(0, len(units), STEP)]
    with ThreadPoolExecutor(1, thread_name_prefix="biotemplate-search") as pool:
        ahead = pool.submit(p.gallery.search, steps[0], purpose, k, now_us)
        for i, step in enumerate(steps):
            lists = ahead.result()
            if i + 1 < len(steps):
                ahead = pool.submit(p.gallery.search, steps[i + 1], purpose, k, now_us)
            yield step, lists


def verify(p: Parts, probe: object, *, subject_id: str, purpose: str, actor: str,
           reason: str | None = None) -> Verification:
    """The ordering of :meth:`TemplateStore.verify`."""
    started = p.clock()
    with p.audited("verify", actor, purpose=purpose, reason=reason) as f:
        check_text(reason, "reason", optional=True)
        subject_id = check_subject_id(subject_id)
        rule = p.vault.policy.purpose(purpose)
        if not rule.allows_mode("verification"):
            raise PolicyViolation(f"purpose {purpose!r} does not allow verification")
        unit = unit_template(probe, p.vault.dim)
        now_us, vault = p.clock.now_us(), p.vault
        scored = []
        with p.lock.reading():  # a shared store: the newest keys and entries
            for row in vault.rows.by_subject(vault.subject_ref(subject_id)):
                if purpose not in row.purposes:
                    continue  # never decrypt data outside the declared purpose
                try:
                    plain = vault.readable(row, now_us, for_export=False)
                except Unlisted:  # a row the store deleted, put back: never live again
                    p.gallery.exclude([row.record_id])
                    continue
                if plain is not None:
                    scored.append((cosine(plain.template, unit), row.record_id))
        if not scored:
            raise RecordNotFound(f"no live record of this subject for purpose {purpose!r}")
        score, record_id = max(scored, key=lambda s: s[0])
        match = score >= rule.match_threshold
        seq = p.trail.append("verify", actor=str(actor), started=started,
                             durable=False, match=match, score=round(score, 6),
                             record_ids=[record_id],
                             probe_digest=vault.probe_digest(unit), **f)
        return Verification(match=match, score=score, record_id=record_id,
                            threshold=rule.match_threshold, audit_seq=seq)


def confirm_match(p: Parts, audit_seq: int, record_id: str, *, reviewer: str) -> Confirmation:
    """The ordering of :meth:`TemplateStore.confirm_match`."""
    with p.audited("confirm", reviewer, who="reviewer", search_seq=audit_seq,
                   record_id=loggable_record_id(record_id)):
        if isinstance(audit_seq, bool) or not isinstance(audit_seq, int):
            raise InvalidInput("audit_seq must be the int from SearchResult.audit_seq")
        if not 1 <= audit_seq < 1 << 63:
            raise RecordNotFound(f"no audit entry {audit_seq}")
        entry = p.trail.get(audit_seq)
        if entry.event != "search" or entry.outcome != "ok":
            raise RecordNotFound(f"audit entry {audit_seq} is not a completed search")
        if record_id not in entry.fields.get("record_ids", []):
            raise PolicyViolation(f"that record was not a candidate of search {audit_seq}")
        with p.lock:
            before = {e.actor for e in p.trail.find("confirm", audit_seq)
                      if e.outcome == "ok" and e.fields.get("record_id") == record_id}
            who = tuple(sorted({a for a in before if a} | {reviewer}))
            seq = p.trail.append("confirm", actor=reviewer, ref_seq=audit_seq,
                                 record_id=record_id, reviewers=len(who),
                                 two_person=len(who) >= 2)
        return Confirmation(search_seq=audit_seq, record_id=record_id, reviewers=who,
                            two_person_confirmed=len(who) >= 2, audit_seq=seq)


def export_subject(p: Parts, subject_id: str, *, actor: str,
                   reason: str | None = None) -> list[RecordView]:
    """The ordering of :meth:`TemplateStore.export_subject`."""
    with p.audited("export", actor, reason=reason) as f:
        check_text(reason, "reason", optional=True)
        ref = subject_field(p.vault, subject_id, f)
        now_us, vault, views = p.clock.now_us(), p.vault, []
        with p.lock.reading():  # a shared store: the newest keys and entries
            for row in vault.rows.by_subject(ref):
                try:
                    plain = vault.readable(row, now_us, for_export=True)
                except Unlisted:  # a row the store deleted, put back: never live again
                    p.gallery.exclude([row.record_id])
                    continue
                if plain is None:
                    continue
                views.append(RecordView(
                    record_id=row.record_id, subject_id=plain.subject_id,
                    template=plain.template.copy(), purposes=row.purposes,
                    expires_at=from_us(row.expiry_us), created_at=from_us(plain.created_us),
                    source=plain.source, metadata=dict(plain.metadata),
                    held=row.held and vault.held(ref)))
        p.trail.append("export", actor=str(actor), count=len(views), **f)
        return views

