"""Copies of a store's files, and what an attacker reads from them with a given key state.

Shared by the suites that put old copies back (store, subject keys, rotation). Not a test
module: pytest imports it from this folder as ``copies``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import biotemplate as bt
from biotemplate.backends.sqlite import SQLiteBackend
from biotemplate.codec import RecordCodec
from biotemplate.keyring import Keyring
from biotemplate.subject_keys import SubjectKeys


def backup_records(store_dir: Path, dest: Path) -> Path:
    """A copy of records.db through SQLite's backup API (the only supported way)."""
    with sqlite3.connect(store_dir / "records.db") as src, sqlite3.connect(dest) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return dest


def read_with(keyring_file: Path, keys: Any, db_file: Path, *, model: str, dim: int,
              unreadable: str = "unreadable") -> dict[str, str]:
    """Every row of ``db_file`` (with its own subject-key entries) read with the key state
    in ``keyring_file`` and the master key: the subject id when it opens, ``unreadable``
    when its key is gone (its epoch or hold key, or the bucket key its entry needs)."""
    ring = Keyring.load(keyring_file, keys.master_key())
    db = SQLiteBackend.open(db_file)
    codec = RecordCodec(ring, model=model, dim=dim, entries=SubjectKeys(db, ring).entry)
    try:
        out: dict[str, str] = {}
        for batch in db.scan():
            for row in batch:
                try:
                    out[row.record_id] = codec.open(row).subject_id
                except (bt.IntegrityError, bt.KeyUnavailable):
                    out[row.record_id] = unreadable
        return out
    finally:
        db.close()
