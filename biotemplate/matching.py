"""The open-set rules of 1:N search and 1:1 verification, as pure functions.

Open-set by default: "identification" returns only candidates at or above the purpose's
threshold (an empty list is a normal answer, and the right one for a stranger);
"investigation", where the policy allows it, returns up to k, each marked
``above_threshold``. At most one candidate per subject, best first. ``decision`` is NIST's:
True when at least one candidate is at or above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from .errors import InvalidInput, PolicyViolation
from .index import Hit
from .policy import Purpose, RetentionPolicy
from .results import Candidate
from .validation import check_text, normalised

SEARCH_MODES = ("identification", "investigation")


def search_rule(policy: RetentionPolicy, purpose: str, mode: str, k: object,
                reason: object) -> Purpose:
    """The purpose a search runs under, once its mode, k and reason are checked.

    Raises:
        InvalidInput: bad mode, k or reason. PolicyViolation: unknown purpose, or the
            mode is not allowed for it.
    """
    check_text(reason, "reason", optional=True)
    if mode not in SEARCH_MODES:
        raise InvalidInput(f"mode must be one of {SEARCH_MODES}")
    rule = policy.purpose(purpose)
    if not rule.allows_mode(mode):
        raise PolicyViolation(f"mode {mode!r} is not allowed for purpose {rule.name!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput("k must be a positive int")
    return rule


def candidates(hits: Sequence[Hit], rule: Purpose, mode: str,
               subject_of: Callable[[str], str | None]) -> tuple[list[Candidate], bool]:
    """Apply the open-set rule to index hits: (candidates, decision)."""
    t = rule.match_threshold
    if mode == "identification":
        hits = [h for h in hits if h.score >= t]
    # A record removed while this search ran has no subject any more: drop it.
    named = [(h, sid) for h in hits if (sid := subject_of(h.record_id))]
    cands = [Candidate(record_id=h.record_id, subject_id=sid, score=float(h.score),
                       rank=i + 1, above_threshold=bool(h.score >= t))
             for i, (h, sid) in enumerate(named)]
    return cands, any(c.above_threshold for c in cands)


def cosine(template: NDArray[np.float32], unit: NDArray[np.float32]) -> float:
    """Cosine similarity of a stored template and a unit probe, clipped to [-1, 1]."""
    score = float(np.dot(normalised(template[None, :])[0], unit))
    return max(-1.0, min(1.0, score))
