"""Pkcs11KeyProvider against a real SoftHSM2 token created for this module.

The token lives in a temporary folder (``SOFTHSM2_CONF`` names a config whose tokendir is
there) and is made with ``softhsm2-util --init-token``. Without softhsm2 or python-pkcs11
the tests skip with one line saying what to install; ``BIOTEMPLATE_REQUIRE_HSM=1`` (set by
``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import biotemplate as bt
from biotemplate.synthetic import Gallery, probes, strangers

DIM = 64
USER_PIN = "user-pin-4826"
SO_PIN = "so-pin-9153"
WRONG_PIN = "user-pin-0000"
REQUIRE = "BIOTEMPLATE_REQUIRE_HSM"
LIBRARIES = (
    "/usr/lib/softhsm/libsofthsm2.so",                      # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",                     # Fedora, RHEL
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",                # built from source
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",             # macOS
)
HEADER = 4 + 1 + 1  # "BTHK" | version | label length


# --- the token (skip, or fail under BIOTEMPLATE_REQUIRE_HSM=1) ---------------------------


def _has_pkcs11() -> bool:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return False
    return True


def _library() -> str | None:
    return next((lib for lib in LIBRARIES if Path(lib).is_file()), None)


def _missing() -> str | None:
    """One line naming what is missing and how to install it, or None."""
    gaps = []
    if not _has_pkcs11():
        gaps.append("python-pkcs11 (pip install 'biotemplate[hsm]')")
    if shutil.which("softhsm2-util") is None or _library() is None:
        gaps.append("SoftHSM2 (apt-get install softhsm2)")
    if not gaps:
        return None
    return f"HSM tests need {' and '.join(gaps)}"


# Decided once for the whole module, so a run without them reports one line, not one per test.
if (_REASON := _missing()) is not None:
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{_REASON} ({REQUIRE}=1)", pytrace=False)
    pytest.skip(f"{_REASON}; {REQUIRE}=1 makes this a failure", allow_module_level=True)


@dataclass(frozen=True)
class SoftHsm:
    library: str
    token: str = "T"
    other_token: str = "T2"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """Two fresh tokens, T and T2 (user PIN USER_PIN), in a throwaway token folder."""
    import pkcs11

    library = _library()
    assert library is not None
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        pkcs11.unload(library)  # SoftHSM2 reads its config when the library initialises
        hsm = SoftHsm(library)
        for label in (hsm.token, hsm.other_token):
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                            "--pin", USER_PIN, "--so-pin", SO_PIN],
                           check=True, capture_output=True)
        yield hsm
        pkcs11.unload(library)


@pytest.fixture
def label() -> str:
    return f"kek-{uuid.uuid4().hex[:12]}"


def provider_for(hsm: SoftHsm, label: str, path: Path, **changes: Any) -> bt.Pkcs11KeyProvider:
    args: dict[str, Any] = {"token_label": hsm.token, "key_label": label,
                            "wrapped_key_file": path, "pin": USER_PIN}
    args.update(changes)
    return bt.Pkcs11KeyProvider(args.pop("library", hsm.library), **args)


@pytest.fixture
def wrapped(softhsm: SoftHsm, label: str, tmp_path: Path) -> bt.Pkcs11KeyProvider:
    """A token key ``label`` in token T and a master key wrapped under it."""
    assert bt.Pkcs11KeyProvider.create_token_key(softhsm.library, token_label=softhsm.token,
                                                 key_label=label, pin=USER_PIN)
    return bt.Pkcs11KeyProvider.generate(softhsm.library, token_label=softhsm.token,
                                         key_label=label, pin=USER_PIN,
                                         wrapped_key_file=tmp_path / "master.wrapped")


def refused(provider: bt.Pkcs11KeyProvider, match: str) -> bt.KeyUnavailable:
    """master_key() raises a KeyUnavailable that names no PIN and chains nothing."""
    with pytest.raises(bt.KeyUnavailable, match=match) as err:
        provider.master_key()
    exc = err.value
    assert type(exc) is bt.KeyUnavailable
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    for pin in (USER_PIN, WRONG_PIN, SO_PIN):
        assert pin not in str(exc) and pin not in repr(exc)
    return exc


# --- arguments, repr, pickling -----------------------------------------------------------


def test_repr_shows_no_pin_and_pickling_is_refused(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(0o600)
    for provider in (
        bt.Pkcs11KeyProvider("/x/lib.so", token_label="T", key_label="k", pin=USER_PIN,
                             wrapped_key_file=tmp_path / "w"),
        bt.Pkcs11KeyProvider("/x/lib.so", token_label="T", key_label="k", pin_file=pin_file,
                             wrapped_key_file=tmp_path / "w"),
    ):
        for shown in (repr(provider), str(provider), f"{provider!r}", repr([provider])):
            assert USER_PIN not in shown and "<redacted>" in shown
            assert "'k'" in shown and "/x/lib.so" in shown
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError):
                pickle.dumps(provider, protocol=protocol)


@pytest.mark.parametrize("bad", [
    {"pin": None},                                   # neither pin nor pin_file
    {"pin_file": "pin"},                             # both
    {"pin": ""}, {"key_label": ""}, {"token_label": ""}, {"token_label": "x" * 33},
    {"key_label": "k" * 65}, {"key_label": "\U0001f511" * 64}, {"library": 3},
    {"key_label": b"kek"}, {"pin": 1234},
])
def test_bad_arguments_are_refused(bad: dict[str, Any], tmp_path: Path) -> None:
    args: dict[str, Any] = {"token_label": "T", "key_label": "k", "pin": USER_PIN,
                            "wrapped_key_file": tmp_path / "w"}
    args.update(bad)
    with pytest.raises(bt.InvalidInput):
        bt.Pkcs11KeyProvider(args.pop("library", "/x/lib.so"), **args)


# --- against the SoftHSM2 token ----------------------------------------------------------


def test_round_trip(softhsm: SoftHsm, label: str, tmp_path: Path) -> None:
    created = bt.Pkcs11KeyProvider.create_token_key(
        softhsm.library, token_label=softhsm.token, key_label=label, pin=USER_PIN)
    again = bt.Pkcs11KeyProvider.create_token_key(
        softhsm.library, token_label=softhsm.token, key_label=label, pin=USER_PIN)
    assert (created, again) == (True, False)  # made once, then found
    path = tmp_path / "master.wrapped"
    provider = bt.Pkcs11KeyProvider.generate(
        softhsm.library, token_label=softhsm.token, key_label=label, pin=USER_PIN,
        wrapped_key_file=path)
    first, second = provider.master_key(), provider.master_key()
    assert len(first.reveal()) == 32 and first.reveal() == second.reveal()
    assert provider_for(softhsm, label, path).master_key().reveal() == first.reveal()
    blob = path.read_bytes()
    assert blob[:5] == b"BTHK\x01" and blob[HEADER : HEADER + len(label)] == label.encode()
    assert len(blob) == HEADER + len(label) + 12 + 32 + 16
    assert first.reveal() not in blob
    other = bt.Pkcs11KeyProvider.generate(
        softhsm.library, token_label=softhsm.token, key_label=label, pin=USER_PIN,
        wrapped_key_file=tmp_path / "second.wrapped")
    assert other.master_key().reveal() != first.reveal()  # a fresh random key each time


def test_a_store_created_and_reopened_with_the_hsm(
        softhsm: SoftHsm, wrapped: bt.Pkcs11KeyProvider, tmp_path: Path,
        policy: bt.RetentionPolicy, clock: Any, gallery: Gallery) -> None:
    folder = tmp_path / "store"
    with bt.TemplateStore.create(folder, dim=DIM, model="m", policy=policy,
                                 key_provider=wrapped, clock=clock) as store:
        store.enroll_many(gallery.templates, subject_ids=gallery.subject_ids,
                          purposes=["watchlist"], ttl=timedelta(days=30), actor="svc",
                          source="enrolment-desk")
        hit = store.search(probes(gallery, [7], seed=9)[0], purpose="watchlist", actor="a")
        assert hit.candidates[0].subject_id == "P-000007"
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    reopened = provider_for(softhsm, wrapped.key_label, wrapped.wrapped_key_file,
                            pin=None, pin_file=pin_file)
    with bt.TemplateStore.open(folder, key_provider=reopened, clock=clock) as store:
        assert store.stats().records == len(gallery.subject_ids)
        hit = store.search(probes(gallery, [3], seed=4)[0], purpose="watchlist", actor="a")
        assert hit.decision and hit.candidates[0].subject_id == "P-000003"
        nobody = store.search(strangers(1, DIM)[0], purpose="watchlist", actor="a")
        assert nobody.candidates == []
    wrong = provider_for(softhsm, wrapped.key_label, wrapped.wrapped_key_file, pin=WRONG_PIN)
    with pytest.raises(bt.KeyUnavailable):
        bt.TemplateStore.open(folder, key_provider=wrong, clock=clock)


def test_wrong_pin(softhsm: SoftHsm, wrapped: bt.Pkcs11KeyProvider, tmp_path: Path) -> None:
    wrong = provider_for(softhsm, wrapped.key_label, wrapped.wrapped_key_file, pin=WRONG_PIN)
    refused(wrong, "refused the PIN")
    with pytest.raises(bt.KeyUnavailable, match="refused the PIN"):
        bt.Pkcs11KeyProvider.generate(softhsm.library, token_label=softhsm.token,
                                      key_label=wrapped.key_label, pin=WRONG_PIN,
                                      wrapped_key_file=tmp_path / "never.wrapped")
    assert not (tmp_path / "never.wrapped").exists()
    assert len(wrapped.master_key().reveal()) == 32  # SoftHSM2 does not lock the PIN


@pytest.mark.parametrize(("change", "match"), [
    ({"token_label": "absent"}, "no PKCS#11 token labelled 'absent'"),
    ({"library": "/nonexistent/libnothing.so"}, "cannot load the PKCS#11 library"),
    ({"wrapped_key_file": "gone.wrapped"}, "does not exist"),
])
def test_missing_token_library_or_file(change: dict[str, Any], match: str, softhsm: SoftHsm,
                                       wrapped: bt.Pkcs11KeyProvider, tmp_path: Path) -> None:
    if "wrapped_key_file" in change:
        change = {"wrapped_key_file": tmp_path / change["wrapped_key_file"]}
    refused(provider_for(softhsm, wrapped.key_label, wrapped.wrapped_key_file, **change), match)


def test_missing_key_label(softhsm: SoftHsm, wrapped: bt.Pkcs11KeyProvider,
                           tmp_path: Path) -> None:
    path = tmp_path / "other.wrapped"
    with pytest.raises(bt.KeyUnavailable, match="holds no AES key labelled 'absent'"):
        bt.Pkcs11KeyProvider.generate(softhsm.library, token_label=softhsm.token,
                                      key_label="absent", pin=USER_PIN, wrapped_key_file=path)
    assert not path.exists()
    body = wrapped.wrapped_key_file.read_bytes()[HEADER + len(wrapped.key_label):]
    path.write_bytes(b"BTHK\x01\x06absent" + body)  # a file naming a key the token lacks
    refused(provider_for(softhsm, "absent", path), "holds no AES key labelled 'absent'")


def test_another_token_key(softhsm: SoftHsm, wrapped: bt.Pkcs11KeyProvider,
                           tmp_path: Path) -> None:
    import pkcs11

    path = wrapped.wrapped_key_file
    # another key of token T, configured by mistake: the file names the key it needs
    other = f"kek-{uuid.uuid4().hex[:12]}"
    bt.Pkcs11KeyProvider.create_token_key(softhsm.library, token_label=softhsm.token,
                                          key_label=other, pin=USER_PIN)
    refused(provider_for(softhsm, other, path), f"made under token key '{wrapped.key_label}'")
    # a key of the same label in another token (another HSM): GCM does not verify
    bt.Pkcs11KeyProvider.create_token_key(softhsm.library, token_label=softhsm.other_token,
                                          key_label=wrapped.key_label, pin=USER_PIN)
    refused(provider_for(softhsm, wrapped.key_label, path, token_label=softhsm.other_token),
            "does not open")
    # the key destroyed and a new one made under its label
    token = pkcs11.lib(softhsm.library).get_token(token_label=softhsm.token)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        session.get_key(label=wrapped.key_label).destroy()
    refused(wrapped, "holds no AES key")
    bt.Pkcs11KeyProvider.create_token_key(softhsm.library, token_label=softhsm.token,
                                          key_label=wrapped.key_label, pin=USER_PIN)
    refused(wrapped, "does not open")


def test_every_altered_byte_is_refused(softhsm: SoftHsm,
                                       wrapped: bt.Pkcs11KeyProvider) -> None:
    path = wrapped.wrapped_key_file
    good = path.read_bytes()
    variants = [good[:i] + bytes([good[i] ^ mask]) + good[i + 1:]
                for i in range(len(good)) for mask in (0x01, 0x80)]
    variants += [good[:-1], good + b"\0", good[:HEADER], b"", good[:5] + b"\xff" + good[6:]]
    path.chmod(0o600)
    for blob in variants:
        path.write_bytes(blob)
        refused(wrapped, "not a biotemplate wrapped key|truncated or altered|"
                         "made under token key|does not open")
    path.write_bytes(good)
    assert len(wrapped.master_key().reveal()) == 32


def test_the_token_key_cannot_leave_the_token(softhsm: SoftHsm,
                                              wrapped: bt.Pkcs11KeyProvider) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag

    token = pkcs11.lib(softhsm.library).get_token(token_label=softhsm.token)
    with token.open(user_pin=USER_PIN) as session:
        key = session.get_key(label=wrapped.key_label)
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]
        assert key[Attribute.VALUE_LEN] == 32 and key[Attribute.TOKEN]
        assert key[Attribute.PRIVATE] and key[Attribute.SENSITIVE]
        assert key[Attribute.ALWAYS_SENSITIVE] and key[Attribute.NEVER_EXTRACTABLE]
        assert not key[Attribute.EXTRACTABLE]
        for capability in (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN,
                           Attribute.VERIFY, Attribute.DERIVE):
            assert not key[capability], capability
        # CKA_ALLOWED_MECHANISMS: the key is no ECB/CBC oracle, only GCM
        with pytest.raises(pkcs11.MechanismInvalid):
            key.encrypt(b"\0" * 16, mechanism=Mechanism.AES_ECB)
        # and no other key can wrap it out of the token
        carrier = session.generate_key(KeyType.AES, 256, capabilities=MechanismFlag.WRAP)
        with pytest.raises(pkcs11.KeyUnextractable):
            carrier.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_an_extractable_token_key_is_refused(softhsm: SoftHsm, label: str,
                                             tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag

    token = pkcs11.lib(softhsm.library).get_token(token_label=softhsm.token)
    with token.open(rw=True, user_pin=USER_PIN) as session:
        session.generate_key(KeyType.AES, 256, label=label, store=True,
                             capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                             template={Attribute.EXTRACTABLE: True})
    with pytest.raises(bt.KeyUnavailable, match="can leave the token"):
        bt.Pkcs11KeyProvider.create_token_key(softhsm.library, token_label=softhsm.token,
                                              key_label=label, pin=USER_PIN)
    with pytest.raises(bt.KeyUnavailable, match="can leave the token"):
        bt.Pkcs11KeyProvider.generate(softhsm.library, token_label=softhsm.token,
                                      key_label=label, pin=USER_PIN,
                                      wrapped_key_file=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_the_wrapped_file_is_0600_and_never_overwritten(softhsm: SoftHsm,
                                                         wrapped: bt.Pkcs11KeyProvider) -> None:
    path = wrapped.wrapped_key_file
    assert path.stat().st_mode & 0o777 == 0o600
    before, key = path.read_bytes(), wrapped.master_key().reveal()
    with pytest.raises(bt.KeyFileExists):
        bt.Pkcs11KeyProvider.generate(softhsm.library, token_label=softhsm.token,
                                      key_label=wrapped.key_label, pin=USER_PIN,
                                      wrapped_key_file=path)
    assert path.read_bytes() == before and wrapped.master_key().reveal() == key


def test_pin_file(softhsm: SoftHsm, wrapped: bt.Pkcs11KeyProvider, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    provider = provider_for(softhsm, wrapped.key_label, wrapped.wrapped_key_file,
                            pin=None, pin_file=pin_file)
    assert provider.master_key().reveal() == wrapped.master_key().reveal()
    pin_file.chmod(0o644)
    refused(provider, "chmod 600")
    pin_file.unlink()
    refused(provider, "PIN file .* does not exist")


def test_concurrent_callers_share_the_token(wrapped: bt.Pkcs11KeyProvider) -> None:
    """One PKCS#11 login per process: concurrent master_key() calls take turns."""
    expected = wrapped.master_key().reveal()
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(wrapped.master_key().reveal())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [expected] * 20
