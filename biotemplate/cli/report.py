"""``report retention``: what is stored, what expires soon, what the next purge does.

Read-only (``TemplateStore.open(..., read_only=True)``): it runs beside the service that
holds the store, decrypts nothing and writes nothing; the library builds the report
(``TemplateStore.retention_report``) from the rows' clear headers.
"""

from __future__ import annotations

import argparse

from biotemplate.results import RetentionReport

from .common import (
    Reply,
    Subparsers,
    add_command,
    add_group,
    add_key_options,
    add_store,
    aware_time,
    jsonable,
    opened,
    when,
)


def register(subparsers: Subparsers) -> None:
    group = add_group(subparsers, "report", help="reports for the people who run a store")
    p = add_command(group, "retention", handler=_retention,
                    help="per purpose: live records, expiring in 24 h / 7 d / 30 d, oldest "
                         "expiry, held records, the next purge's effect (read-only)")
    add_store(p)
    p.add_argument("--at", type=aware_time, metavar="TIME",
                   help="report as of this time (ISO 8601 with offset; default: now)")
    add_key_options(p)


def _retention(args: argparse.Namespace) -> Reply:
    with opened(args, read_only=True) as store:
        report = store.retention_report(args.at)
    return Reply(jsonable(report), _text(report))


def _text(r: RetentionReport) -> str:
    lines = [f"retention report at {when(r.at)}: {r.records} record(s) stored; the next "
             f"purge would shred {r.purge_removes} and keep {r.purge_keeps_held} under "
             "legal hold", "",
             f"{'purpose':<24} {'limit':>6} {'live':>7} {'<=24h':>6} {'<=7d':>6} "
             f"{'<=30d':>6} {'held':>5} {'purge':>6} {'beyond':>6}  oldest expiry"]
    for p in r.purposes:
        name = p.purpose if p.in_policy else f"{p.purpose} (not in policy)"
        lines.append(f"{name:<24} {p.max_retention or '-':>6} {p.live:>7} "
                     f"{p.expiring_24h:>6} {p.expiring_7d:>6} {p.expiring_30d:>6} "
                     f"{p.held:>5} {p.purge_removes:>6} {p.beyond_limit:>6}  "
                     f"{when(p.oldest_expiry)}")
    if any(p.beyond_limit for p in r.purposes):
        lines += ["", "records 'beyond' the limit expire later than the policy allows from "
                      "now: apply the policy again ('biotemplate policy apply') to shorten "
                      "them"]
    return "\n".join(lines)
