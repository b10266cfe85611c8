"""Stateful property test: a real TemplateStore driven against a plain-dict model.

Hypothesis interleaves enrolments, deletions, erasures, clock moves, purges, legal holds,
searches, verifications, index rebuilds and close/reopen cycles (from the sealed snapshot
or by a rebuild); after every step the store must agree with the model:

- search never returns a record that is expired (expiry <= clock), erased, deleted, purged
  or not enrolled for the searched purpose, and every candidate names the right subject;
- an investigation search returns every subject with a live record for the purpose, each
  with the score of its best live record (the galleries are tiny, so search is exact);
- searching with a live record's own template ranks its subject first with score ~1.0;
- verify scores the subject's best live record for the purpose, expired held ones excluded;
- export_subject returns exactly the model's live records, plus expired ones only while the
  subject is under legal hold (held expired records survive purges);
- the audit trail verifies.

State machines get no pytest fixtures, so the machine makes its own temp folder and clock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

import biotemplate as bt

DIM = 16
MODEL = "prop-model-v1"
ACTOR = "prop-tester"
SUBJECTS = tuple(f"S-{i}" for i in range(6))
PURPOSES = ("a", "b")
THRESHOLD = 0.5
START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
POLICY: dict[str, Any] = {
    "epoch": "1h",
    "purposes": {
        "a": {"max_retention": "2d", "default_retention": "1d",
              "modes": ["identification", "investigation", "verification"],
              "match_threshold": THRESHOLD},
        "b": {"max_retention": "10d", "modes": ["identification", "investigation"],
              "match_threshold": THRESHOLD},
    },
}
A_DEFAULT = timedelta(days=1)
# Durability is not under test here: a tmpfs folder keeps the many fsyncs (every audited
# call, every keyring save) from dominating the run time.
TMP_ROOT = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# One orthonormal direction per subject: a template of one subject (its centre plus a little
# noise) scores ~0.9 against the subject's other templates and ~0 against anyone else's.
_CENTRES = np.linalg.qr(np.random.default_rng(20260301).standard_normal((DIM, DIM)))[0].T
_NOISE = 0.1


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def subject_template(subject: str, seed: int) -> np.ndarray:
    centre = _CENTRES[SUBJECTS.index(subject)]
    return _unit(centre + _NOISE * np.random.default_rng(seed).standard_normal(DIM))


def random_template(seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).standard_normal(DIM))


class Clock:
    """The injected clock: the test moves ``now``; the store only reads it."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass
class ModelRecord:
    subject: str
    purposes: frozenset[str]
    expiry: datetime
    template: np.ndarray  # unit float32


class StoreMachine(RuleBasedStateMachine):
    records = Bundle("records")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="bt-prop-", dir=TMP_ROOT))
        self.clock = Clock(START)
        self.keys = bt.FileKeyProvider.generate(self.tmp / "master.key")
        self.folder = self.tmp / "store"
        self.store = bt.TemplateStore.create(
            self.folder, dim=DIM, model=MODEL, policy=bt.RetentionPolicy.from_dict(POLICY),
            key_provider=self.keys, clock=self.clock)
        self.rows: dict[str, ModelRecord] = {}  # rows still in records.db
        self.templates: dict[str, np.ndarray] = {}  # every record ever enrolled
        self.holds: set[str] = set()

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- model helpers ---------------------------------------------------------------

    def live(self, rid: str) -> bool:
        row = self.rows.get(rid)
        return row is not None and row.expiry > self.clock.now

    def rows_of(self, subject: str) -> list[str]:
        return [rid for rid, r in self.rows.items() if r.subject == subject]

    def check_search(self, probe: np.ndarray, purpose: str, mode: str) -> bt.SearchResult:
        res = self.store.search(probe, purpose=purpose, k=20, mode=mode, actor=ACTOR,
                                reason="property test")
        now = self.clock.now
        q = _unit(np.asarray(probe, dtype=np.float64))
        assert res.mode == mode and res.threshold == THRESHOLD
        seen: set[str] = set()
        for i, c in enumerate(res.candidates):
            assert c.rank == i + 1
            row = self.rows.get(c.record_id)
            assert row is not None, "search returned a deleted, erased or purged record"
            assert row.expiry > now, "search returned an expired record"
            assert purpose in row.purposes, "search returned a record of another purpose"
            assert c.subject_id == row.subject
            assert c.subject_id not in seen, "two candidates for one subject"
            seen.add(c.subject_id)
            assert isinstance(c.score, float) and isinstance(c.above_threshold, bool)
            assert c.above_threshold == (c.score >= THRESHOLD)
            assert c.score == pytest.approx(float(q @ row.template), abs=1e-4)
        scores = [c.score for c in res.candidates]
        assert scores == sorted(scores, reverse=True)
        assert res.decision == any(c.above_threshold for c in res.candidates)
        # Completeness: each subject with a live record for the purpose, at its best score.
        best: dict[str, float] = {}
        for rid, row in self.rows.items():
            if self.live(rid) and purpose in row.purposes:
                best[row.subject] = max(best.get(row.subject, -2.0), float(q @ row.template))
        got = {c.subject_id: c.score for c in res.candidates}
        for subject, score in best.items():
            if mode == "identification" and abs(score - THRESHOLD) < 1e-4:
                continue  # float rounding may put it either side of the threshold
            if mode == "investigation" or score >= THRESHOLD:
                assert subject in got, f"search missed live subject {subject}"
                assert got[subject] == pytest.approx(score, abs=1e-4)
            else:
                assert subject not in got
        return res

    # --- rules -----------------------------------------------------------------------

    @initialize(target=records, batch=st.lists(
        st.tuples(st.sampled_from([("a",), ("b",), ("a", "b")]), st.integers(60, 2 * 24 * 60),
                  st.integers(0, 2**32 - 1)),
        min_size=len(SUBJECTS), max_size=len(SUBJECTS)))
    def populate(self, batch: list[tuple[tuple[str, ...], int, int]]) -> Any:
        """Start from one record per subject, so holds, purges and searches have work."""
        rids = [self._enroll(subject, purposes, ttl, seed)
                for subject, (purposes, ttl, seed) in zip(SUBJECTS, batch, strict=True)]
        return multiple(*[r for r in rids if r is not None])

    @rule(target=records, subject=st.sampled_from(SUBJECTS),
          purposes=st.sampled_from([("a",), ("b",), ("a", "b")]),
          ttl_minutes=st.one_of(st.none(), st.integers(60, 2 * 24 * 60)),
          seed=st.integers(0, 2**32 - 1))
    def enroll(self, subject: str, purposes: tuple[str, ...], ttl_minutes: int | None,
               seed: int) -> Any:
        rid = self._enroll(subject, purposes, ttl_minutes, seed)
        return multiple() if rid is None else rid

    def _enroll(self, subject: str, purposes: tuple[str, ...], ttl_minutes: int | None,
                seed: int) -> str | None:
        template = subject_template(subject, seed)
        ttl = None if ttl_minutes is None else timedelta(minutes=ttl_minutes)
        if ttl is None and "a" not in purposes:  # "b" has no default retention
            with pytest.raises(bt.PolicyViolation):
                self.store.enroll(template, subject_id=subject, purposes=list(purposes),
                                  ttl=ttl, actor=ACTOR)
            return None
        rid = self.store.enroll(template, subject_id=subject, purposes=list(purposes), ttl=ttl,
                                actor=ACTOR, source="prop")
        assert rid not in self.templates
        self.rows[rid] = ModelRecord(subject, frozenset(purposes),
                                     self.clock.now + (ttl or A_DEFAULT), template)
        self.templates[rid] = template
        return rid

    @rule(rid=records)
    def delete(self, rid: str) -> None:
        row = self.rows.get(rid)
        if row is None:
            with pytest.raises(bt.RecordNotFound):
                self.store.delete(rid, actor=ACTOR, reason="property test")
        elif row.subject in self.holds:
            with pytest.raises(bt.PolicyViolation):
                self.store.delete(rid, actor=ACTOR, reason="property test")
        else:
            self.store.delete(rid, actor=ACTOR, reason="property test")
            del self.rows[rid]

    @rule(subject=st.sampled_from(SUBJECTS))
    def erase(self, subject: str) -> None:
        if subject in self.holds:
            with pytest.raises(bt.PolicyViolation):
                self.store.erase_subject(subject, actor=ACTOR, reason="property test")
            return
        doomed = self.rows_of(subject)
        receipt = self.store.erase_subject(subject, actor=ACTOR, reason="property test")
        assert receipt.records_erased == len(doomed)
        for rid in doomed:
            del self.rows[rid]

    @rule(minutes=st.integers(0, 30 * 60))
    def advance_clock(self, minutes: int) -> None:
        self.clock.now += timedelta(minutes=minutes)

    @rule()
    def purge(self) -> None:
        now = self.clock.now
        expired = [rid for rid, r in self.rows.items() if r.expiry <= now]
        doomed = [rid for rid in expired if self.rows[rid].subject not in self.holds]
        kept = [rid for rid in expired if self.rows[rid].subject in self.holds]
        report = self.store.purge_expired()
        assert report.purged == len(doomed)
        assert report.held_retained == len(kept)
        assert report.epoch_after >= report.epoch_before
        for rid in doomed:
            del self.rows[rid]
        for rid in kept:  # held expired records survive the purge, still exportable
            assert rid in self.rows
        if kept:
            event("purge retained held expired records")
        if doomed:
            event("purge shredded records")

    @rule(subject=st.sampled_from(SUBJECTS))
    def place_hold(self, subject: str) -> None:
        mine = self.rows_of(subject)
        if not mine:
            with pytest.raises(bt.RecordNotFound):
                self.store.place_hold(subject, actor=ACTOR, reason="litigation")
            return
        assert self.store.place_hold(subject, actor=ACTOR, reason="litigation").records == len(mine)
        self.holds.add(subject)

    @rule(subject=st.sampled_from(SUBJECTS))
    def release_hold(self, subject: str) -> None:
        if subject not in self.holds:
            with pytest.raises(bt.PolicyViolation):
                self.store.release_hold(subject, actor=ACTOR, reason="case closed")
            return
        n = self.store.release_hold(subject, actor=ACTOR, reason="case closed").records
        assert n == len(self.rows_of(subject))
        self.holds.discard(subject)

    @rule(rid=records, purpose=st.sampled_from(PURPOSES),
          mode=st.sampled_from(["investigation", "investigation", "identification"]))
    def search_with_stored_template(self, rid: str, purpose: str, mode: str) -> None:
        res = self.check_search(self.templates[rid], purpose, mode)
        row = self.rows.get(rid)
        if self.live(rid) and row is not None and purpose in row.purposes:
            top = res.candidates[0]
            assert top.subject_id == row.subject
            assert top.record_id == rid
            assert top.score == pytest.approx(1.0, abs=1e-5)
            assert top.above_threshold and res.decision
            event("search: live record ranked first")

    @rule(rid=records, subject=st.sampled_from(SUBJECTS), purpose=st.sampled_from(PURPOSES))
    def verify(self, rid: str, subject: str, purpose: str) -> None:
        """1:1 against the subject's live records (held expired ones are never verified)."""
        probe = self.templates[rid]
        if purpose == "b":  # "b" does not allow verification
            with pytest.raises(bt.PolicyViolation):
                self.store.verify(probe, subject_id=subject, purpose=purpose, actor=ACTOR)
            return
        scores = {r: float(probe @ self.rows[r].template) for r in self.rows_of(subject)
                  if self.live(r) and purpose in self.rows[r].purposes}
        if not scores:
            with pytest.raises(bt.RecordNotFound):
                self.store.verify(probe, subject_id=subject, purpose=purpose, actor=ACTOR)
            return
        v = self.store.verify(probe, subject_id=subject, purpose=purpose, actor=ACTOR)
        best = max(scores.values())
        assert v.record_id in scores
        assert v.score == pytest.approx(best, abs=1e-4)
        assert scores[v.record_id] == pytest.approx(best, abs=1e-4)
        if abs(best - THRESHOLD) > 1e-4:
            assert v.match == (best >= THRESHOLD)

    @rule(seed=st.integers(0, 2**32 - 1), purpose=st.sampled_from(PURPOSES))
    def search_random_probe(self, seed: int, purpose: str) -> None:
        self.check_search(random_template(seed), purpose, "investigation")

    @rule(drop_snapshot=st.booleans())
    def reopen(self, drop_snapshot: bool) -> None:
        """Close and open again: from the sealed index snapshot, or (without one) by a
        rebuild from the sealed rows."""
        self.store.close()
        if drop_snapshot:
            (self.folder / "index.snapshot").unlink(missing_ok=True)
        self.store = bt.TemplateStore.open(self.folder, key_provider=self.keys,
                                           clock=self.clock)
        stats = self.store.stats()
        assert stats.integrity_failures == 0
        assert stats.shredded_rows == 0  # every row still present is readable
        live = sum(1 for rid in self.rows if self.live(rid))
        if drop_snapshot:
            assert stats.indexed == live
        else:  # a snapshot may still hold expired (hidden) records until the next purge
            assert live <= stats.indexed <= len(self.rows)

    @rule()
    def rebuild_index(self) -> None:
        assert self.store.rebuild_index().records == sum(1 for rid in self.rows if self.live(rid))

    # --- invariants ------------------------------------------------------------------

    @invariant()
    def exports_match_model(self) -> None:
        now = self.clock.now
        for subject in SUBJECTS:
            views = self.store.export_subject(subject, actor=ACTOR, reason="access request")
            held = subject in self.holds
            expected = {rid for rid in self.rows_of(subject)
                        if self.rows[rid].expiry > now or held}
            assert {v.record_id for v in views} == expected
            for v in views:
                row = self.rows[v.record_id]
                assert v.expires_at == row.expiry
                assert v.expires_at > now or held, "expired record exported without a hold"
                assert v.held == held
                assert v.subject_id == subject
                assert v.purposes == tuple(sorted(row.purposes))
                np.testing.assert_array_equal(v.template, row.template)
                if v.expires_at <= now:
                    event("export: held expired record returned")

    @invariant()
    def counts_match_model(self) -> None:
        stats = self.store.stats()
        assert stats.records == len(self.rows)
        assert stats.integrity_failures == 0
        assert stats.held_subjects == len(self.holds)

    @invariant()
    def audit_verifies(self) -> None:
        report = self.store.audit.verify()
        assert report.ok, report.problems


StoreMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # explain is slow
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStoreStateMachine = StoreMachine.TestCase
