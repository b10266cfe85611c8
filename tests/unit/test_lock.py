"""One writer per store: the OS lock a writable handle holds on ``<store>/lock``.

Real processes (``holder.py``) hold the store where it matters: the lock is ``flock``,
which the kernel drops when its holder dies, and which also refuses a second handle in
the same process (two ``open()`` calls are two open file descriptions).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from holder import Holder

import biotemplate as bt
from biotemplate import _files
from biotemplate.audit import AuditTrail
from biotemplate.gallery import Gallery
from biotemplate.synthetic import make_gallery

DIM = 64
MODEL = "test-model-v1"


def note(store_dir: Path) -> dict[str, Any]:
    return dict(json.loads((store_dir / "lock").read_text()))


def entries(store: bt.TemplateStore) -> int:
    return store.audit.verify().entries


# --- the premise, at the OS level --------------------------------------------------------


def test_flock_conflicts_inside_one_process(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    first = _files.FileLock.acquire(path, b"first")
    with pytest.raises(BlockingIOError):
        _files.FileLock.acquire(path, b"second")  # another open file description
    assert _files.read_note(path) == b"first"  # the refused opener wrote nothing
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first.release()
    first.release()  # idempotent
    assert not path.exists()  # removed while still held
    second = _files.FileLock.acquire(path, b"second")
    assert _files.read_note(path) == b"second"
    second.release()


# --- one process, two handles ------------------------------------------------------------


def test_the_lock_file_names_its_holder(store: bt.TemplateStore, store_dir: Path) -> None:
    lock = store_dir / "lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    held = note(store_dir)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert datetime.fromisoformat(held["since"]).utcoffset() == timedelta(0)


def test_a_second_handle_in_this_process_is_refused(store: bt.TemplateStore, store_dir: Path,
                                                    keys: Any, clock: Any) -> None:
    before = entries(store)
    with pytest.raises(bt.StoreLocked) as refused:
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    message = str(refused.value)
    assert f"process {os.getpid()} on host {socket.gethostname()}" in message
    assert "this process: another TemplateStore handle" in message
    assert "close the other handle" in message and "read_only=True" in message
    assert "PostgreSQL" in message
    assert isinstance(refused.value, bt.BiotemplateError)
    assert note(store_dir)["pid"] == os.getpid()  # the holder's note is untouched
    assert entries(store) == before  # the refused open wrote nothing
    store.enroll(make_gallery(1, 1, DIM).templates[0], subject_id="S-1",
                 purposes=["watchlist"], ttl=timedelta(days=1), source="case-file",
                 actor="svc")  # the holder goes on as before


def test_create_takes_the_lock_before_writing(tmp_path: Path, policy: bt.RetentionPolicy,
                                              keys: Any, clock: Any) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    other = _files.FileLock.acquire(folder / "lock", b'{"pid": 1, "host": "elsewhere", '
                                                     b'"since": "2026-01-01T00:00:00+00:00"}')
    with pytest.raises(bt.StoreLocked, match="process 1 on host elsewhere since 2026-01-01"):
        bt.TemplateStore.create(folder, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    assert sorted(p.name for p in folder.iterdir()) == ["lock"]  # nothing was written
    other.release()
    bt.TemplateStore.create(folder, dim=DIM, model=MODEL, policy=policy, key_provider=keys,
                            clock=clock).close()


@pytest.mark.parametrize("content", [b"", b"{", b'{"pid": "1", "host": "h", "since": "x"}',
                                     b'{"pid": 1, "host": "a\\nb", "since": "2026-01-01"}',
                                     b"[1, 2]", b"\xff" * 100])
def test_a_note_not_written_or_garbled(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                       content: bytes) -> None:
    (store_dir / "lock").write_bytes(content)  # same file: the lock itself stays held
    with pytest.raises(bt.StoreLocked, match="has not written its note yet"):
        bt.TemplateStore.open(store_dir, key_provider=keys)


def test_close_releases_the_lock(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                 clock: Any) -> None:
    store.close()
    assert not (store_dir / "lock").exists()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert note(store_dir)["pid"] == os.getpid()
        again.close()
        again.close()  # twice is fine
    assert not (store_dir / "lock").exists()


def test_a_failed_open_releases_the_lock(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                         clock: Any, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store.close()
    wrong = bt.FileKeyProvider.generate(tmp_path / "wrong.key")
    with pytest.raises(bt.KeyUnavailable):  # early: the keyring does not open
        bt.TemplateStore.open(store_dir, key_provider=wrong, clock=clock)
    assert not (store_dir / "lock").exists()

    def boom(*args: object, **kwargs: object) -> None:
        raise bt.StorageError("disk on fire")

    (store_dir / "index.snapshot").unlink()
    monkeypatch.setattr(Gallery, "rebuild", boom)  # late: the parts are built by then
    with pytest.raises(bt.StorageError):
        bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
    assert not (store_dir / "lock").exists()
    monkeypatch.undo()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert again.audit.verify().ok


def test_a_failed_create_releases_the_lock(store_dir: Path, policy: bt.RetentionPolicy,
                                           keys: Any, clock: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise bt.AuditError("cannot create the audit database")

    monkeypatch.setattr(AuditTrail, "create", boom)
    with pytest.raises(bt.AuditError):
        bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy,
                                key_provider=keys, clock=clock)
    assert not any(store_dir.iterdir())
    monkeypatch.undo()
    bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=policy, key_provider=keys,
                            clock=clock).close()


def test_opening_no_store_leaves_nothing_behind(tmp_path: Path, keys: Any) -> None:
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "missing", key_provider=keys)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "empty", key_provider=keys)
    assert not any((tmp_path / "empty").iterdir())
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(bt.StoreNotFound):
        bt.TemplateStore.open(tmp_path / "file", key_provider=keys)


# --- two processes ------------------------------------------------------------------------


def test_a_second_process_is_refused_and_told_who_holds_it(
        store: bt.TemplateStore, store_dir: Path, keys: Any, clock: Any) -> None:
    store.close()
    holder = Holder(store_dir, keys.path)
    try:
        with pytest.raises(bt.StoreLocked) as refused:
            bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
        message = str(refused.value)
        assert f"process {holder.pid} on host {socket.gethostname()} since " in message
        assert "this process" not in message
        Holder(store_dir, keys.path, expect="LOCKED").close()  # a third process too
    finally:
        holder.close()
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert again.audit.verify().ok


def test_a_killed_holder_leaves_no_lock(store: bt.TemplateStore, store_dir: Path, keys: Any,
                                        clock: Any) -> None:
    store.close()
    holder = Holder(store_dir, keys.path)
    holder.kill()
    assert note(store_dir)["pid"] == holder.pid  # the file stays, the lock does not
    with bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock) as again:
        assert note(store_dir)["pid"] == os.getpid()
        assert again.audit.verify().ok
    assert not (store_dir / "lock").exists()


@pytest.mark.slow
def test_processes_racing_for_one_store_get_one_writer_at_a_time(
        store: bt.TemplateStore, store_dir: Path, keys: Any) -> None:
    store.close()
    for _ in range(3):
        holders = [Holder(store_dir, keys.path, expect=None) for _ in range(4)]
        try:
            said = sorted(h.started().split()[0] for h in holders)
            assert said == ["LOCKED", "LOCKED", "LOCKED", "READY"]
            assert next(h for h in holders if h.ready).ask("enroll 2").startswith("OK")
        finally:
            for h in holders:
                h.close()
