"""Key providers (keys.py): the typed key format, where key material may live, what the
environment keeps, the Argon2id cost floor, and key hygiene (no pickles, no key bytes in
reprs).

Argon2id derivations run at the floor (t=3, 64 MiB, ~0.1 s each): tests that only check a
refusal write the salt file by hand and never derive.
"""

from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

import biotemplate as bt
from biotemplate import sealing
from biotemplate.keys import (
    ARGON2_MIN_MEM,
    ARGON2_MIN_OPS,
    KEY_PREFIX,
    EnvKeyProvider,
    FileKeyProvider,
    PassphraseKeyProvider,
    SecretKey,
    check_key_location,
    key_text,
)
from biotemplate.synthetic import Gallery

DIM = 64
ARGON_FLOOR = {"ops_limit": ARGON2_MIN_OPS, "mem_limit": ARGON2_MIN_MEM}  # cheapest allowed
PHRASE = "correct horse battery staple"


def _no_key_in(text: str, raw: bytes) -> None:
    assert raw.hex() not in text.lower()
    assert raw.hex().upper() not in text
    assert repr(raw) not in text
    assert base64.b64encode(raw).decode()[:16] not in text


def _key_file(path: Path, content: bytes | str) -> FileKeyProvider:
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data)
    path.chmod(0o600)
    return FileKeyProvider(path)


def _salt_file(path: Path, *, ops: Any, mem: Any, salt: Any = bytes(16)) -> Path:
    path.write_bytes(msgpack.packb({"v": 1, "salt": salt, "ops": ops, "mem": mem},
                                   use_bin_type=True))
    path.chmod(0o600)
    return path


# --- SecretKey and hygiene -------------------------------------------------------------------


def test_secret_key_refuses_pickling_and_hides_bytes() -> None:
    raw = sealing.random_key()
    sk = SecretKey(raw)
    for shown in (repr(sk), str(sk), f"{sk!r}", repr([sk])):
        _no_key_in(shown, raw)
    with pytest.raises(TypeError):
        pickle.dumps(sk)
    assert sk.reveal() == raw


def test_secret_key_rejects_wrong_length() -> None:
    for bad in (b"", os.urandom(31), os.urandom(33)):
        with pytest.raises(bt.KeyUnavailable):
            SecretKey(bad)


@pytest.mark.parametrize("kind", ["file", "env", "passphrase"])
def test_key_providers_refuse_pickling_and_hide_key(kind: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if kind == "file":
        provider: Any = FileKeyProvider.generate(tmp_path / "master.key")
    elif kind == "env":
        monkeypatch.setenv("BT_TEST_MASTER_KEY", key_text(sealing.random_key()))
        provider = EnvKeyProvider("BT_TEST_MASTER_KEY")
    else:
        provider = PassphraseKeyProvider(PHRASE, salt_file=tmp_path / "salt", **ARGON_FLOOR)
    raw = provider.master_key().reveal()
    for shown in (repr(provider), str(provider), repr(provider.master_key())):
        _no_key_in(shown, raw)
        assert "correct horse" not in shown
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(provider, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps(provider.master_key())


# --- the typed key format --------------------------------------------------------------------


def test_generate_writes_the_typed_format(tmp_path: Path) -> None:
    provider = FileKeyProvider.generate(tmp_path / "master.key")
    text = provider.path.read_text()
    assert text.startswith(KEY_PREFIX) and text.endswith("\n")
    raw = base64.b64decode(text[len(KEY_PREFIX):].strip(), validate=True)
    assert len(raw) == 32 and provider.master_key().reveal() == raw
    assert key_text(raw) == text.strip()


@pytest.mark.parametrize("text", [
    pytest.param(lambda raw: key_text(raw), id="bare"),
    pytest.param(lambda raw: key_text(raw) + "\n", id="newline"),
    pytest.param(lambda raw: "  " + key_text(raw) + "\r\n", id="crlf-and-spaces"),
])
def test_the_typed_format_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      text: Any) -> None:
    raw = sealing.random_key()
    assert _key_file(tmp_path / "k", text(raw)).master_key().reveal() == raw
    monkeypatch.setenv("BT_TEST_KEY", text(raw))
    assert EnvKeyProvider("BT_TEST_KEY").master_key().reveal() == raw


RAW = bytes(range(32))
REFUSED = [
    pytest.param(RAW, id="32-raw-bytes"),
    pytest.param(b"correct horse battery staple 32c", id="32-char-passphrase"),
    pytest.param(RAW.hex().encode(), id="64-hex"),
    pytest.param(RAW.hex().upper().encode(), id="64-HEX"),
    pytest.param(base64.b64encode(RAW), id="untagged-base64"),
    pytest.param(base64.urlsafe_b64encode(b"\xfb" * 32), id="untagged-urlsafe-base64"),
    pytest.param((KEY_PREFIX + RAW.hex()).encode(), id="tagged-hex"),
    pytest.param((KEY_PREFIX + base64.b64encode(RAW[:31]).decode()).encode(), id="tagged-31"),
    pytest.param((KEY_PREFIX + base64.b64encode(RAW + b"x").decode()).encode(),
                 id="tagged-33"),
    pytest.param((KEY_PREFIX + base64.b64encode(RAW).decode()[:-2]).encode(),
                 id="tagged-truncated"),
    pytest.param((KEY_PREFIX + "!" + base64.b64encode(RAW).decode()).encode(),
                 id="tagged-junk"),
    pytest.param(("biotemplate-key-v2:" + base64.b64encode(RAW).decode()).encode(),
                 id="other-version"),
    pytest.param(KEY_PREFIX.encode(), id="prefix-only"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("content", REFUSED)
def test_file_provider_refuses_untyped_keys(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(bt.KeyUnavailable) as info:
        _key_file(tmp_path / "k", content).master_key()
    message = str(info.value)
    assert KEY_PREFIX in message and "base64" in message  # the format, and how to convert
    tail = content[-16:]
    if len(tail) >= 8 and not KEY_PREFIX.encode().endswith(tail):
        assert tail.decode("latin-1") not in message  # never the content


@pytest.mark.parametrize("content", [c for c in REFUSED
                                     if c.values[0] and b"\x00" not in c.values[0]])
def test_env_provider_refuses_untyped_keys(monkeypatch: pytest.MonkeyPatch,
                                           content: bytes) -> None:
    """(An environment variable cannot hold an empty value here or a NUL byte: those
    contents are covered by the file provider's test above.)"""
    value = content.decode("utf-8", "surrogateescape")
    monkeypatch.setenv("BT_TEST_KEY", value)
    with pytest.raises(bt.KeyUnavailable) as info:
        EnvKeyProvider("BT_TEST_KEY").master_key()
    assert KEY_PREFIX in str(info.value)
    tail = value[-16:]
    if len(tail) >= 8 and not KEY_PREFIX.endswith(tail):
        assert tail not in str(info.value)  # never the value
    assert "BT_TEST_KEY" not in os.environ  # a refused value is not left for children


# --- the environment -------------------------------------------------------------------------


def test_env_provider_removes_the_variable_and_keeps_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = sealing.random_key()
    monkeypatch.setenv("BT_TEST_KEY", key_text(raw))
    provider = EnvKeyProvider("BT_TEST_KEY")
    assert provider.master_key().reveal() == raw
    assert "BT_TEST_KEY" not in os.environ
    child = subprocess.run([sys.executable, "-c",
                            "import os; print(os.environ.get('BT_TEST_KEY', 'absent'))"],
                           capture_output=True, text=True, check=True, timeout=60)
    assert child.stdout.strip() == "absent"  # a child process does not inherit it
    assert provider.master_key().reveal() == raw  # later calls use the key it kept
    with pytest.raises(bt.KeyUnavailable, match="not set"):
        EnvKeyProvider("BT_TEST_KEY").master_key()  # a new provider finds nothing
    monkeypatch.setenv("BT_TEST_KEY", key_text(sealing.random_key()))
    assert provider.master_key().reveal() == raw  # the first value read stays


def test_env_key_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          policy: bt.RetentionPolicy, clock: Any, gallery: Gallery) -> None:
    raw = os.urandom(32)
    monkeypatch.setenv("BT_TEST_KEY", key_text(raw))
    provider = bt.EnvKeyProvider("BT_TEST_KEY")
    with bt.TemplateStore.create(tmp_path / "s", dim=DIM, model="m", policy=policy,
                                 key_provider=provider, clock=clock) as s:
        s.enroll(gallery.templates[0], subject_id="S", purposes=["rare"], actor="svc")
    with bt.TemplateStore.open(tmp_path / "s", key_provider=provider, clock=clock) as s:
        assert len(s.export_subject("S", actor="dpo")) == 1  # the kept key reopens
    for untyped in (raw.hex(), base64.b64encode(raw).decode()):
        monkeypatch.setenv("BT_TEST_KEY", untyped)
        with pytest.raises(bt.KeyUnavailable, match=KEY_PREFIX):
            bt.TemplateStore.open(tmp_path / "s", key_provider=bt.EnvKeyProvider("BT_TEST_KEY"),
                                  clock=clock)
    monkeypatch.setenv("BT_TEST_KEY", key_text(os.urandom(32)))
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(tmp_path / "s", key_provider=bt.EnvKeyProvider("BT_TEST_KEY"),
                              clock=clock)
    monkeypatch.delenv("BT_TEST_KEY", raising=False)
    with pytest.raises(bt.KeyUnavailable):
        bt.EnvKeyProvider("BT_TEST_KEY").master_key()
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(tmp_path / "s", key_provider=bt.EnvKeyProvider("BT_TEST_KEY"),
                              clock=clock)
    monkeypatch.setenv("BT_TEST_KEY", "not a key")
    with pytest.raises(bt.KeyUnavailable):
        bt.EnvKeyProvider("BT_TEST_KEY").master_key()


# --- where key material lives ----------------------------------------------------------------


def test_key_file_mode(tmp_path: Path, store: bt.TemplateStore, store_dir: Path,
                       keys: bt.FileKeyProvider) -> None:
    assert (keys.path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(bt.KeyFileExists):
        bt.FileKeyProvider.generate(keys.path)
    assert isinstance(bt.KeyFileExists("x"), FileExistsError)
    store.close()
    before = keys.path.read_bytes()
    os.chmod(keys.path, 0o644)
    with pytest.raises(bt.KeyUnavailable, match="chmod"):
        keys.master_key()
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(store_dir, key_provider=keys)
    assert keys.path.read_bytes() == before  # nothing rewrote the key
    os.chmod(keys.path, 0o600)
    bt.TemplateStore.open(store_dir, key_provider=keys).close()
    with pytest.raises(bt.KeyUnavailable):
        bt.FileKeyProvider(tmp_path / "absent.key").master_key()


def test_a_key_file_behind_a_symlink_is_refused(tmp_path: Path, store: bt.TemplateStore,
                                                store_dir: Path,
                                                keys: bt.FileKeyProvider) -> None:
    store.close()
    link = tmp_path / "link.key"
    link.symlink_to(keys.path)
    with pytest.raises(bt.KeyUnavailable, match="symbolic link"):
        FileKeyProvider(link).master_key()
    with pytest.raises(bt.KeyUnavailable, match="symbolic link"):
        check_key_location(FileKeyProvider(link), store_dir)
    with pytest.raises(bt.KeyUnavailable, match="symbolic link"):
        bt.TemplateStore.open(store_dir, key_provider=FileKeyProvider(link))
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(bt.KeyUnavailable, match="symbolic link"):
        FileKeyProvider(dangling).master_key()
    # a link in a parent folder is not the key file's own: allowed
    (tmp_path / "keys-dir").symlink_to(tmp_path, target_is_directory=True)
    assert FileKeyProvider(tmp_path / "keys-dir" / keys.path.name).master_key().reveal() == (
        keys.master_key().reveal())


def test_a_key_path_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(bt.KeyUnavailable):
        FileKeyProvider(folder).master_key()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(bt.KeyUnavailable, match="regular file"):
        FileKeyProvider(fifo).master_key()  # and does not block waiting for a writer


def test_a_key_file_inside_the_store_folder_is_refused(
        tmp_path: Path, policy: bt.RetentionPolicy, clock: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700)
    inside = FileKeyProvider.generate(folder / "master.key")
    with pytest.raises(bt.KeyUnavailable, match="inside the store folder"):
        bt.TemplateStore.create(folder, dim=DIM, model="m", policy=policy,
                                key_provider=inside, clock=clock)
    assert sorted(p.name for p in folder.iterdir()) == ["master.key"]  # nothing created
    outside = _key_file(tmp_path / "master.key", (folder / "master.key").read_bytes())
    bt.TemplateStore.create(folder, dim=DIM, model="m", policy=policy, key_provider=outside,
                            clock=clock).close()
    with pytest.raises(bt.KeyUnavailable, match="inside the store folder") as info:
        bt.TemplateStore.open(folder, key_provider=inside, clock=clock)
    assert KEY_PREFIX not in str(info.value)  # names the rule, not the key
    nested = folder / "sub"
    nested.mkdir(mode=0o700)
    with pytest.raises(bt.KeyUnavailable, match="inside the store folder"):
        check_key_location(FileKeyProvider(nested / "k"), folder)
    # the same folder reached through a link, or a relative path, is still the folder
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    with pytest.raises(bt.KeyUnavailable, match="inside the store folder"):
        check_key_location(inside, tmp_path / "alias")
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        with pytest.raises(bt.KeyUnavailable, match="inside the store folder"):
            check_key_location(FileKeyProvider("s/master.key"), folder)
    # a sibling folder whose name merely starts like the store's is elsewhere
    sibling = tmp_path / "s-keys"
    sibling.mkdir(mode=0o700)
    check_key_location(FileKeyProvider(sibling / "master.key"), folder)
    bt.TemplateStore.open(folder, key_provider=outside, clock=clock).close()


def test_a_salt_file_inside_the_store_folder_is_refused(
        tmp_path: Path, store: bt.TemplateStore, store_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store.close()
    salt = _salt_file(store_dir / "salt", ops=ARGON2_MIN_OPS, mem=ARGON2_MIN_MEM)
    derived = []
    monkeypatch.setattr(sealing, "passphrase_key", lambda *a: derived.append(a) or bytes(32))
    provider = PassphraseKeyProvider(PHRASE, salt_file=salt, **ARGON_FLOOR)
    with pytest.raises(bt.KeyUnavailable, match="inside the store folder"):
        bt.TemplateStore.open(store_dir, key_provider=provider)
    assert derived == []  # refused before any derivation


def test_providers_without_a_file_pass_the_location_check(tmp_path: Path) -> None:
    check_key_location(EnvKeyProvider("BT_TEST_NOT_READ"), tmp_path)
    check_key_location(object(), tmp_path)


# --- the Argon2id cost floor -----------------------------------------------------------------


def test_passphrase_key_provider(tmp_path: Path, policy: bt.RetentionPolicy, clock: Any,
                                 gallery: Gallery) -> None:
    limits = ARGON_FLOOR
    salt = tmp_path / "salt"
    good = bt.PassphraseKeyProvider(PHRASE, salt_file=salt, **limits)
    with bt.TemplateStore.create(tmp_path / "s", dim=DIM, model="m", policy=policy,
                                 key_provider=good, clock=clock) as s:
        s.enroll(gallery.templates[0], subject_id="S", purposes=["rare"], actor="svc")
    assert salt.exists()
    again = bt.PassphraseKeyProvider(PHRASE, salt_file=salt, **limits)
    with bt.TemplateStore.open(tmp_path / "s", key_provider=again, clock=clock) as s:
        assert len(s.export_subject("S", actor="dpo")) == 1
    wrong = bt.PassphraseKeyProvider("wrong horse", salt_file=salt, **limits)
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(tmp_path / "s", key_provider=wrong, clock=clock)
    assert "correct horse" not in repr(good)


@pytest.mark.parametrize(("ops", "mem"), [
    pytest.param(1, ARGON2_MIN_MEM, id="t=1"),
    pytest.param(2, ARGON2_MIN_MEM, id="t=2"),
    pytest.param(ARGON2_MIN_OPS, 8192, id="8-KiB"),
    pytest.param(ARGON2_MIN_OPS, ARGON2_MIN_MEM - 1024, id="64-MiB-minus-1-KiB"),
    pytest.param(ARGON2_MIN_OPS, 2**50, id="absurd-memory"),
    pytest.param(10**6, ARGON2_MIN_MEM, id="absurd-passes"),
    pytest.param(True, ARGON2_MIN_MEM, id="bool"),
    pytest.param(3.0, ARGON2_MIN_MEM, id="float"),
    pytest.param(ARGON2_MIN_OPS, "64M", id="str"),
])
def test_costs_outside_the_bounds_are_refused(tmp_path: Path, ops: Any, mem: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    derived = []
    monkeypatch.setattr(sealing, "passphrase_key", lambda *a: derived.append(a) or bytes(32))
    with pytest.raises(bt.InvalidInput, match=r"ops_limit|mem_limit"):
        PassphraseKeyProvider(PHRASE, salt_file=tmp_path / "new", ops_limit=ops,
                              mem_limit=mem)
    assert not (tmp_path / "new").exists()
    # an existing salt file asking for them (a tampered one) is refused as well
    salt = _salt_file(tmp_path / "salt", ops=ops, mem=mem)
    provider = PassphraseKeyProvider(PHRASE, salt_file=salt, **ARGON_FLOOR)
    with pytest.raises(bt.KeyUnavailable, match=r"salt file .* asks for Argon2id"):
        provider.master_key()
    assert derived == []  # never derived at the lower cost


def test_the_floor_is_rfc_9106_second_option() -> None:
    assert ARGON2_MIN_OPS == 3 and ARGON2_MIN_MEM == 64 * 2**20  # t=3, m=2^16 KiB
    assert sealing.ARGON2_OPS >= ARGON2_MIN_OPS and sealing.ARGON2_MEM >= ARGON2_MIN_MEM


@pytest.mark.parametrize("body", [
    pytest.param({"v": 1, "salt": bytes(15), "ops": 3, "mem": ARGON2_MIN_MEM}, id="short-salt"),
    pytest.param({"v": 1, "salt": "text", "ops": 3, "mem": ARGON2_MIN_MEM}, id="str-salt"),
    pytest.param({"v": 1, "ops": 3, "mem": ARGON2_MIN_MEM}, id="no-salt"),
    pytest.param([1, 2, 3], id="a-list"),
])
def test_a_corrupt_salt_file_is_refused(tmp_path: Path, body: Any) -> None:
    salt = tmp_path / "salt"
    salt.write_bytes(msgpack.packb(body, use_bin_type=True))
    with pytest.raises(bt.KeyUnavailable, match="corrupt"):
        PassphraseKeyProvider(PHRASE, salt_file=salt, **ARGON_FLOOR).master_key()
