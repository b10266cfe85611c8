"""``audit verify|checkpoint|export``: the audit trail, without the master key.

All three open ``audit.db`` read-only (``mode=ro``) with the public key the file names,
so they run beside the service that writes it, need no key and change nothing:

- ``verify`` checks every entry's hash, signature and chain link (and, given a witness's
  checkpoint, that the trail still reaches it: truncation, an old file put back); search
  entries are proven by the seal after them, so the newest ones (a live store seals
  them within 50 ms; a crashed one on its next open) are reported as not sealed yet;
- ``checkpoint`` prints a checkpoint of the trail as it is now (JSON, one line), signed by
  its newest signed (or sealed) entry, for a witness to keep off the host (``> CP.json``);
- ``export`` prints the verified entries as JSON Lines, one per line, in the regulator's
  view (``biotemplate.audit_export``: EU AI Act Art. 12 fields, nothing biometric).
"""

from __future__ import annotations

import argparse
import sys

import biotemplate as bt

from .common import JSON, Reply, Subparsers, UsageError, add_command, add_group, read_text


def register(subparsers: Subparsers) -> None:
    group = add_group(subparsers, "audit", help="verify, checkpoint and export the audit "
                                                "trail (no master key needed)")
    p = add_command(group, "verify", handler=_verify,
                    help="check every entry's hash, signature and chain link")
    p.add_argument("store", metavar="STORE", help="the store folder (or its audit.db)")
    p.add_argument("--checkpoint", metavar="CP.json",
                   help="a checkpoint a witness kept: the trail must still reach it")

    p = add_command(group, "checkpoint", handler=_checkpoint,
                    help="print a checkpoint of the trail now (JSON), for a witness")
    p.add_argument("store", metavar="STORE", help="the store folder (or its audit.db)")

    p = add_command(group, "export", handler=_export,
                    help="print the verified entries as JSON Lines (Art. 12 fields)")
    p.add_argument("store", metavar="STORE", help="the store folder (or its audit.db)")
    p.add_argument("--since", type=_seq, default=1, metavar="SEQ",
                   help="first entry (default 1)")
    p.add_argument("--until", type=_seq, metavar="SEQ", help="last entry (default: the end)")


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("expected an audit sequence number (1 or more)")
    return value


def _verify(args: argparse.Namespace) -> Reply:
    checkpoint = None
    if args.checkpoint:
        checkpoint = bt.Checkpoint.from_json(read_text(args.checkpoint, "--checkpoint", 4096))
    report = bt.verify_audit(args.store, checkpoint)
    data: JSON = {"ok": report.ok, "entries": report.entries, "unsealed": report.unsealed,
                  "problems": list[JSON](report.problems),
                  "checkpoint_seq": None if checkpoint is None else checkpoint.seq}
    against = "" if checkpoint is None else f", and reaches checkpoint {checkpoint.seq}"
    unsealed = "" if not report.unsealed else (
        f"; the newest {report.unsealed} entries are chained but not sealed yet (a live "
        "store seals within 50 ms, a stopped one on its next open): verify again to count "
        "them")
    if report.ok:
        return Reply(data, f"audit trail verifies: {report.entries} entries, every hash, "
                           f"signature and link checked{against}{unsealed}")
    return Reply(data, "\n".join(report.problems), code=1,
                 error=f"the audit trail does not verify ({len(report.problems)} "
                       f"problem(s), listed on stdout)")


def _checkpoint(args: argparse.Namespace) -> None:
    cp = bt.checkpoint_audit(args.store)
    print(cp.to_json())  # in every mode, --quiet too: it is meant for '> CP.json'


def _export(args: argparse.Namespace) -> None:
    if args.until is not None and args.until < args.since:
        raise UsageError("--until is before --since")
    out = sys.stdout
    for record in bt.export_audit(args.store, since=args.since, until=args.until):
        out.write(record.to_json() + "\n")
    out.flush()
