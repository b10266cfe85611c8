"""A second process that holds a store open for writing (the lock and read-only tests).

As a script, ``python holder.py STORE KEYFILE`` opens the store writable, prints
``READY <pid>``, then obeys one command per line on stdin: ``enroll N`` (enrols N more
records, answers ``OK <rows>``) and ``close`` (closes, answers ``CLOSED``, exits). If the
open is refused it prints ``LOCKED`` and exits. The parent may SIGKILL it at any time.

As a module, :class:`Holder` starts one and talks to it. The child imports the same
``biotemplate`` as the parent (``PYTHONPATH``), whatever the working directory.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

TIMEOUT_S = 60.0


class Holder:
    """A child process holding ``store_dir`` open for writing."""

    def __init__(self, store_dir: Path, key_file: Path, *, expect: str | None = "READY"
                 ) -> None:
        """Start the child; unless ``expect`` is None, wait for its first line and check
        that it starts with ``expect`` ("READY" or "LOCKED")."""
        import biotemplate

        env = {**os.environ, "PYTHONPATH": str(Path(biotemplate.__file__).resolve().parents[1])}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(store_dir), str(key_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        self.pid = self.proc.pid
        self.ready = False
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if expect is not None and not self.started().startswith(expect):
            self.kill()
            assert self.proc.stderr is not None
            raise AssertionError(f"holder did not say {expect}:\n"
                                 f"{self.proc.stderr.read()[-3000:]}")

    def started(self) -> str:
        """The child's first line: "READY <pid>" (it holds the store) or "LOCKED"."""
        first = self.line()
        self.ready = first.startswith("READY")
        return first

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put("EOF")

    def line(self) -> str:
        return self._lines.get(timeout=TIMEOUT_S)

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        """Close the store in the child and let it exit (a child refused exits alone)."""
        if self.ready and self.proc.poll() is None:
            assert self.ask("close") == "CLOSED"
            self.ready = False
        self.proc.wait(timeout=TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no close, no cleanup; the kernel drops the child's locks."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=TIMEOUT_S)


def main(store_dir: str, key_file: str) -> None:
    import biotemplate as bt
    from biotemplate.synthetic import make_gallery

    start = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        store = bt.TemplateStore.open(store_dir, key_provider=bt.FileKeyProvider(key_file),
                                      clock=lambda: start)
    except bt.StoreLocked:
        print("LOCKED", flush=True)
        return
    print(f"READY {os.getpid()}", flush=True)
    batch = 0
    for line in sys.stdin:
        command = line.split()
        if command[0] == "enroll":
            batch += 1
            n = int(command[1])
            gallery = make_gallery(n, 1, store.dim, seed=1000 + batch)
            store.enroll_many(gallery.templates,
                              subject_ids=[f"H{batch}-{s}" for s in gallery.subject_ids],
                              purposes=["watchlist"], ttl=timedelta(days=30),
                              source="case-file", actor="holder")
            print(f"OK {store.stats().records}", flush=True)
        elif command[0] == "close":
            store.close()
            print("CLOSED", flush=True)
            return


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
