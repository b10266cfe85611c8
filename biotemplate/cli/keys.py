"""``keygen`` (a new master key file) and ``rotate-key`` (the store under a new one)."""

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
    opened,
)


def register(subparsers: Subparsers) -> None:
    p = add_command(subparsers, "keygen", handler=_keygen,
                    help="write a new random master key to a file (mode 0600, never "
                         "overwritten)")
    p.add_argument("key_file", metavar="KEY_FILE",
                   help="where to write it: not inside a store folder, ideally not on the "
                        "store's disk")

    p = add_command(subparsers, "rotate-key", handler=_rotate_key,
                    help="seal the store's key state under a new master key (no record is "
                         "re-encrypted); afterwards the old key opens nothing in the folder")
    add_store(p)
    add_key_options(p)
    p.add_argument("--new-key-file", required=True, metavar="PATH",
                   help="the new master key (make it with 'biotemplate keygen')")
    add_actor(p)


def _keygen(args: argparse.Namespace) -> Reply:
    provider = bt.FileKeyProvider.generate(args.key_file)
    return Reply({"key_file": str(provider.path)},
                 f"wrote a new master key to {provider.path} (mode 0600). Keep a copy "
                 "somewhere safe and off the store's disk: without it the store cannot be "
                 "opened.")


def _rotate_key(args: argparse.Namespace) -> Reply:
    new = bt.FileKeyProvider(args.new_key_file)
    with opened(args) as store:
        receipt = store.rotate_master_key(new, actor=args.actor)
    return Reply({"master_key_id": receipt.master_key_id, "audit_seq": receipt.audit_seq},
                 f"the store is now sealed under {args.new_key_file} (key id "
                 f"{receipt.master_key_id[:16]}..., audit entry {receipt.audit_seq}); the "
                 "old key opens nothing in the store folder any more")
