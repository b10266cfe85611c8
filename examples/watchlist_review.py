"""Watch-list review: identification, an investigation list with weak candidates marked,
and two reviewers confirming a candidate before anyone acts on it.

Who it is for: an engineer building the review screen of a 1:N system (EU AI Act
Art. 14(5): for remote biometric identification, no action on a match until two people
have separately verified it). It shows:

1. **Identification is open-set.** ``mode="identification"`` returns only candidates at
   or above the purpose's threshold, so a person who is not on the list usually gets an
   empty answer, and ``decision`` (NIST's term) says whether anything matched.
2. **Investigation marks weak candidates.** ``mode="investigation"`` (only where the
   policy allows it) returns up to ``k`` candidates for a human to look through, each with
   ``above_threshold``; a candidate below the threshold is a lead, not a match.
3. **Two reviewers.** ``confirm_match(search_seq, record_id, reviewer=...)`` records each
   reviewer's confirmation against the audited search; ``two_person_confirmed`` is True
   only once two different people confirmed the same candidate (the same person twice
   does not count). Only a candidate of that search can be confirmed.

Every search names a reason (a case number) and lands in the audit trail with a keyed
digest of the probe, before the result is returned.

Runs as it is, on synthetic templates. The threshold (0.55) suits the synthetic data
only: calibrate your face model's own (docs/developers.md).
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import biotemplate as bt
from biotemplate.synthetic import make_gallery, non_mated, probes

POLICY = {
    "epoch": "1d",
    "purposes": {
        "watchlist": {
            "description": "persons sought under a court order",
            "max_retention": "1y",
            "modes": ["identification", "investigation"],
            "match_threshold": 0.55,   # synthetic data; calibrate for your model
            "max_candidates": 20,      # an investigation list is never longer
            "allowed_sources": ["case-file/"],
        },
    },
}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="biotemplate-watchlist-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def show(title: str, res: bt.SearchResult) -> None:
    print(f"{title}: decision={res.decision}, {len(res.candidates)} candidate(s) "
          f"(threshold {res.threshold}, audit entry {res.audit_seq})")
    for c in res.candidates:
        mark = "MATCH" if c.above_threshold else "weak: a lead, not a match"
        print(f"   {c.rank}. {c.subject_id}  {c.score:.3f}  {mark}")


def run(work: Path) -> None:
    keys = bt.FileKeyProvider.generate(work / "master.key")
    sought = make_gallery(200, 2, 256, seed=21, prefix="W-")
    with bt.TemplateStore.create(work / "watchlist", dim=256, model="faces-v3",
                                 policy=bt.RetentionPolicy.from_dict(POLICY),
                                 key_provider=keys) as store:
        store.enroll_many(sought.templates, subject_ids=sought.subject_ids,
                          purposes=["watchlist"], ttl=timedelta(days=180),
                          source="case-file/2026-118", actor="case-officer-4")

        # A camera still of someone on the list, and of someone who is not.
        on_list = probes(sought, [42], seed=3)[0]
        passer_by = non_mated(sought, 1, seed=4)[0]
        show("identification, person on the list",
             store.search(on_list, purpose="watchlist", actor="analyst-17",
                          reason="case 2026-118"))
        show("identification, a passer-by",
             store.search(passer_by, purpose="watchlist", actor="analyst-17",
                          reason="case 2026-118"))

        # The investigation list: the best 5, each marked.
        res = store.search(on_list, purpose="watchlist", k=5, mode="investigation",
                           actor="analyst-17", reason="case 2026-118")
        show("investigation list", res)

        top = res.candidates[0]
        first = store.confirm_match(res.audit_seq, top.record_id, reviewer="officer-2")
        print(f"officer-2 confirms {top.subject_id}: two-person confirmed = "
              f"{first.two_person_confirmed}")
        again = store.confirm_match(res.audit_seq, top.record_id, reviewer="officer-2")
        print(f"officer-2 again: two-person confirmed = {again.two_person_confirmed} "
              "(the same person twice is one reviewer)")
        second = store.confirm_match(res.audit_seq, top.record_id, reviewer="officer-9")
        print(f"officer-9 confirms: reviewers {second.reviewers}, two-person confirmed = "
              f"{second.two_person_confirmed}: now someone may act on it")

        # Only a candidate of that very search can be confirmed.
        other = store.search(passer_by, purpose="watchlist", k=3, mode="investigation",
                             actor="analyst-17", reason="case 2026-118")
        try:
            store.confirm_match(res.audit_seq, other.candidates[-1].record_id,
                                reviewer="officer-9")
        except bt.PolicyViolation as exc:
            print(f"confirming a record the search did not return is refused: {exc}")
        assert second.two_person_confirmed and not first.two_person_confirmed
        assert store.audit.verify().ok


if __name__ == "__main__":
    main()
