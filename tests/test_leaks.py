"""Leak suite: after a full workload, no template, subject id, metadata or key is anywhere
it should not be (SECURITY.md §3, "Disk or backup thief" and "Logs and side channels").

The workload enrols 200 templates of 100 subjects with distinctive ids
("LEAKCHECK-SUBJ-0001") and metadata ("LEAKCHECK-META-..."), then searches, verifies,
confirms, exports, deletes, erases, holds, purges, refuses a series of bad calls,
snapshots, closes and reopens. Every file of the store folder (WAL and -shm files
included, also while the store is open), every entry created in the system temp dir during
the test, and every deleted-but-open file of this process is scanned with a sliding
search for:

- each template's bytes as float32, float64 and float16, raw and L2-normalised,
  little-endian (two 16-byte windows of each encoding, at elements 8 and 48);
- the subject ids and metadata strings, UTF-8 and UTF-16-LE;
- key material in clear (master key raw and hex, every keyring key).

Reprs, str() and exceptions are checked for key hex, subject ids and template values;
log records (DEBUG), warnings and C-level stdout/stderr too. Keys, providers and the store
refuse pickling; store and key files are 0600, the folder 0700.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import pickle
import sqlite3
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate.keyring import Keyring
from biotemplate.keys import ARGON2_MIN_MEM, ARGON2_MIN_OPS, SecretKey
from biotemplate.subject_keys import open_entry
from biotemplate.synthetic import make_gallery, probes, strangers
from biotemplate.validation import normalised

DIM = 64
MODEL = "test-model-v1"
N_SUBJECTS, SAMPLES = 100, 2
SHORT_LIVED = range(180, 200)  # rows enrolled one by one, purpose "rare", 1-day TTL
MARK = "LEAKCHECK"
SUBJECT_IDS = [f"{MARK}-SUBJ-{i // SAMPLES:04d}" for i in range(N_SUBJECTS * SAMPLES)]
BATCH_META = {"note": f"{MARK}-META-xyz", "site": f"{MARK}-META-site-42", "n": 7}
PASSPHRASE = f"{MARK}-PASSPHRASE-correct-horse"
STORE_FILES = {"records.db", "audit.db", "keyring", "index.snapshot"}
ARGON_FLOOR = {"ops_limit": ARGON2_MIN_OPS, "mem_limit": ARGON2_MIN_MEM}  # the cheapest allowed


def single_meta(i: int) -> dict[str, Any]:
    return {"note": f"{MARK}-META-single-{i:03d}"}


GALLERY = make_gallery(N_SUBJECTS, SAMPLES, DIM, seed=424_242)
# 200 face-like templates, each scaled by its own factor so that raw != normalised.
TEMPLATES = GALLERY.templates.astype(np.float64) * (1.5 + np.arange(200)[:, None] / 97.0)
PROBED = [0, 10, 20, 30, 95]  # subjects whose fresh samples are searched


# --- needles and the scanner --------------------------------------------------------------


def template_needles(name: str, t: np.ndarray) -> dict[bytes, str]:
    """16-byte windows of every encoding of one template (raw as submitted, and unit)."""
    f32 = np.asarray(t, dtype=np.float32)
    unit = normalised(f32[None, :])[0]
    t64 = np.asarray(t, dtype=np.float64)
    variants = {
        "raw-f32": f32.astype("<f4"), "raw-f64": t64.astype("<f8"),
        "raw-f64-of-f32": f32.astype("<f8"), "raw-f16": f32.astype("<f2"),
        "unit-f32": unit.astype("<f4"), "unit-f64": (t64 / np.linalg.norm(t64)).astype("<f8"),
        "unit-f64-of-f32": unit.astype("<f8"), "unit-f16": unit.astype("<f2"),
    }
    out: dict[bytes, str] = {}
    for vname, arr in variants.items():
        data = arr.tobytes()
        for first in (8, 48):
            lo = first * arr.itemsize
            out[data[lo : lo + 16]] = f"{name}:{vname}@{first}"
    return out


def text_needles(texts: Iterable[str]) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for text in texts:
        out[text.encode("utf-8")] = f"{text!r} utf-8"
        out[text.encode("utf-16-le")] = f"{text!r} utf-16-le"
    return out


def key_needles(keys: dict[str, bytes]) -> dict[bytes, str]:
    """Key material in clear on disk: raw bytes and ASCII hex (first 16 of each)."""
    out: dict[bytes, str] = {}
    for name, key in keys.items():
        out[key[:16]] = f"key {name} raw"
        out[key.hex()[:16].encode()] = f"key {name} hex"
        out[key.hex()[:16].upper().encode()] = f"key {name} HEX"
    return out


def find_needles(data: bytes, needles: dict[bytes, str]) -> list[tuple[str, int]]:
    """Every (needle, offset), at any byte offset. Needles are >= 8 bytes: candidate
    offsets come from matching their first 8 bytes as one uint64 word, at each of the 8
    byte alignments, then the whole needle is compared."""
    by_prefix: dict[int, list[bytes]] = {}
    for n in needles:
        assert len(n) >= 8
        by_prefix.setdefault(int.from_bytes(n[:8], "little"), []).append(n)
    keys = np.fromiter(by_prefix, dtype=np.uint64, count=len(by_prefix))
    buf = np.frombuffer(data, dtype=np.uint8)
    hits = []
    for shift in range(8):
        words = (len(data) - shift) // 8
        if words <= 0:
            continue
        view = buf[shift : shift + 8 * words].view("<u8")
        for i in np.flatnonzero(np.isin(view, keys)):
            off = shift + 8 * int(i)
            for n in by_prefix[int(view[i])]:
                if data[off : off + len(n)] == n:
                    hits.append((needles[n], off))
    return hits


@dataclass
class Scanner:
    needles: dict[bytes, str]
    bytes_scanned: int = 0
    files_scanned: int = 0
    hits: list[str] = field(default_factory=list)

    def scan_file(self, path: Path, label: str) -> None:
        try:
            data = path.read_bytes()
        except OSError:  # vanished or unreadable (another process's temp file)
            return
        self.bytes_scanned += len(data)
        self.files_scanned += 1
        self.hits += [f"{label}: {name} at {off} in {path}"
                      for name, off in find_needles(data, self.needles)]

    def scan_tree(self, root: Path, label: str) -> None:
        """A file, or every regular file under a folder (unreadable parts skipped)."""
        if root.is_file() and not root.is_symlink():
            self.scan_file(root, label)
            return
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    self.scan_file(path, label)

    def scan_deleted_open_files(self, label: str) -> None:
        """Unlinked files this process still holds open (e.g. SQLite temp files)."""
        fd_dir = Path("/proc/self/fd")
        if not fd_dir.is_dir():
            return
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(fd_dir / fd)
                if not target.endswith(" (deleted)") or not (fd_dir / fd).is_file():
                    continue
            except OSError:
                continue
            self.scan_file(fd_dir / fd, f"{label} (deleted open file {target})")


def temp_entries() -> set[str]:
    return set(os.listdir(tempfile.gettempdir()))


# --- text checks (reprs, exceptions, logs) ---------------------------------------------


def value_strings(vectors: Iterable[np.ndarray]) -> set[str]:
    """Template values as they would print: '0.1234567' (7 decimals, truncated), of the
    values as given and as float32, for magnitudes >= 0.01 so each string is distinctive."""
    out = set()
    for v in vectors:
        v64 = np.asarray(v, dtype=np.float64)
        for x in (*v64, *v64.astype(np.float32).astype(np.float64)):
            if abs(x) >= 0.01:
                out.add(f"{abs(x):.12f}"[: 9 if abs(x) < 10 else 10])
    return out


def key_strings(keys: dict[str, bytes]) -> dict[str, str]:
    out = {}
    for name, key in keys.items():
        h = key.hex()
        out[h[:16]] = f"key {name} hex prefix"
        out[h[-16:]] = f"key {name} hex suffix"
        out[h[:16].upper()] = f"key {name} HEX prefix"
        out[base64.b64encode(key).decode()[:16]] = f"key {name} base64"
        out[repr(key)[2:18]] = f"key {name} bytes repr"
    return out


def text_problems(where: str, text: str, needles: dict[str, str]) -> list[str]:
    return [f"{where}: contains {why} ({needle!r})" for needle, why in needles.items()
            if needle in text]


def exception_texts(exc: BaseException) -> Iterator[str]:
    """str and repr of an exception and of everything chained to it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield str(e)
        yield repr(e)
        yield from (str(a) for a in e.args)
        yield from getattr(e, "__notes__", [])
        todo += [e.__cause__, e.__context__]


def keyring_keys(store_dir: Path, provider: bt.KeyProvider, tag: str) -> dict[str, bytes]:
    """Every key of the store: the keyring's, and each subject's (sealed in records.db)."""
    ring = Keyring.load(store_dir / "keyring", provider.master_key())
    keys = {f"{tag}/ratchet-state": ring.ratchet_state, f"{tag}/lookup": ring.lookup_key,
            f"{tag}/digest": ring.digest_key, f"{tag}/meta": ring.meta_key,
            f"{tag}/audit-seed": ring.audit_seed}
    keys |= {f"{tag}/bucket/{b}": k for b, k in enumerate(ring.buckets)}
    keys |= {f"{tag}/pending/{b}": k for b, k in ring.pending.items()}
    conn = sqlite3.connect(f"{(store_dir / 'records.db').absolute().as_uri()}?mode=ro",
                           uri=True)
    try:
        entries = conn.execute("SELECT bucket, subject_ref, blob FROM subject_keys").fetchall()
    finally:
        conn.close()
    keys |= {f"{tag}/subject/{bytes(r).hex()[:8]}":
             open_entry(ring, b, bytes(r), bytes(blob)).key for b, r, blob in entries}
    keys |= {f"{tag}/hold/{r.hex()[:8]}": k for r, (k, _) in ring.holds.items()}
    for e in range(ring.ratchet_epoch, ring.ratchet_epoch + 32):  # every TTL used
        keys[f"{tag}/epoch-key/{e}"] = ring.epoch_key(e)
    return keys


# --- the workload -------------------------------------------------------------------------


def failure_workload(store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider,
                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     clock: Any) -> tuple[list[BaseException], list[np.ndarray]]:
    """Bad calls of every kind, each must raise a BiotemplateError; returns them all and
    the template values they were given."""
    nan_probe = TEMPLATES[5].copy()
    nan_probe[20] = np.nan
    short = TEMPLATES[6][:-1].copy()
    master_text = keys.path.read_text().strip()  # biotemplate-key-v1:<base64>
    other_key = bt.FileKeyProvider.generate(tmp_path / "other.key")
    open_key = tmp_path / "open.key"
    open_key.write_text(master_text + "\n")
    open_key.chmod(0o644)
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(master_text[:-2] + "\n")
    bad_key.chmod(0o600)
    monkeypatch.setenv("BT_TEST_BAD_ENV_KEY", master_text[:-1])
    sid = SUBJECT_IDS[0]
    calls: list[Callable[[], Any]] = [
        lambda: store.enroll(nan_probe, subject_id=sid, purposes=["rare"], actor="a"),
        lambda: store.enroll(short, subject_id=sid, purposes=["rare"], actor="a"),
        lambda: store.enroll(TEMPLATES[:2], subject_id=sid, purposes=["rare"], actor="a"),
        lambda: store.enroll_many(np.vstack([TEMPLATES[:2], nan_probe[None, :]]),
                                  subject_ids=SUBJECT_IDS[:3], purposes=["rare"], actor="a"),
        lambda: store.enroll_many(TEMPLATES[:3], subject_ids=SUBJECT_IDS[:2],
                                  purposes=["rare"], actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid * 20, purposes=["rare"], actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid, purposes=["no-such-purpose"],
                             actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid, purposes=["rare"],
                             ttl=timedelta(days=999), actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid, purposes=["rare"],
                             metadata={"x": {f"{MARK}-META-set"}}, actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid, purposes=["rare"],
                             metadata={"x": f"{MARK}-META-huge-" * 2000}, actor="a"),
        lambda: store.enroll(TEMPLATES[7], subject_id=sid, purposes=["rare"],
                             metadata={"x": float("nan")}, actor="a"),
        lambda: store.search(nan_probe, purpose="watchlist", actor="a"),
        lambda: store.search(short, purpose="watchlist", actor="a"),
        lambda: store.search(TEMPLATES[8], purpose="watchlist", k=0, actor="a"),
        lambda: store.search(TEMPLATES[8], purpose="watchlist", mode="fishing", actor="a"),
        lambda: store.search(TEMPLATES[8], purpose="border-verification", actor="a"),
        lambda: store.verify(TEMPLATES[8], subject_id=f"{MARK}-SUBJ-9999", purpose="rare",
                             actor="a"),
        lambda: store.verify(nan_probe, subject_id=sid, purpose="rare", actor="a"),
        lambda: store.verify(TEMPLATES[8], subject_id=sid, purpose="watchlist", actor="a"),
        lambda: store.delete("0" * 32, actor="a"),
        lambda: store.place_hold(f"{MARK}-SUBJ-9999", actor="a", reason="r"),
        lambda: store.release_hold(sid, actor="a", reason="r"),
        lambda: store.export_subject(sid, actor="a", reason=123),  # type: ignore[arg-type]
        lambda: store.confirm_match(10**9, "0" * 32, reviewer="a"),
        lambda: store.erase_subject(sid, actor=""),
        lambda: bt.TemplateStore.open(store_dir, key_provider=other_key, clock=clock),
        lambda: bt.TemplateStore.create(store_dir, dim=DIM, model=MODEL, policy=store.policy,
                                        key_provider=keys, clock=clock),
        lambda: bt.FileKeyProvider(open_key).master_key(),
        lambda: bt.FileKeyProvider(bad_key).master_key(),
        lambda: bt.EnvKeyProvider("BT_TEST_BAD_ENV_KEY").master_key(),
        lambda: SecretKey(keys.master_key().reveal()[:-1]),
        lambda: Keyring.from_bytes(_flipped(store_dir / "keyring"), keys.master_key()),
    ]
    raised = []
    for call in calls:
        with pytest.raises(bt.BiotemplateError) as info:
            call()
        raised.append(info.value)
    return raised, [nan_probe, short]


def _flipped(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    return bytes(data)


def test_workload_leaves_no_plaintext_anywhere(
    store: bt.TemplateStore, store_dir: Path, keys: bt.FileKeyProvider, clock: Any,
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    temp_before = temp_entries()
    problems: list[str] = []
    shown: list[tuple[str, object]] = []  # (what, object) whose repr/str must be clean
    master = keys.master_key().reveal()
    all_keys: dict[str, bytes] = {"master": master}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Enrol: 180 in one batch (two purposes), 20 one by one (short-lived).
        batch = [i for i in range(len(TEMPLATES)) if i not in SHORT_LIVED]
        ids = store.enroll_many(TEMPLATES[batch], subject_ids=[SUBJECT_IDS[i] for i in batch],
                                purposes=["watchlist", "rare"], ttl=timedelta(days=30),
                                source="enrolment-desk", metadata=BATCH_META, actor="svc")
        ids += [store.enroll(TEMPLATES[i], subject_id=SUBJECT_IDS[i], purposes=["rare"],
                             ttl=timedelta(days=1), metadata=single_meta(i), actor="svc")
                for i in SHORT_LIVED]
        all_keys |= keyring_keys(store_dir, keys, "after-enrol")

        # Search, verify, confirm, export.
        mated = probes(GALLERY, PROBED, seed=11)
        results = [store.search(p, purpose="watchlist", actor="analyst", reason="case 1")
                   for p in mated]
        results.append(store.search(strangers(1, DIM, seed=12)[0], purpose="watchlist",
                                    actor="analyst"))
        results.append(store.search(mated[1], purpose="watchlist", k=20,
                                    mode="investigation", actor="analyst", reason="case 2"))
        results += store.search_many(mated[:3], purpose="rare", k=5, actor="analyst")
        assert results[0].candidates and results[0].candidates[0].subject_id == SUBJECT_IDS[0]
        verifications = [store.verify(mated[0], subject_id=SUBJECT_IDS[0], purpose="rare",
                                      actor="gate"),
                         store.verify(mated[0], subject_id=SUBJECT_IDS[20], purpose="rare",
                                      actor="gate")]
        top = results[0].candidates[0]
        confirmations = [store.confirm_match(results[0].audit_seq, top.record_id,
                                             reviewer=r) for r in ("rev-1", "rev-2")]
        views = store.export_subject(SUBJECT_IDS[10], actor="dpo", reason="access request")
        assert len(views) == 2 and views[0].subject_id == SUBJECT_IDS[10]
        # Accuracy: calibration on enrolled subjects' own templates, labelled by their
        # ids (audited searches), and the index's check of itself.
        calibration = store.calibrate("watchlist", TEMPLATES[:40], SUBJECT_IDS[:40],
                                      target_fmr=0.1, target_fpir=0.1, actor="ml")
        health = store.index_health(actor="ops", sample=50)
        shown += [("calibration", calibration), ("health", health)]

        # The folder is copied at each checkpoint and scanned at the end, once every key
        # that ever existed is known (subject and hold keys appear over time).
        scanner = Scanner({})
        scans: list[tuple[str, dict[Path, bytes]]] = []

        def checkpoint(label: str) -> None:
            copies = {p: p.read_bytes() for p in store_dir.rglob("*") if p.is_file()}
            scans.append((label, copies))
            scanner.scan_deleted_open_files(label)
            problems.extend(f"{label}: stray temp file {p.name} in the store folder"
                            for p in copies if p.name.startswith("."))

        scanner.needles = _disk_needles(all_keys)
        checkpoint("open, after enrol/search/verify/export")

        # Delete, erase, hold, purge, release, purge again.
        store.delete(ids[2], actor="dpo", reason="wrong capture")
        receipt = store.erase_subject(SUBJECT_IDS[6], actor="dpo", reason="Art. 17")
        assert receipt.records_erased == 2
        held_subject = SUBJECT_IDS[SHORT_LIVED[4]]
        assert store.place_hold(held_subject, actor="legal", reason="case 3").records == 2
        all_keys |= keyring_keys(store_dir, keys, "under-hold")
        clock.advance(days=2)
        purges = [store.purge_expired()]
        assert purges[0].purged == len(SHORT_LIVED) - 2 and purges[0].held_retained == 2
        assert store.release_hold(held_subject, actor="legal", reason="case closed").records == 2
        purges.append(store.purge_expired())
        all_keys |= keyring_keys(store_dir, keys, "after-purge")

        errors, bad_values = failure_workload(store, store_dir, keys, tmp_path, monkeypatch,
                                              clock)
        store.snapshot()
        checkpoint("open, after delete/erase/hold/purge/failures/snapshot")
        stats = store.stats()
        shown += [("store", store), ("stats", stats)]
        store.close()
        checkpoint("closed")
        left = {p.name for p in store_dir.iterdir()}
        if left != STORE_FILES:
            problems.append(f"after close the store folder holds {sorted(left)}")

        reopened = bt.TemplateStore.open(store_dir, key_provider=keys, clock=clock)
        results.append(reopened.search(mated[1], purpose="watchlist", actor="analyst"))
        assert results[-1].candidates
        reopened.close()
        checkpoint("closed again after reopen from the snapshot")

    scanner.needles = _disk_needles(all_keys)
    for label, copies in scans:
        _scan_copies(scanner, copies, label)
    for entry in sorted(temp_entries() - temp_before):
        scanner.scan_tree(Path(tempfile.gettempdir()) / entry, f"new temp entry {entry}")

    # Positive control: the scanner finds what it looks for, at any offset.
    planted = os.urandom(1001) + TEMPLATES[3].astype("<f2").tobytes() + os.urandom(7) + \
        SUBJECT_IDS[9].encode("utf-16-le") + master[:16]
    found = {name for name, _ in find_needles(planted, scanner.needles)}
    assert any("raw-f16" in n for n in found) and any("utf-16" in n for n in found)
    assert "key master raw" in found

    problems += scanner.hits

    # Reprs and str() of results, keys, the store; every exception; logs and warnings.
    text = {MARK: "a subject id / metadata / passphrase marker"}
    text |= key_strings(all_keys)
    involved = [*mated, *(v.template for v in views), *bad_values,
                *(TEMPLATES[i] for i in range(0, 40))]
    text |= {s: "a template value" for s in value_strings(involved)}
    shown += [("search result", r) for r in results]
    shown += [("candidate", c) for r in results for c in r.candidates]
    shown += [("verification", v) for v in verifications]
    shown += [("record view", v) for v in views]
    shown += [("confirmation", c) for c in confirmations]
    shown += [("purge report", p) for p in purges]
    shown += [("erasure receipt", receipt)]
    shown += [("secret key", keys.master_key()), ("file key provider", keys)]
    for what, obj in shown:
        for form in (repr(obj), str(obj), f"{obj}"):
            problems += text_problems(what, form, text)
    for exc in errors:
        for form in exception_texts(exc):
            problems += text_problems(f"{type(exc).__name__} {exc}", form, text)
    for record in caplog.records:
        problems += text_problems(f"log record {record.name}", record.getMessage(), text)
    for w in caught:
        problems += text_problems(f"warning {w.category.__name__}", str(w.message), text)
    out, err = capfd.readouterr()
    problems += text_problems("stdout", out, text) + text_problems("stderr", err, text)

    with capfd.disabled():
        print(f"\n[leaks] needles checked: {len(scanner.needles)} binary "
              f"({len(scanner.needles) - len(_key_and_text_needles(all_keys))} template "
              f"windows of {len(TEMPLATES)} templates and {len(PROBED)} probes), "
              f"{len(text)} text; "
              f"{scanner.files_scanned} files, {scanner.bytes_scanned:,} bytes scanned; "
              f"{len(errors)} exceptions, {len(shown)} objects, {len(caplog.records)} log "
              f"records, {len(caught)} warnings checked; hits: {len(problems)}")
    assert scanner.bytes_scanned > 200 * 300  # the sealed records really were read
    assert not problems, "\n".join(problems[:50])


def _key_and_text_needles(keys: dict[str, bytes]) -> dict[bytes, str]:
    texts = [*dict.fromkeys(SUBJECT_IDS), *(str(v) for v in BATCH_META.values()
                                            if isinstance(v, str)),
             *(single_meta(i)["note"] for i in SHORT_LIVED), f"{MARK}-META", MARK, PASSPHRASE]
    return text_needles(texts) | key_needles(keys)


def _disk_needles(keys: dict[str, bytes]) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for i, t in enumerate(TEMPLATES):
        out |= template_needles(f"template {i}", t)
    for j, p in enumerate(probes(GALLERY, PROBED, seed=11)):
        out |= template_needles(f"probe {j}", p)
    return out | _key_and_text_needles(keys)


def _scan_copies(scanner: Scanner, copies: dict[Path, bytes], label: str) -> None:
    for path, data in copies.items():
        scanner.bytes_scanned += len(data)
        scanner.files_scanned += 1
        scanner.hits += [f"{label}: {name} at {off} in {path.name}"
                         for name, off in find_needles(data, scanner.needles)]


# --- keys, providers and the store: reprs and pickling ---------------------------------------


@pytest.fixture
def providers(tmp_path: Path, keys: bt.FileKeyProvider,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    master_text = keys.path.read_text().strip()  # biotemplate-key-v1:<base64>
    monkeypatch.setenv("BT_TEST_ENV_KEY", master_text)
    return {
        "file": keys,
        "passphrase": bt.PassphraseKeyProvider(PASSPHRASE, salt_file=tmp_path / "salt",
                                               **ARGON_FLOOR),
        "env": bt.EnvKeyProvider("BT_TEST_ENV_KEY"),
    }


def test_key_and_provider_reprs_are_redacted(providers: dict[str, Any],
                                             store: bt.TemplateStore, store_dir: Path) -> None:
    master = providers["file"].master_key().reveal()
    assert providers["env"].master_key().reveal() == master
    phrase_key = providers["passphrase"].master_key().reveal()
    keys = {"master": master, "from-passphrase": phrase_key}
    keys |= keyring_keys(store_dir, providers["file"], "ring")
    text = key_strings(keys) | {PASSPHRASE: "the passphrase", MARK: "the passphrase marker"}
    ring = Keyring.load(store_dir / "keyring", providers["file"].master_key())
    objects: list[tuple[str, object]] = [
        *(f"{name} provider" for name in providers),
        "secret key", "keyring", "store"]
    values = [*providers.values(), providers["file"].master_key(), ring, store]
    problems = []
    for what, obj in zip(objects, values, strict=True):
        for form in (repr(obj), str(obj), f"{obj!s}", f"{obj!r}"):
            problems += text_problems(str(what), form, text)
    assert not problems, "\n".join(problems)
    assert repr(providers["file"].master_key()) == "SecretKey(<redacted>)"


def test_keys_providers_and_store_refuse_pickling(providers: dict[str, Any],
                                                  store: bt.TemplateStore,
                                                  store_dir: Path) -> None:
    ring = Keyring.load(store_dir / "keyring", providers["file"].master_key())
    things = [*providers.values(), providers["file"].master_key(), ring, store]
    for thing in things:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError):
                pickle.dumps(thing, protocol=protocol)
        with pytest.raises(TypeError):
            copy.deepcopy(thing)


# --- file modes -----------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _too_open(paths: Iterable[Path], allowed: int) -> list[str]:
    return [f"{p.name} is {_mode(p):04o}" for p in paths if _mode(p) & ~allowed]


def test_store_files_are_0600(store: bt.TemplateStore, store_dir: Path,
                              gallery: Any) -> None:
    store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                      purposes=["watchlist"], ttl=timedelta(days=30), source="case-file",
                      actor="svc")
    store.snapshot()
    open_files = sorted(store_dir.iterdir())
    assert STORE_FILES <= {p.name for p in open_files}
    assert any(p.name.endswith("-wal") for p in open_files)
    problems = _too_open(open_files, 0o600)  # WAL and -shm files too, while open
    store.close()
    problems += [f"(closed) {x}" for x in _too_open(store_dir.iterdir(), 0o600)]
    assert not problems, "files readable by group/others: " + "; ".join(problems)


def test_store_folder_is_0700(store: bt.TemplateStore, store_dir: Path) -> None:
    assert _mode(store_dir) == 0o700


def test_key_and_salt_files_are_0600(providers: dict[str, Any], tmp_path: Path) -> None:
    providers["passphrase"].master_key()  # creates the salt file
    assert _mode(providers["file"].path) == 0o600
    assert _mode(tmp_path / "salt") == 0o600


def test_subject_id_given_where_a_record_id_belongs_is_not_written_in_clear(
    store: bt.TemplateStore, store_dir: Path,
) -> None:
    """An operator who pastes a subject id into ``delete`` or ``confirm_match`` (both take
    an opaque string id) gets a refusal; the refusal is audited, but the audit trail is
    append-only and never erased, so the subject id must not land there in clear."""
    sid = f"{MARK}-SUBJ-MISUSE"
    store.enroll(TEMPLATES[0], subject_id=sid, purposes=["rare"], actor="svc")
    result = store.search(TEMPLATES[0], purpose="rare", actor="analyst")
    with pytest.raises(bt.RecordNotFound) as deleted:
        store.delete(sid, actor="dpo")
    with pytest.raises(bt.PolicyViolation) as confirmed:
        store.confirm_match(result.audit_seq, sid, reviewer="rev-1")
    store.close()
    scanner = Scanner(text_needles([sid]))
    scanner.scan_tree(store_dir, "store")
    assert scanner.files_scanned >= 3
    problems = list(scanner.hits)
    for exc in (deleted.value, confirmed.value):
        for form in exception_texts(exc):
            problems += text_problems(type(exc).__name__, form, {sid: "the subject id"})
    assert not problems, "\n".join(problems)


# --- a template passed where a name belongs --------------------------------------------------

FACE = np.random.default_rng(20_260_101).standard_normal(512)  # a 512-float template


def decimal_renderings(values: Iterable[float]) -> set[str]:
    """Every 6-decimal rendering of each value (rounded and truncated; as float64 and as
    float32), without the sign: what an echo of the value in text would contain."""
    out = set()
    for v in values:
        for x in (abs(float(v)), abs(float(np.float32(v)))):
            out.add(f"{x:.6f}")
            for text in (repr(x), str(np.float32(x))):
                if "." in text and "e" not in text:
                    out.add(text[: text.index(".") + 7])
    return {s for s in out if len(s) >= 8}  # "0.123456": 6 decimals


def misplaced_template_calls(store: bt.TemplateStore, dest: Path) -> list[tuple[str, Any]]:
    """(label, call) for every argument that takes a name, given the template (as an array
    and as a list) instead."""
    t = FACE
    calls: list[tuple[str, Any]] = []
    for form_name, x in (("array", FACE), ("list", FACE.tolist())):
        calls += [(f"{label} ({form_name})", call) for label, call in [
            ("search purpose", lambda x=x: store.search(t, purpose=x, actor="a")),
            ("search_many purpose", lambda x=x: store.search_many(t[None], purpose=x,
                                                                  actor="a")),
            ("verify purpose", lambda x=x: store.verify(t, subject_id="F-1", purpose=x,
                                                        actor="a")),
            ("enroll purposes", lambda x=x: store.enroll(t, subject_id="F-2", purposes=x,
                                                         actor="a")),
            ("enroll purposes=[t]", lambda x=x: store.enroll(t, subject_id="F-2",
                                                             purposes=[x], actor="a")),
            ("enroll purposes=[ok, t]", lambda x=x: store.enroll(
                t, subject_id="F-2", purposes=["rare", x], actor="a")),
            ("enroll_many purposes", lambda x=x: store.enroll_many(
                t[None], subject_ids=["F-2"], purposes=x, actor="a")),
            ("search mode", lambda x=x: store.search(t, purpose="watchlist", mode=x,
                                                     actor="a")),
            ("search_many mode", lambda x=x: store.search_many(t[None], purpose="watchlist",
                                                               mode=x, actor="a")),
            ("enroll subject_id", lambda x=x: store.enroll(t, subject_id=x, purposes=["rare"],
                                                           actor="a")),
            ("enroll_many subject_ids=[t]", lambda x=x: store.enroll_many(
                t[None], subject_ids=[x], purposes=["rare"], actor="a")),
            ("enroll_many subject_ids=t", lambda x=x: store.enroll_many(
                t[None], subject_ids=x, purposes=["rare"], actor="a")),
            ("verify subject_id", lambda x=x: store.verify(t, subject_id=x, purpose="rare",
                                                           actor="a")),
            ("export subject_id", lambda x=x: store.export_subject(x, actor="a")),
            ("erase subject_id", lambda x=x: store.erase_subject(x, actor="a")),
            ("hold subject_id", lambda x=x: store.place_hold(x, actor="a", reason="r")),
            ("release subject_id", lambda x=x: store.release_hold(x, actor="a", reason="r")),
            ("delete record_id", lambda x=x: store.delete(x, actor="a")),
            ("search reason", lambda x=x: store.search(t, purpose="watchlist", actor="a",
                                                       reason=x)),
            ("verify reason", lambda x=x: store.verify(t, subject_id="F-1", purpose="rare",
                                                       actor="a", reason=x)),
            ("export reason", lambda x=x: store.export_subject("F-1", actor="a", reason=x)),
            ("erase reason", lambda x=x: store.erase_subject("F-1", actor="a", reason=x)),
            ("hold reason", lambda x=x: store.place_hold("F-1", actor="a", reason=x)),
            ("policy reason", lambda x=x: store.set_policy(store.policy, actor="a",
                                                           reason=x)),
            ("search actor", lambda x=x: store.search(t, purpose="watchlist", actor=x)),
            ("enroll actor", lambda x=x: store.enroll(t, subject_id="F-2", purposes=["rare"],
                                                      actor=x)),
            ("verify actor", lambda x=x: store.verify(t, subject_id="F-1", purpose="rare",
                                                      actor=x)),
            ("export actor", lambda x=x: store.export_subject("F-1", actor=x)),
            ("erase actor", lambda x=x: store.erase_subject("F-1", actor=x)),
            ("backup actor", lambda x=x: store.backup(dest, actor=x)),
            ("confirm reviewer", lambda x=x: store.confirm_match(1, "0" * 32, reviewer=x)),
        ]]
    return calls


def _floats_in(value: object) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list | tuple):
        return [f for v in value for f in _floats_in(v)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats_in(v)]
    return []


def test_a_template_passed_as_a_name_is_never_echoed(tmp_path: Path,
                                                     policy: bt.RetentionPolicy) -> None:
    """Review finding (issue 9, item 7.1): a template passed by mistake as ``mode`` was
    echoed in full in the error, and as ``purpose`` left 16 of its values in audit.db."""
    keys = bt.FileKeyProvider.generate(tmp_path / "master.key")
    folder = tmp_path / "store"
    store = bt.TemplateStore.create(folder, dim=512, model=MODEL, policy=policy,
                                    key_provider=keys)
    store.enroll(FACE, subject_id="F-1", purposes=["rare"], actor="svc")
    needles = decimal_renderings(FACE)
    assert len(needles) > 500
    problems: list[str] = []
    refused = []
    for label, call in misplaced_template_calls(store, tmp_path / "backup"):
        before = store.audit.verify().entries
        try:
            call()
        except bt.BiotemplateError as exc:
            if len(str(exc)) >= 300:
                problems.append(f"{label}: a {len(str(exc))}-character message")
            problems += [f"{label}: {type(exc).__name__} echoes {n}"
                         for form in exception_texts(exc) for n in needles if n in form]
        else:
            problems.append(f"{label}: not refused")
        after = store.audit.verify().entries
        if after != before + 1:
            problems.append(f"{label}: {after - before} audit entries, expected 1")
        refused += [store.audit.get(seq) for seq in range(before + 1, after + 1)]
    for entry in refused:
        if entry.outcome != "refused" or _floats_in(dict(entry.fields)):
            problems.append(f"audit entry {entry.seq} ({entry.event}): {entry.outcome}, "
                            f"floats {_floats_in(dict(entry.fields))[:3]}")
    store.close()
    for path in sorted(folder.iterdir()):  # audit.db and every other file of the store
        data = path.read_bytes()
        problems += [f"{path.name} holds {n}" for n in needles if n.encode() in data]
    assert not problems, "\n".join(problems[:40])
