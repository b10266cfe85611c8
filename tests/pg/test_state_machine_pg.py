"""The stateful property test of tests/property/test_state_machine.py, on PostgreSQL.

The same rules and invariants (enrol, delete, erase, purge, holds, searches, verification,
reopen, rebuild; exports, counts and the audit trail checked against the model after every
step), with the store in a fresh schema, and with a **second instance** opened beside the
first: after every step, once its feed has caught up, it must answer the model's searches
and exports as the first does (the instance that did not make the change).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import biotemplate as bt
from tests.pg.conftest import SERVER, drop_schema, with_schema
from tests.property.test_state_machine import (
    ACTOR,
    DIM,
    MODEL,
    POLICY,
    START,
    SUBJECTS,
    TMP_ROOT,
    Clock,
    StoreMachine,
)


class PgStoreMachine(StoreMachine):
    def __init__(self) -> None:
        RuleBasedStateMachine.__init__(self)
        self.tmp = Path(tempfile.mkdtemp(prefix="bt-prop-pg-", dir=TMP_ROOT))
        self.clock = Clock(START)
        self.keys = bt.FileKeyProvider.generate(self.tmp / "master.key")
        self.schema = f"bt_prop_{secrets.token_hex(5)}"
        self.url = with_schema(SERVER, self.schema)
        self.store = bt.TemplateStore.create(
            self.url, dim=DIM, model=MODEL, policy=bt.RetentionPolicy.from_dict(POLICY),
            key_provider=self.keys, clock=self.clock)
        self.other = bt.TemplateStore.open(self.url, key_provider=self.keys, clock=self.clock,
                                           poll_interval=0.05)
        self.rows = {}
        self.templates = {}
        self.holds = set()

    def teardown(self) -> None:
        try:
            self.store.close()
            self.other.close()
        finally:
            drop_schema(SERVER, self.schema)
            shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(drop_snapshot=st.booleans())
    def reopen(self, drop_snapshot: bool) -> None:
        """Close and open again (an instance without snapshot_dir always rebuilds)."""
        self.store.close()
        self.store = bt.TemplateStore.open(self.url, key_provider=self.keys, clock=self.clock)
        stats = self.store.stats()
        assert stats.integrity_failures == 0 and stats.shredded_rows == 0
        assert stats.indexed == sum(1 for rid in self.rows if self.live(rid))

    @invariant()
    def the_other_instance_agrees(self) -> None:
        follower = self.other._follower
        assert follower is not None
        follower.catch_up()  # what the feed thread does on its next wake-up
        live = sum(1 for rid in self.rows if self.live(rid))
        assert self.other.stats().indexed >= live  # expired ones may still be hidden there
        for subject in SUBJECTS:
            mine = {v.record_id for v in self.store.export_subject(subject, actor=ACTOR)}
            theirs = {v.record_id for v in self.other.export_subject(subject, actor=ACTOR)}
            assert mine == theirs
        for rid, row in list(self.rows.items())[:6]:
            for purpose in row.purposes:
                a = self.store.search(row.template, purpose=purpose, actor=ACTOR, k=5,
                                      mode="investigation")
                b = self.other.search(row.template, purpose=purpose, actor=ACTOR, k=5,
                                      mode="investigation")
                assert [c.record_id for c in a.candidates] == [c.record_id for c in b.candidates]
        assert self.other.stats().integrity_failures == 0


PgStoreMachine.TestCase.settings = settings(
    max_examples=8, stateful_step_count=15, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def test_store_state_machine_on_postgresql(pg_server: str) -> None:
    """Runs the machine (skipped, or failed under BIOTEMPLATE_REQUIRE_PG=1, without a server)."""
    PgStoreMachine.TestCase("runTest").runTest()

