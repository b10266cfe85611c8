"""Merging the answers of a partitioned gallery into the answer of one index.

A large gallery is split by subject into n partitions (``TemplateStore.open(url,
partition=(i, n))``): each instance indexes only the subjects whose keyed ref falls in its
partition, so every subject is in exactly one. A service sends the probe to one instance
of each partition, with the same purpose, mode and ``k``, and merges the n answers here.

Why this gives what one index over all subjects gives: each partition returns its best
``k`` subjects (at most one candidate per subject, its best record) by the same score,
and the overall best ``k`` subjects are each among the best ``k`` of their own partition.
So the union sorted by score and cut to ``k`` is the single-index list: same candidates,
same order (ties broken by record id, as no index promises an order for them), same
decision. With an approximate (HNSW) index each partition searches a smaller graph, so its
recall is at least that of one large graph at the same ``ef``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidInput
from .results import Candidate, SearchResult

__all__ = ["merge_results"]


def merge_results(results: Sequence[SearchResult], *, k: int) -> SearchResult:
    """The answer one index would give, from the answers of all n partitions to one probe.

    Each input must come from a different partition's search for the same probe, purpose
    and mode, asked with at least ``k`` candidates. The merged result keeps every
    partition's audit entry (``audit_seqs``), and for each candidate the entry of the
    search that returned it (``audit_seq_of``, for ``confirm_match``).

    Raises:
        InvalidInput: no results, a bad ``k``, or results of different purposes, modes or
            thresholds (answers to different questions cannot be merged).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput("k must be a positive int")
    if not results or not all(isinstance(r, SearchResult) for r in results):
        raise InvalidInput("results must be a non-empty list of SearchResult")
    first = results[0]
    for r in results[1:]:
        if (r.purpose, r.mode, r.threshold) != (first.purpose, first.mode, first.threshold):
            raise InvalidInput("the results answer different searches (purpose, mode or "
                               "threshold differ): merge one probe's partition answers only")
    best: dict[str, tuple[Candidate, int]] = {}
    for r in results:
        for c in r.candidates:
            held = best.get(c.subject_id)
            if held is None or (c.score, held[0].record_id) > (held[0].score, c.record_id):
                best[c.subject_id] = (c, r.audit_seq)
    ranked = sorted(best.values(), key=lambda cs: (-cs[0].score, cs[0].record_id))[:k]
    candidates = [Candidate(record_id=c.record_id, subject_id=c.subject_id, score=c.score,
                            rank=i + 1, above_threshold=c.above_threshold)
                  for i, (c, _) in enumerate(ranked)]
    return SearchResult(candidates=candidates,
                        decision=any(c.above_threshold for c in candidates),
                        threshold=first.threshold, mode=first.mode, purpose=first.purpose,
                        audit_seq=ranked[0][1] if ranked else first.audit_seq,
                        audit_seqs=tuple(r.audit_seq for r in results),
                        sources=tuple(seq for _, seq in ranked))
