"""A policy change applied to what is stored: what differs, and which records it shortens.

The rule (README, docs/compliance.md): a tighter policy applies to the records already
stored, a looser one never extends them.

- **Tighter**: a purpose's ``max_retention`` shortened, or the purpose removed (a limit
  of zero). Every stored record carries the limits of all its purposes, counted from its
  enrolment, just as at enrolment (``RetentionPolicy.resolve_ttl``): its new expiry is
  ``created + the smallest max_retention of its purposes`` under the new policy, when that
  is earlier than the expiry it has. When that moment has passed already, the record
  expires at once (expiry = now): never served again, shredded by the next purge. A held
  record gets its new expiry too; the hold keeps it until released, as for any record.
- **Looser** (a longer limit, a new purpose): existing records keep their expiry.

The creation time is inside the ciphertext, so finding the records a change shortens
decrypts the rows of the purposes it tightens: it runs on a writable handle, for
:meth:`~biotemplate.store.TemplateStore.policy_diff` (what would change) and
``set_policy`` (which reseals them with the policy, in one transaction; ``retention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from .backends.base import RecordRow
from .errors import IntegrityError, KeyUnavailable
from .policy import RetentionPolicy
from .results import PolicyDiff, PurposeChange
from .vault import Vault

_US = timedelta(microseconds=1)
_FIELDS = ("description", "max_retention", "default_retention", "modes", "match_threshold",
           "max_candidates", "allowed_sources")


@dataclass(slots=True)
class Shortening:
    """The rows a policy change shortens, each resealed with its new expiry."""

    rows: list[RecordRow] = field(default_factory=list)
    expired: int = 0  # of them, expired at once


def tightened(current: RetentionPolicy, proposed: RetentionPolicy) -> set[str]:
    """Purposes whose limit the proposal shortens or removes."""
    return {name for name, rule in current.purposes.items()
            if name not in proposed.purposes
            or proposed.purposes[name].max_retention < rule.max_retention}


def shortening(vault: Vault, current: RetentionPolicy, proposed: RetentionPolicy,
               now_us: int) -> Shortening:
    """Reseal, in memory, every live record a change from ``current`` to ``proposed``
    shortens (see the module docstring); nothing is written. Rows that do not open
    (shredded, unlisted, tampered) are left out: they are never served anyway."""
    out = Shortening()
    narrower = tightened(current, proposed)
    if not narrower:
        return out
    limit_us = {name: rule.max_retention // _US for name, rule in proposed.purposes.items()}
    for batch in vault.rows.scan():
        for row in batch:
            if row.expiry_us <= now_us or narrower.isdisjoint(row.purposes):
                continue
            try:
                plain = vault.open_row(row)
            except (IntegrityError, KeyUnavailable):
                continue
            limit = min(limit_us.get(name, 0) for name in row.purposes)
            expiry_us = max(plain.created_us + limit, now_us)
            if expiry_us < row.expiry_us:
                out.rows.append(vault.with_expiry(row, plain, expiry_us))
                out.expired += expiry_us <= now_us
    return out


def diff(vault: Vault, proposed: RetentionPolicy, now_us: int) -> PolicyDiff:
    """What ``set_policy(proposed)`` would change now, per purpose and in records."""
    current = vault.policy
    plan = shortening(vault, current, proposed, now_us)
    tagged = _tagged(vault)
    shortened: dict[str, int] = {}
    for row in plan.rows:
        for name in row.purposes:
            shortened[name] = shortened.get(name, 0) + 1
    narrower = tightened(current, proposed)
    changes = []
    for name in sorted(set(current.purposes) | set(proposed.purposes)):
        old, new = current.purposes.get(name), proposed.purposes.get(name)
        before = {} if old is None else old.to_dict()
        after = {} if new is None else new.to_dict()
        fields = {key: (before.get(key), after.get(key)) for key in _FIELDS
                  if before.get(key) != after.get(key)}
        if not fields:
            continue
        status = "added" if old is None else "removed" if new is None else "changed"
        changes.append(PurposeChange(purpose=name, status=status, fields=_frozen(fields),
                                     tightened=name in narrower,
                                     records=tagged.get(name, 0),
                                     shortened=shortened.get(name, 0)))
    return PolicyDiff(changes=tuple(changes), epoch_changed=proposed.epoch != current.epoch,
                      records_shortened=len(plan.rows), records_expired=plan.expired)


def _tagged(vault: Vault) -> dict[str, int]:
    """Stored records per purpose tag, from the clear headers."""
    counts: dict[str, int] = {}
    for batch in vault.rows.scan_headers():
        for row in batch:
            for name in row.purposes:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _frozen(fields: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """Lists (modes, sources) as tuples: the diff is a value, not a view of a policy."""
    def freeze(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value
    return {key: (freeze(a), freeze(b)) for key, (a, b) in fields.items()}
