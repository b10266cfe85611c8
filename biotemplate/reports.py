"""Reports for the people who run a store: what is stored, and what is about to expire.

A compliance engineer asks "what expires this week, what is kept only by a legal hold, is
anything stored longer than the policy allows, what will the next purge remove?". The
answers need no template and no subject id: every record's expiry, purposes and hold
flag are clear headers of its row (authenticated inside the ciphertext, so an edited
header makes the record unreadable rather than misreported as something it is not), and
which subjects are under hold is in the keyring. So the report decrypts nothing and
works on a read-only handle, beside a running writer.

The public entry point is :meth:`~biotemplate.store.TemplateStore.retention_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from .backends.base import RecordRow
from .clock import from_us
from .policy import format_duration
from .results import PurposeRetention, RetentionReport
from .vault import Vault

_US = timedelta(microseconds=1)
WINDOWS = (timedelta(hours=24), timedelta(days=7), timedelta(days=30))


@dataclass(slots=True)
class _Tally:
    """Counts of one purpose while the rows stream past."""

    records: int = 0
    live: int = 0
    within: list[int] = field(default_factory=lambda: [0] * len(WINDOWS))
    oldest: int | None = None
    latest: int | None = None
    held: int = 0
    held_expired: int = 0
    purge_removes: int = 0
    beyond_limit: int = 0


def retention_report(vault: Vault, now_us: int) -> RetentionReport:
    """Stream the row headers once and count, per purpose and overall."""
    policy = vault.policy
    limits = {name: now_us + p.max_retention // _US for name, p in policy.purposes.items()}
    edges = [now_us + w // _US for w in WINDOWS]
    tallies: dict[str, _Tally] = {name: _Tally() for name in policy.purposes}
    records = removes = keeps = 0
    for batch in vault.rows.scan_headers():
        for row in batch:
            records += 1
            held = vault.held(row.subject_ref)
            expired = row.expiry_us <= now_us
            if expired and held:
                keeps += 1
            elif expired:
                removes += 1
            for name in row.purposes:
                _count(tallies.setdefault(name, _Tally()), row, held=held, expired=expired,
                       edges=edges, limit=limits.get(name))
    return RetentionReport(at=from_us(now_us), records=records, purge_removes=removes,
                           purge_keeps_held=keeps,
                           purposes=tuple(_purpose(name, tallies[name], vault)
                                          for name in sorted(tallies)))


def _count(t: _Tally, row: RecordRow, *, held: bool, expired: bool, edges: list[int],
           limit: int | None) -> None:
    t.records += 1
    t.oldest = row.expiry_us if t.oldest is None else min(t.oldest, row.expiry_us)
    t.latest = row.expiry_us if t.latest is None else max(t.latest, row.expiry_us)
    if held:
        t.held += 1
        t.held_expired += expired
    elif expired:
        t.purge_removes += 1
    if expired:
        return
    t.live += 1
    for i, edge in enumerate(edges):
        t.within[i] += row.expiry_us <= edge
    if limit is not None and row.expiry_us > limit:
        t.beyond_limit += 1


def _purpose(name: str, t: _Tally, vault: Vault) -> PurposeRetention:
    rule = vault.policy.purposes.get(name)
    return PurposeRetention(
        purpose=name, in_policy=rule is not None,
        max_retention=None if rule is None else format_duration(rule.max_retention),
        records=t.records, live=t.live, expiring_24h=t.within[0], expiring_7d=t.within[1],
        expiring_30d=t.within[2],
        oldest_expiry=None if t.oldest is None else from_us(t.oldest),
        latest_expiry=None if t.latest is None else from_us(t.latest),
        held=t.held, held_expired=t.held_expired, purge_removes=t.purge_removes,
        beyond_limit=t.beyond_limit)
