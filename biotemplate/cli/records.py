"""Commands on records: ``enroll``, ``search``, ``verify``, ``export``, ``erase``,
``delete`` and ``hold place|release``.

Templates come from ``.npy`` files (``numpy.save``; never pickles) and subject ids from a
text file, one per line, so neither appears in a process listing or shell history. An
access request's answer (``export``) is the one output that holds templates and subject
ids, on purpose: JSON with each template in base64 (little-endian float32), or the
templates in a new ``.npy`` file (mode 0600) with ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from typing import Any

import numpy as np

from .common import (
    JSON,
    CliError,
    Reply,
    Subparsers,
    add_actor,
    add_command,
    add_group,
    add_key_options,
    add_reason,
    add_store,
    duration,
    jsonable,
    opened,
    read_array,
    read_subject_ids,
    subject_id,
    when,
)
from .progress import progress_bar


def register(subparsers: Subparsers) -> None:
    p = add_command(subparsers, "enroll", handler=_enroll,
                    help="enrol templates (one transaction: all or none)")
    add_store(p)
    p.add_argument("--templates", required=True, metavar="X.npy",
                   help="an (n, dim) array, one template per row")
    p.add_argument("--subject-ids", required=True, metavar="IDS.txt",
                   help="n lines, the subject id of each row")
    p.add_argument("--purpose", required=True, action="append",
                   help="a purpose from the policy (repeat for several)")
    p.add_argument("--ttl", type=duration,
                   help="retention, e.g. 30d (default: the purposes' default_retention)")
    p.add_argument("--source", help="where the templates come from (if the policy asks)")
    add_key_options(p)
    add_actor(p)

    p = add_command(subparsers, "search", handler=_search,
                    help="1:N search, open-set (a stranger gets no candidate)")
    add_store(p)
    p.add_argument("--probe", required=True, metavar="PROBE.npy",
                   help="one template (dim,) or several (n, dim)")
    p.add_argument("--purpose", required=True)
    p.add_argument("--mode", choices=("identification", "investigation"),
                   default="identification",
                   help="identification: only candidates at or above the threshold; "
                        "investigation: up to k, each marked (if the policy allows it)")
    p.add_argument("--k", type=int, default=10, help="at most this many candidates")
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=False)

    p = add_command(subparsers, "verify", handler=_verify,
                    help="1:1: compare a probe with one subject's records")
    add_store(p)
    p.add_argument("--probe", required=True, metavar="PROBE.npy", help="one template")
    p.add_argument("--subject-id", required=True, type=subject_id)
    p.add_argument("--purpose", required=True)
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=False)

    p = add_command(subparsers, "export", handler=_export,
                    help="a subject's records for an access request (GDPR Art. 15), as "
                         "JSON; holds templates and the subject id")
    add_store(p)
    p.add_argument("subject", metavar="SUBJECT", type=subject_id)
    p.add_argument("--out", metavar="FILE.npy",
                   help="write the templates to this new .npy file (mode 0600) instead of "
                        "base64 in the JSON")
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=True)

    p = add_command(subparsers, "erase", handler=_erase,
                    help="erase every record of a subject and destroy its key (GDPR Art. 17)")
    add_store(p)
    p.add_argument("subject", metavar="SUBJECT", type=subject_id)
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=True)

    p = add_command(subparsers, "delete", handler=_delete, help="delete one record")
    add_store(p)
    p.add_argument("record_id", metavar="RECORD_ID")
    add_key_options(p)
    add_actor(p)
    add_reason(p, required=True)

    hold = add_group(subparsers, "hold", help="legal holds: place or release")
    for name, handler, text in (
            ("place", _hold_place, "keep a subject's records through purges and refuse "
                                   "their erasure until released"),
            ("release", _hold_release, "lift a legal hold (expired records go at the next "
                                       "purge)")):
        p = add_command(hold, name, handler=handler, help=text)
        add_store(p)
        p.add_argument("subject", metavar="SUBJECT", type=subject_id)
        add_key_options(p)
        add_actor(p)
        add_reason(p, required=True)


def _enroll(args: argparse.Namespace) -> Reply:
    templates = read_array(args.templates, "--templates")
    ids = read_subject_ids(args.subject_ids)
    if templates.ndim != 2:
        raise CliError(f"--templates {args.templates}: expected one template per row, "
                       f"got an array of {templates.ndim} dimension(s)")
    if len(ids) != len(templates):
        raise CliError(f"{len(ids)} subject ids for {len(templates)} templates")
    with opened(args) as store:
        with progress_bar("enrolling", sys.stderr, quiet=args.quiet) as bar:
            record_ids = store.enroll_many(templates, subject_ids=ids, purposes=args.purpose,
                                           ttl=args.ttl, source=args.source,
                                           actor=args.actor, progress=bar)
    return Reply({"records": len(record_ids), "record_ids": list[JSON](record_ids),
                  "purposes": list[JSON](args.purpose)},
                 f"enrolled {len(record_ids)} records for {', '.join(args.purpose)}")


def _search(args: argparse.Namespace) -> Reply:
    probes = read_array(args.probe, "--probe")
    if probes.ndim not in (1, 2):
        raise CliError(f"--probe {args.probe}: expected one template or one per row")
    with opened(args) as store:
        if probes.ndim == 1:
            results = [store.search(probes, purpose=args.purpose, k=args.k, actor=args.actor,
                                    reason=args.reason, mode=args.mode)]
        else:
            results = store.search_many(probes, purpose=args.purpose, k=args.k,
                                        actor=args.actor, reason=args.reason, mode=args.mode)
    lines = []
    for number, res in enumerate(results, 1):
        lines.append(f"probe {number}: decision {'yes' if res.decision else 'no'}, "
                     f"{len(res.candidates)} candidate(s), threshold {res.threshold:.3f} "
                     f"({res.mode}, audit entry {res.audit_seq})")
        for c in res.candidates:
            mark = "above threshold" if c.above_threshold else "below threshold (weak)"
            lines.append(f"  {c.rank}. {c.subject_id}  score {c.score:.4f}  "
                         f"record {c.record_id}  {mark}")
    return Reply({"results": jsonable(results)}, "\n".join(lines))


def _verify(args: argparse.Namespace) -> Reply:
    probe = read_array(args.probe, "--probe")
    with opened(args) as store:
        v = store.verify(probe, subject_id=args.subject_id, purpose=args.purpose,
                         actor=args.actor, reason=args.reason)
    word = "match" if v.match else "no match"
    sign = ">=" if v.match else "<"
    return Reply(jsonable(v), f"{word}: score {v.score:.4f} {sign} threshold "
                              f"{v.threshold:.3f} (record {v.record_id}, audit entry "
                              f"{v.audit_seq})")


def _export(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        views = store.export_subject(args.subject, actor=args.actor, reason=args.reason)
    records: list[JSON] = []
    for row, view in enumerate(views):
        item: dict[str, Any] = {
            "record_id": view.record_id, "purposes": list(view.purposes),
            "created_at": view.created_at.isoformat(), "expires_at": view.expires_at.isoformat(),
            "source": view.source, "metadata": jsonable(view.metadata), "held": view.held}
        if args.out:
            item["template_row"] = row
        else:
            item["template_base64"] = base64.b64encode(
                np.ascontiguousarray(view.template, dtype="<f4").tobytes()).decode("ascii")
        records.append(item)
    if args.out and views:
        _write_npy(args.out, np.stack([v.template for v in views]).astype("<f4"))
    doc: JSON = {"subject_id": args.subject, "records": records,
                 "template_encoding": "float32 little-endian",
                 "dim": int(views[0].template.shape[0]) if views else None,
                 "templates_file": args.out if args.out and views else None}
    summary = (f"{len(views)} record(s) of this subject"
               + (f"; templates written to {args.out}" if args.out and views else ""))
    # The JSON is the answer to the request, in either mode; --quiet keeps it off stdout.
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False)
    return Reply(doc, text if not args.out else f"{text}\n{summary}")


def _write_npy(path: str, array: np.ndarray[Any, Any]) -> None:
    """A new file of mode 0600 (it holds templates); never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"--out {path} exists; an export never overwrites a file") from None
    except OSError as exc:
        raise CliError(f"--out {path}: cannot create it ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def _erase(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        r = store.erase_subject(args.subject, actor=args.actor, reason=args.reason)
    return Reply(jsonable(r), f"erased {r.records_erased} record(s); subject key destroyed: "
                              f"{'yes' if r.key_destroyed else 'no (none existed)'}; at "
                              f"{when(r.at)}; audit entry {r.audit_seq} (keep this receipt: "
                              f"subject ref {r.subject_ref})")


def _delete(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        r = store.delete(args.record_id, actor=args.actor, reason=args.reason)
    return Reply(jsonable(r), f"deleted record {r.record_id} (audit entry {r.audit_seq})"
                 + ("; it was the subject's last: key destroyed" if r.subject_key_destroyed
                    else ""))


def _hold_place(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        r = store.place_hold(args.subject, actor=args.actor, reason=args.reason)
    return Reply(jsonable(r), f"legal hold placed on {r.records} record(s) (audit entry "
                              f"{r.audit_seq})")


def _hold_release(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        r = store.release_hold(args.subject, actor=args.actor, reason=args.reason)
    return Reply(jsonable(r), f"legal hold released on {r.records} record(s) (audit entry "
                              f"{r.audit_seq})")
