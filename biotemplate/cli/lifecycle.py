"""``init``, ``stats``, ``backup`` and ``purge``: a store's life, from creation on."""

from __future__ import annotations

import argparse

import biotemplate as bt

from .common import (
    Reply,
    Subparsers,
    add_actor,
    add_command,
    add_key_options,
    add_store,
    jsonable,
    key_provider,
    opened,
    when,
)


def register(subparsers: Subparsers) -> None:
    p = add_command(subparsers, "init", handler=_init,
                    help="create a new store in an empty (or new) folder")
    add_store(p)
    p.add_argument("--dim", type=int, required=True,
                   help="template length of the face model (e.g. 512, 128)")
    p.add_argument("--model", required=True,
                   help="the face model's name and version (bound into every record)")
    p.add_argument("--policy", required=True, metavar="POLICY.toml",
                   help="the retention policy ('biotemplate policy check' validates it)")
    add_key_options(p)

    p = add_command(subparsers, "stats", handler=_stats,
                    help="counts and sizes (read-only: beside a running service; no "
                         "template is decrypted)")
    add_store(p)
    add_key_options(p)

    p = add_command(subparsers, "backup", handler=_backup,
                    help="copy records.db and audit.db into a new folder (online "
                         "backup); back the keyring up on its own, shorter schedule")
    add_store(p)
    p.add_argument("dest", metavar="DEST", help="a folder that does not exist yet")
    add_key_options(p)
    add_actor(p)

    p = add_command(subparsers, "purge", handler=_purge,
                    help="shred every expired record not under legal hold and advance the "
                         "epoch ratchet (run it at least once per epoch)")
    add_store(p)
    add_key_options(p)


def _init(args: argparse.Namespace) -> Reply:
    policy = bt.RetentionPolicy.from_toml(args.policy)
    provider = key_provider(args)
    with bt.TemplateStore.create(args.store, dim=args.dim, model=args.model, policy=policy,
                                 key_provider=provider) as store:
        public = store.audit.public_key.hex()
        purposes = sorted(policy.purposes)
    return Reply({"store": args.store, "dim": args.dim, "model": args.model,
                  "purposes": list(purposes), "audit_public_key": public},
                 f"created a store at {args.store} (dim {args.dim}, model {args.model}, "
                 f"purposes: {', '.join(purposes)})\naudit public key: {public}\n(give it "
                 "to your auditors: 'biotemplate audit verify' needs no master key)")


def _stats(args: argparse.Namespace) -> Reply:
    with opened(args, read_only=True) as store:
        stats = store.stats()
    text = (f"records {stats.records} (subjects {stats.subjects}, under legal hold "
            f"{stats.held_subjects})\nmodel {stats.model}, dim {stats.dim}\n"
            f"epoch {stats.epoch} ({stats.epoch_seconds} s per epoch), key-state "
            f"generation {stats.generation}")
    return Reply(jsonable(stats), text)


def _backup(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        receipt = store.backup(args.dest, actor=args.actor)
    return Reply(jsonable(receipt),
                 f"backed up records.db and audit.db to {receipt.path} (audit entry "
                 f"{receipt.audit_seq}); copy the keyring now too (its backup must be of "
                 "this generation to open the set)")


def _purge(args: argparse.Namespace) -> Reply:
    with opened(args) as store:
        report = store.purge_expired()
    return Reply(jsonable(report),
                 f"purged {report.purged} expired records ({report.held_retained} kept under "
                 f"legal hold, {report.subject_keys_destroyed} subject keys destroyed); "
                 f"epoch {report.epoch_before} -> {report.epoch_after}, at {when(report.at)}, "
                 f"audit entry {report.audit_seq}")
