"""One instance of a shared store in its own OS process, driven over stdin/stdout.

Each line in is a JSON command, each line out its JSON answer (``{"ok": ...}`` or
``{"error": "ClassName"}``). Commands: open, enroll, search, verify, erase, delete, purge,
stats, wait_seq, close. Templates travel as lists of floats (tests use dim 64).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

import biotemplate as bt


def main() -> None:
    store: bt.TemplateStore | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "open":
                store = bt.TemplateStore.open(
                    cmd["url"], key_provider=bt.FileKeyProvider(Path(cmd["key"])),
                    partition=tuple(cmd["partition"]) if cmd.get("partition") else None,
                    poll_interval=0.2)
                out: Any = {"records": store.stats().indexed}
            elif op == "close":
                assert store is not None
                store.close()
                out = True
            else:
                assert store is not None
                out = run(store, op, cmd)
            answer = {"ok": out}
        except bt.BiotemplateError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(answer), flush=True)
        if op == "close":
            return


def run(store: bt.TemplateStore, op: str, cmd: dict[str, Any]) -> Any:
    if op == "enroll":
        vecs = np.asarray(cmd["templates"], dtype=np.float32)
        ids = store.enroll_many(vecs, subject_ids=cmd["subjects"], purposes=["watchlist"],
                                ttl=timedelta(days=cmd.get("days", 30)), source="case-file",
                                actor="worker")
        return {"ids": ids, "at": time.time()}
    if op == "search":
        found = []
        for probe in cmd["probes"]:
            r = store.search(np.asarray(probe, dtype=np.float32), purpose="watchlist",
                             k=cmd.get("k", 5), actor="worker", mode=cmd.get("mode",
                                                                          "identification"))
            found.append([[c.subject_id, c.record_id, c.score, c.above_threshold]
                          for c in r.candidates])
        return found
    if op == "wait_subject":  # poll until a subject is found: returns the seconds it took
        probe = np.asarray(cmd["probe"], dtype=np.float32)
        start = cmd["since"]
        deadline = time.time() + cmd.get("timeout", 20)
        while time.time() < deadline:
            r = store.search(probe, purpose="watchlist", k=1, actor="worker")
            if r.candidates and r.candidates[0].subject_id == cmd["subject"]:
                return time.time() - start
            time.sleep(0.002)
        return None
    if op == "verify":
        v = store.verify(np.asarray(cmd["probe"], dtype=np.float32),
                         subject_id=cmd["subject"], purpose="rare", actor="worker")
        return v.match
    if op == "erase":
        return store.erase_subject(cmd["subject"], actor="worker", reason="test").records_erased
    if op == "erase_and_die":  # killed after the commit, before the key-state save
        import os

        from biotemplate.vault import Vault

        def die(self: Vault) -> None:
            os._exit(9)

        Vault.apply_staged = die  # type: ignore[method-assign,assignment]
        store.erase_subject(cmd["subject"], actor="worker", reason="test")
        raise AssertionError("not reached")
    if op == "delete":
        return store.delete(cmd["record_id"], actor="worker").record_id
    if op == "purge":
        return store.purge_expired().purged
    if op == "stats":
        s = store.stats()
        return {"indexed": s.indexed, "generation": s.generation, "records": s.records}
    if op == "now":
        return datetime.now(UTC).isoformat()
    raise ValueError(op)


if __name__ == "__main__":
    main()
