"""1:N search, 1:1 verification and the human review of candidates.

Open-set by default: identification returns only candidates at or above the purpose's
threshold, and every search or verification is audited with a keyed digest of the probe
(never the probe itself) before it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from . import records as rec
from ._core import (
    SEARCH_MODES,
    StoreCore,
)
from .errors import (
    InvalidInput,
    PolicyViolation,
    RecordNotFound,
)
from .index import Hit
from .policy import Purpose
from .results import (
    Candidate,
    Confirmation,
    SearchResult,
    Verification,
)


class Matching(StoreCore):
    """search, search_many, verify and confirm_match."""

    def search(self, probe: object, *, purpose: str, k: int = 10, actor: str,
               reason: str | None = None, mode: str = "identification") -> SearchResult:
        """1:N search among the live records enrolled for ``purpose``.

        Open-set: in "identification" mode only candidates at or above the purpose's
        threshold are returned (often none); "investigation" returns up to k, each marked.
        At most one candidate per subject; ``k`` is capped by the purpose's max_candidates.

        Raises:
            InvalidTemplate: bad probe. InvalidInput: bad k or mode.
            PolicyViolation: unknown purpose, or the mode is not allowed for it.
        """
        started = self._clock()
        with self._audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
            rule = self._search_rule(purpose, mode, k, reason)
            vec = rec.unit_template(probe, self.dim)
            hits = self._index.search_units(vec[None, :], purpose, min(k, rule.max_candidates),
                                            self._now_us())[0]
            return self._answer(vec, hits, rule, mode, k, str(actor), started, f)

    def search_many(self, probes: object, *, purpose: str, k: int = 10, actor: str,
                    reason: str | None = None, mode: str = "identification",
                    ) -> list[SearchResult]:
        """:meth:`search` for a batch of probes (shape (n, dim)), one result per probe,
        using the index's multi-threaded batch query. Audited as one entry per probe, so
        each result's ``audit_seq`` works with :meth:`confirm_match`.

        Raises:
            As :meth:`search`; a bad row fails the whole batch before anything is searched.
        """
        started = self._clock()
        with self._audited("search", actor, purpose=purpose, mode=mode, reason=reason) as f:
            rule = self._search_rule(purpose, mode, k, reason)
            vecs = rec.normalised(rec.as_templates(probes, self.dim))
            lists = self._index.search_units(vecs, purpose, min(k, rule.max_candidates),
                                             self._now_us())
            return [self._answer(v, hits, rule, mode, k, str(actor), started, f)
                    for v, hits in zip(vecs, lists, strict=True)]

    def _search_rule(self, purpose: str, mode: str, k: object, reason: object) -> Purpose:
        rec.check_text(reason, "reason", optional=True)
        if mode not in SEARCH_MODES:
            raise InvalidInput(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        rule = self._policy.purpose(purpose)
        if not rule.allows_mode(mode):
            raise PolicyViolation(f"mode {mode!r} is not allowed for purpose {purpose!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInput("k must be a positive int")
        return rule

    def _answer(self, vec: np.ndarray[Any, Any], hits: Sequence[Hit], rule: Purpose, mode: str,
                k: int, actor: str, started: datetime, fields: dict[str, Any]) -> SearchResult:
        """Apply the open-set rule to index hits, audit, and build the result."""
        t = rule.match_threshold
        if mode == "identification":
            hits = [h for h in hits if h.score >= t]
        # A record removed while this search ran has no subject any more: drop it.
        named = [(h, sid) for h in hits if (sid := self._subjects.get(h.record_id))]
        cands = [Candidate(record_id=h.record_id, subject_id=sid, score=float(h.score),
                           rank=i + 1, above_threshold=bool(h.score >= t))
                 for i, (h, sid) in enumerate(named)]
        decision = any(c.above_threshold for c in cands)
        seq = self._trail.append(
            "search", actor=actor, started=started, durable=False, k=k, threshold=t,
            count=len(cands), decision=decision, probe_digest=self._digest(vec),
            record_ids=[c.record_id for c in cands],
            scores=[round(c.score, 6) for c in cands], **fields)
        return SearchResult(candidates=cands, decision=decision, threshold=t, mode=mode,
                            purpose=rule.name, audit_seq=seq)

    def verify(self, probe: object, *, subject_id: str, purpose: str, actor: str,
               reason: str | None = None) -> Verification:
        """1:1: compare a probe with the subject's live records for ``purpose`` (best score).

        Raises:
            RecordNotFound: the subject has no live record for this purpose.
            PolicyViolation: unknown purpose or verification not allowed for it.
            IntegrityError: one of the subject's records was tampered with.
        """
        started = self._clock()
        with self._audited("verify", actor, purpose=purpose, reason=reason) as f:
            rec.check_text(reason, "reason", optional=True)
            rec.check_text(subject_id, "subject_id", limit=rec.MAX_SUBJECT_ID)
            rule = self._policy.purpose(purpose)
            if not rule.allows_mode("verification"):
                raise PolicyViolation(f"purpose {purpose!r} does not allow verification")
            vec = rec.normalised(rec.as_template(probe, self.dim)[None, :])[0]
            now_us = self._now_us()
            best: tuple[float, str] | None = None
            for row in self._db.by_subject(self._keyring.subject_ref(subject_id)):
                if purpose not in row.purposes:
                    continue  # never decrypt data outside the declared purpose
                plain = self._readable(row, now_us, for_export=False)
                if plain is None:
                    continue
                score = float(np.dot(rec.normalised(plain.template[None, :])[0], vec))
                if best is None or score > best[0]:
                    best = (score, row.record_id)
            if best is None:
                raise RecordNotFound(f"no live record of this subject for purpose {purpose!r}")
            score = max(-1.0, min(1.0, best[0]))
            match = score >= rule.match_threshold
            seq = self._trail.append("verify", actor=str(actor), started=started,
                                     durable=False, match=match, score=round(score, 6),
                                     record_ids=[best[1]], probe_digest=self._digest(vec),
                                     **f)
            return Verification(match=match, score=score, record_id=best[1],
                                threshold=rule.match_threshold, audit_seq=seq)

    def confirm_match(self, audit_seq: int, record_id: str, *, reviewer: str) -> Confirmation:
        """Record a human reviewer's confirmation of a candidate of search ``audit_seq``.

        Raises:
            RecordNotFound: no search with that audit sequence number.
            PolicyViolation: ``record_id`` was not a candidate of that search.
        """
        with self._audited("confirm", reviewer, who="reviewer", search_seq=audit_seq,
                           record_id=rec.loggable_record_id(record_id)):
            if isinstance(audit_seq, bool) or not isinstance(audit_seq, int):
                raise InvalidInput("audit_seq must be the int from SearchResult.audit_seq")
            if not 1 <= audit_seq < 1 << 63:
                raise RecordNotFound(f"no audit entry {audit_seq}")
            entry = self._trail.get(audit_seq)
            if entry.event != "search" or entry.outcome != "ok":
                raise RecordNotFound(f"audit entry {audit_seq} is not a completed search")
            if record_id not in entry.fields.get("record_ids", []):
                raise PolicyViolation(f"that record was not a candidate of search {audit_seq}")
            with self._lock:
                before = {e.actor for e in self._trail.find("confirm", audit_seq)
                          if e.outcome == "ok" and e.fields.get("record_id") == record_id}
                who = tuple(sorted({a for a in before if a} | {reviewer}))
                seq = self._trail.append("confirm", actor=reviewer, ref_seq=audit_seq,
                                         record_id=record_id, reviewers=len(who),
                                         two_person=len(who) >= 2)
            return Confirmation(search_seq=audit_seq, record_id=record_id, reviewers=who,
                                two_person_confirmed=len(who) >= 2, audit_seq=seq)
