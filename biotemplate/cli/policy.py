"""``policy show|check|diff|apply``: the retention policy, from the file to the store.

``check`` validates a TOML file without any store. ``diff`` shows what ``apply`` would
change, including how many stored records a tighter limit would shorten (and how many of
them expire at once); ``apply`` makes the change, reseals those records and prints the
receipt. The rule (README, docs/compliance.md): a tighter policy applies to stored
records, a looser one never extends them.
"""

from __future__ import annotations

import argparse
from typing import Any

import biotemplate as bt
from biotemplate.results import PolicyDiff

from .common import (
    Reply,
    Subparsers,
    add_actor,
    add_command,
    add_group,
    add_key_options,
    add_reason,
    add_store,
    jsonable,
    opened,
)


def register(subparsers: Subparsers) -> None:
    group = add_group(subparsers, "policy", help="show, check, diff and apply the retention "
                                                 "policy")
    p = add_command(group, "show", handler=_show,
                    help="print the policy in force, as TOML (read-only)")
    add_store(p)
    add_key_options(p)

    p = add_command(group, "check", handler=_check,
                    help="validate a policy file (no store, no key)")
    p.add_argument("file", metavar="POLICY.toml")

    p = add_command(group, "diff", handler=_diff,
                    help="what applying a policy file would change, and how many stored "
                         "records it would shorten (needs the writable store)")
    add_store(p)
    p.add_argument("file", metavar="POLICY.toml")
    add_key_options(p)

    p = add_command(group, "apply", handler=_apply,
                    help="put a policy file in force; a tighter limit shortens the stored "
                         "records it covers (audited, counted in the receipt)")
    add_store(p)
    p.add_argument("file", metavar="POLICY.toml")
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=False)


def _show(args: argparse.Namespace) -> Reply:
    with opened(args, read_only=True) as store:
        policy = store.policy
    return Reply(jsonable(policy.to_dict()), policy.to_toml().rstrip("\n"))


def _check(args: argparse.Namespace) -> Reply:
    policy = bt.RetentionPolicy.from_toml(args.file)
    names = sorted(policy.purposes)
    return Reply({"valid": True, "policy": jsonable(policy.to_dict())},
                 f"{args.file}: valid; epoch {policy.to_dict()['epoch']}, "
                 f"{len(names)} purpose(s): {', '.join(names)}")


def _diff(args: argparse.Namespace) -> Reply:
    proposed = bt.RetentionPolicy.from_toml(args.file)
    with opened(args) as store:
        diff = store.policy_diff(proposed)
    return Reply(jsonable(diff), _diff_text(diff))


def _apply(args: argparse.Namespace) -> Reply:
    proposed = bt.RetentionPolicy.from_toml(args.file)
    with opened(args) as store:
        receipt = store.set_policy(proposed, actor=args.actor, reason=args.reason)
    text = (f"policy applied (version {receipt.digest[:16]}..., audit entry "
            f"{receipt.audit_seq}); {receipt.records_shortened} stored record(s) shortened, "
            f"{receipt.records_expired} of them expired at once (the next purge shreds them)")
    return Reply(jsonable(receipt), text)


def _diff_text(diff: PolicyDiff) -> str:
    if not diff.changed:
        return "no change: the file is the policy in force"
    lines = []
    if diff.epoch_changed:
        lines.append("epoch: differs; refused: the epoch length is fixed when the store is "
                     "created")
    for change in diff.changes:
        head = f"purpose {change.purpose}: {change.status}"
        if change.tightened:
            head += (f" (tighter: {change.shortened} of its {change.records} stored "
                     "record(s) would be shortened)")
        lines.append(head)
        for field, (old, new) in change.fields.items():
            lines.append(f"  {field}: {_shown(old)} -> {_shown(new)}")
    lines.append(f"in all: {diff.records_shortened} stored record(s) would be shortened, "
                 f"{diff.records_expired} of them expire at once; no record is ever "
                 "extended")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
