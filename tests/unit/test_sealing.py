"""The crypto module and the keys it uses: record sealing, associated data, the keyring
envelope, the epoch ratchet, keyring hygiene (no pickles, no key bytes in reprs), nonces
and Ed25519 signatures. Key providers and ``SecretKey`` are tested in ``test_keys.py``."""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from biotemplate import sealing, streaming
from biotemplate.backends.base import RecordRow
from biotemplate.codec import Plain, RecordCodec, Shredded, Unlisted
from biotemplate.errors import IntegrityError, KeyUnavailable
from biotemplate.keyring import Keyring
from biotemplate.keys import SecretKey
from biotemplate.subject_keys import Entry

EPOCH_US = 3_600_000_000  # 1 h
NOW_US = 1_772_000_000_000_000
STORE_ID = bytes(range(16))
RECORD_ID = bytes(range(100, 116))
AAD_FIELDS: dict[str, Any] = {
    "store_id": STORE_ID,
    "model": "arcface-r100-v1",
    "record_id": RECORD_ID,
    "subject_ref": b"\x07" * 32,
    "purposes": ["watchlist", "border"],
    "expiry_us": NOW_US + 86_400_000_000,
    "epoch": (NOW_US + 86_400_000_000) // EPOCH_US,
    "held": False,
}
# One edit per associated-data field: each must make the seal fail to open.
AAD_EDITS: dict[str, Any] = {
    "store_id": bytes(16),
    "model": "arcface-r100-v2",
    "record_id": bytes(range(101, 117)),
    "subject_ref": b"\x08" * 32,
    "purposes": ["watchlist"],
    "expiry_us": AAD_FIELDS["expiry_us"] + 1,
    "epoch": AAD_FIELDS["epoch"] + 1,
    "held": True,
}


def aad(**changes: Any) -> bytes:
    return sealing.record_aad(**{**AAD_FIELDS, **changes})


@pytest.fixture
def key() -> bytes:
    return sealing.random_key()


# --- record sealing ----------------------------------------------------------------------


def test_seal_open_round_trip_and_layout(key: bytes) -> None:
    plaintext = b"template bytes and a subject id"
    blob = sealing.seal(key, plaintext, aad())
    assert blob[0] == sealing.VERSION
    assert len(blob) == 1 + sealing.NONCE_SIZE + len(plaintext) + sealing.TAG_SIZE
    assert plaintext not in blob
    assert sealing.open_sealed(key, blob, aad()) == plaintext


def test_empty_plaintext_round_trip(key: bytes) -> None:
    assert sealing.open_sealed(key, sealing.seal(key, b"", aad()), aad()) == b""


def test_aad_covers_the_design_fields() -> None:
    fields = msgpack.unpackb(aad(), raw=False)
    assert fields == [sealing.VERSION, STORE_ID, "arcface-r100-v1", RECORD_ID, b"\x07" * 32,
                      ["border", "watchlist"], AAD_FIELDS["expiry_us"], AAD_FIELDS["epoch"],
                      False]
    assert set(AAD_EDITS) == set(AAD_FIELDS)  # every field has an edit below


@pytest.mark.parametrize("field", sorted(AAD_EDITS))
def test_aad_field_mismatch_fails(key: bytes, field: str) -> None:
    blob = sealing.seal(key, b"payload", aad())
    assert aad(**{field: AAD_EDITS[field]}) != aad()
    with pytest.raises(IntegrityError):
        sealing.open_sealed(key, blob, aad(**{field: AAD_EDITS[field]}))


def test_purpose_order_does_not_matter(key: bytes) -> None:
    """Purposes are a set: the associated data sorts them."""
    blob = sealing.seal(key, b"payload", aad(purposes=["border", "watchlist"]))
    assert sealing.open_sealed(key, blob, aad(purposes=["watchlist", "border"])) == b"payload"


def test_wrong_key_fails(key: bytes) -> None:
    blob = sealing.seal(key, b"payload", aad())
    with pytest.raises(IntegrityError):
        sealing.open_sealed(sealing.random_key(), blob, aad())
    with pytest.raises(IntegrityError):
        sealing.open_sealed(bytes(a ^ 1 for a in key[:1]) + key[1:], blob, aad())


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1], lambda b: b[: 1 + sealing.NONCE_SIZE + sealing.TAG_SIZE - 1],
    lambda b: b"", lambda b: b + b"\x00", lambda b: bytes([2]) + b[1:],
    lambda b: bytes([0]) + b[1:],
], ids=["short_by_one", "below_minimum", "empty", "extended", "version_2", "version_0"])
def test_malformed_blob_fails(key: bytes, mutate: Callable[[bytes], bytes]) -> None:
    blob = sealing.seal(key, b"payload", aad())
    with pytest.raises(IntegrityError):
        sealing.open_sealed(key, mutate(blob), aad())


def test_every_single_bit_flip_fails(key: bytes) -> None:
    blob = sealing.seal(key, b"x" * 80, aad())
    for i in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(IntegrityError):
                sealing.open_sealed(key, bytes(bad), aad())


def test_nonces_differ_between_seals_of_the_same_plaintext(key: bytes) -> None:
    blobs = [sealing.seal(key, b"same plaintext", aad()) for _ in range(50)]
    nonces = {b[1 : 1 + sealing.NONCE_SIZE] for b in blobs}
    assert len(nonces) == 50
    assert len({b[1 + sealing.NONCE_SIZE :] for b in blobs}) == 50  # ciphertexts too


def test_record_key_depends_on_scope_subject_and_record() -> None:
    scope, subject = sealing.random_key(), sealing.random_key()
    k = sealing.record_key(scope, subject, RECORD_ID)
    assert len(k) == sealing.KEY_SIZE
    assert k == sealing.record_key(scope, subject, RECORD_ID)
    others = {sealing.record_key(sealing.random_key(), subject, RECORD_ID),
              sealing.record_key(scope, sealing.random_key(), RECORD_ID),
              sealing.record_key(scope, subject, bytes(16))}
    assert k not in others and len(others) == 3


def test_hkdf_labels_separate_uses() -> None:
    state = sealing.random_key()
    derived = {sealing.ratchet_step(state), sealing.epoch_key_from_state(state),
               sealing.snapshot_key(state, 0), sealing.snapshot_key(state, 1),
               sealing.hkdf(state, info=b"biotemplate/v1/meta")}
    assert len(derived) == 5 and state not in derived


# --- the codec (rows <-> records) --------------------------------------------------------


def _keyring() -> Keyring:
    return Keyring.new(STORE_ID, EPOCH_US, NOW_US)


def _plain() -> Plain:
    return Plain(template=np.arange(1, 9, dtype=np.float32), subject_id="P-1",
                 metadata={"case": "118"}, source="desk-1", created_us=NOW_US)


def test_codec_round_trip_and_header_binding() -> None:
    kr = _keyring()
    ref = kr.subject_ref("P-1")
    entries = {ref: Entry(sealing.random_key(), (RECORD_ID,))}
    codec = RecordCodec(kr, model="m1", dim=8, entries=entries.get)
    row = codec.seal(record_id=RECORD_ID.hex(), subject_ref=ref, purposes=["b", "a"],
                     expiry_us=NOW_US + 3 * EPOCH_US, held=False, plain=_plain(),
                     subject_key=entries[ref].key)
    assert row.purposes == ("a", "b") and row.epoch == (NOW_US + 3 * EPOCH_US) // EPOCH_US
    back = codec.open(row)
    assert back.subject_id == "P-1" and back.metadata == {"case": "118"}
    np.testing.assert_array_equal(back.template, _plain().template)
    edits: dict[str, Any] = {"purposes": ("a",), "expiry_us": row.expiry_us + 1,
                             "epoch": row.epoch + 1, "model": "m2",
                             "record_id": bytes(16).hex()}
    for name, value in edits.items():
        fields = {f: getattr(row, f) for f in RecordRow.__dataclass_fields__}
        fields[name] = value
        with pytest.raises(IntegrityError):
            codec.open(RecordRow(**fields))
    # A row its subject's entry does not list (deleted, copied back) is refused.
    entries[ref] = Entry(entries[ref].key, ())
    with pytest.raises(Unlisted):
        codec.open(row)
    # A subject whose key was destroyed reads as shredded, not as tampered.
    del entries[ref]
    with pytest.raises(Shredded):
        codec.open(row)


# --- keyring envelope --------------------------------------------------------------------


def test_keyring_round_trip() -> None:
    master = SecretKey(sealing.random_key())
    kr = _keyring()
    kr.legacy_subjects[kr.subject_ref("P-1")] = sealing.random_key()
    kr.pending[7] = sealing.random_key()
    back = Keyring.from_bytes(kr.to_bytes(master), master)
    assert back.store_id == kr.store_id and back.legacy_subjects == kr.legacy_subjects
    assert back.buckets == kr.buckets and len(back.buckets) == 1024
    assert back.pending == kr.pending
    assert back.ratchet_state == kr.ratchet_state and back.ratchet_epoch == kr.ratchet_epoch
    assert back.epoch_key(kr.ratchet_epoch + 5) == kr.epoch_key(kr.ratchet_epoch + 5)


def test_keyring_wrong_master_key_is_key_unavailable() -> None:
    data = _keyring().to_bytes(SecretKey(sealing.random_key()))
    with pytest.raises(KeyUnavailable):
        Keyring.from_bytes(data, SecretKey(sealing.random_key()))


def test_keyring_tampered_body_is_integrity_error() -> None:
    master = SecretKey(sealing.random_key())
    data = bytearray(_keyring().to_bytes(master))
    body_start = 4 + 1 + sealing.STORE_ID_SIZE + 1 + sealing.NONCE_SIZE + sealing.TAG_SIZE
    for i in (body_start, body_start + 30, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(IntegrityError):
            Keyring.from_bytes(bytes(bad), master)
    with pytest.raises(IntegrityError):
        Keyring.from_bytes(bytes(data[:-1]), master)
    with pytest.raises(IntegrityError):
        Keyring.from_bytes(b"NOPE" + bytes(data[4:]), master)


def test_keyring_from_another_store_header_is_refused() -> None:
    """The header (with the store id) is associated data of both check and body."""
    master = SecretKey(sealing.random_key())
    data = bytearray(_keyring().to_bytes(master))
    data[5] ^= 1  # first store-id byte
    with pytest.raises((KeyUnavailable, IntegrityError)):
        Keyring.from_bytes(bytes(data), master)


# --- epoch ratchet -----------------------------------------------------------------------


def test_epoch_keys_differ_and_are_deterministic() -> None:
    kr = _keyring()
    e = kr.ratchet_epoch
    keys = [kr.epoch_key(e + i) for i in range(70)]  # crosses the 64-step state cache
    assert len(set(keys)) == 70
    fresh = Keyring.from_bytes(kr.to_bytes(m := SecretKey(sealing.random_key())), m)
    assert [fresh.epoch_key(e + i) for i in reversed(range(70))] == keys[::-1]


def test_advancing_the_ratchet_forgets_the_past() -> None:
    kr = _keyring()
    e = kr.ratchet_epoch
    future = {i: kr.epoch_key(e + i) for i in range(0, 80, 7)}
    old_state = kr.ratchet_state
    assert kr.advance(e + 10) is True
    assert kr.ratchet_epoch == e + 10 and kr.ratchet_state != old_state
    for past in (e, e + 1, e + 9):
        with pytest.raises(KeyUnavailable):
            kr.epoch_key(past)
    for i, k in future.items():  # later epochs keep their keys
        if i >= 10:
            assert kr.epoch_key(e + i) == k
    # Nothing of a forgotten epoch survives in the caches or in what the keyring saves.
    body = kr._body()
    assert old_state not in body
    assert all(x >= e + 10 for x in (*kr._epoch_cache, *kr._state_cache))
    for i, k in future.items():
        if i < 10:
            assert k not in body and k not in kr._epoch_cache.values()
    assert kr.advance(e + 3) is False and kr.ratchet_epoch == e + 10  # never backwards


def test_ratchet_state_is_one_way_step() -> None:
    kr = _keyring()
    s0 = kr.ratchet_state
    kr.advance(kr.ratchet_epoch + 1)
    assert kr.ratchet_state == sealing.ratchet_step(s0)
    assert kr.epoch_key(kr.ratchet_epoch) == sealing.epoch_key_from_state(kr.ratchet_state)


# --- key hygiene -------------------------------------------------------------------------


def _no_key_in(text: str, raw: bytes) -> None:
    assert raw.hex() not in text.lower()
    assert raw.hex().upper() not in text
    assert repr(raw) not in text


def test_keyring_refuses_pickling_and_hides_keys() -> None:
    kr = _keyring()
    kr.legacy_subjects[kr.subject_ref("P-1")] = sub = sealing.random_key()
    kr.pending[3] = pending = sealing.random_key()
    for raw in (kr.ratchet_state, kr.lookup_key, kr.digest_key, kr.meta_key, kr.audit_seed,
                sub, pending, *kr.buckets):
        _no_key_in(repr(kr), raw)
    with pytest.raises(TypeError):
        pickle.dumps(kr)


# --- signatures --------------------------------------------------------------------------


def test_ed25519_round_trip_and_flipped_signature() -> None:
    seed = sealing.random_key()
    sign, public = sealing.signer_from_seed(seed)
    verify = sealing.verifier_for(public)
    assert len(public) == 32
    message = b"audit entry hash"
    sig = sign(message)
    assert len(sig) == 64
    assert verify(message, sig) is True
    for i in (0, 31, 32, 63):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        assert verify(message, bytes(bad)) is False
    assert verify(message + b"!", sig) is False
    assert verify(message, sig[:-1]) is False  # wrong length: False, not an exception
    assert verify(message, b"") is False
    other = sealing.verifier_for(sealing.signer_from_seed(sealing.random_key())[1])
    assert other(message, sig) is False
    assert sealing.signer_from_seed(seed)[1] == public  # deterministic from the seed


# --- STREAM (index snapshots) ------------------------------------------------------------

FRAME = 64  # small frames, so a few hundred bytes make several of them


def _stream(key: bytes, salt: bytes, plain: bytes, aad: bytes = b"ad") -> list[bytes]:
    return list(streaming.seal(key, salt, memoryview(plain), aad, frame=FRAME))


def _open_stream(key: bytes, salt: bytes, data: bytes, size: int,
                 aad: bytes = b"ad") -> bytearray:
    import io

    out = bytearray(size)
    streaming.open_into(key, salt, io.BytesIO(data).readinto, out, aad, frame=FRAME)
    return out


@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 5 * FRAME + 7])
def test_stream_round_trip(key: bytes, size: int) -> None:
    salt, plain = os.urandom(32), os.urandom(size)
    frames = _stream(key, salt, plain)
    assert len(frames) == streaming.frames(size, FRAME)
    data = b"".join(frames)
    assert len(data) == streaming.sealed_size(size, FRAME)
    assert bytes(_open_stream(key, salt, data, size)) == plain


def _stream_edits(frames: list[bytes]) -> dict[str, bytes]:
    joined = b"".join(frames)
    return {
        "frames-swapped": b"".join([frames[1], frames[0], *frames[2:]]),
        "frame-dropped": b"".join([frames[0], *frames[2:]]),
        "frame-duplicated": b"".join([frames[0], *frames]),
        "last-frame-dropped": b"".join(frames[:-1]),
        "truncated": joined[:-1],
        "extended": joined + b"\x00",
        "bit-flip-first": bytes([joined[0] ^ 1]) + joined[1:],
        "bit-flip-last": joined[:-1] + bytes([joined[-1] ^ 1]),
    }


@pytest.mark.parametrize("edit", sorted(_stream_edits([b"a", b"b", b"c"])))
def test_stream_edits_fail_and_leave_no_plaintext(key: bytes, edit: str) -> None:
    """Reordered, dropped, duplicated, truncated or extended frames all fail; a failure
    zeroes the output, so no unauthenticated plaintext is left behind."""
    salt, plain = os.urandom(32), os.urandom(4 * FRAME + 10)
    data = _stream_edits(_stream(key, salt, plain))[edit]
    out = bytearray(len(plain))
    import io

    with pytest.raises(IntegrityError):
        streaming.open_into(key, salt, io.BytesIO(data).readinto, out, b"ad", frame=FRAME)
    assert out == bytearray(len(plain))


@pytest.mark.parametrize("what", ["key", "salt", "aad", "size"])
def test_stream_wrong_key_salt_aad_or_size_fails(key: bytes, what: str) -> None:
    salt, plain = os.urandom(32), os.urandom(3 * FRAME)
    data = b"".join(_stream(key, salt, plain))
    args: dict[str, Any] = {"key": key, "salt": salt, "aad": b"ad", "size": len(plain)}
    args[what] = {"key": os.urandom(32), "salt": os.urandom(32), "aad": b"other",
                  "size": len(plain) - FRAME}[what]
    with pytest.raises(IntegrityError):
        _open_stream(args["key"], args["salt"], data, args["size"], args["aad"])


def test_stream_frames_of_one_file_do_not_open_in_another(key: bytes) -> None:
    """Each file's key comes from its own salt: the same plaintext sealed twice shares no
    ciphertext, and a frame moved between files fails."""
    plain = os.urandom(2 * FRAME)
    a, b = _stream(key, os.urandom(32), plain), _stream(key, salt_b := os.urandom(32), plain)
    assert not set(a) & set(b)
    with pytest.raises(IntegrityError):
        _open_stream(key, salt_b, a[0] + b[1], len(plain))


def test_stream_short_salt_is_refused(key: bytes) -> None:
    with pytest.raises(IntegrityError):
        _open_stream(key, b"short", b"\x00" * 32, 16)


@pytest.mark.parametrize("cuts", [[], [1], [FRAME], [FRAME - 1, FRAME + 1], [3, 70, 71, 200]])
def test_stream_sealed_from_parts_is_the_stream_of_their_concatenation(
        key: bytes, cuts: list[int]) -> None:
    """seal_parts never builds the concatenation, and frames that span parts come out
    the same: what it seals opens as one stream."""
    salt, plain = os.urandom(32), os.urandom(5 * FRAME + 7)
    bounds = [0, *cuts, len(plain)]
    parts = [memoryview(plain[a:b]) for a, b in itertools.pairwise(bounds)]
    data = b"".join(streaming.seal_parts(key, salt, parts, b"ad", frame=FRAME))
    assert len(data) == streaming.sealed_size(len(plain), FRAME)
    assert bytes(_open_stream(key, salt, data, len(plain))) == plain


@pytest.mark.parametrize("pieces", [[1] * 10, [FRAME], [2 * FRAME + 3], [5, 2 * FRAME, 7],
                                    [3 * FRAME + 1, 1]])
def test_stream_reader_hands_out_any_split(key: bytes, pieces: list[int]) -> None:
    """A reader fills outputs of any size in order (whole frames straight into them, two
    at a time, the rest through its stage), skips what is not asked for, and finishes."""
    import io

    salt, plain = os.urandom(32), os.urandom(5 * FRAME + 7)
    data = b"".join(_stream(key, salt, plain))
    reader = streaming.Reader(key, salt, io.BytesIO(data).readinto, len(plain), b"ad", FRAME)
    got, at = b"", 0
    for n in pieces:
        out = bytearray(n)
        reader.read_into(memoryview(out))
        got, at = got + bytes(out), at + n
    reader.skip(3)
    assert reader.position == at + 3 and got == plain[:at]
    reader.finish()
    reader.close()


def test_stream_reader_zeroes_where_a_bad_frame_was_to_go(key: bytes) -> None:
    import io

    salt, plain = os.urandom(32), os.urandom(4 * FRAME)
    frames = _stream(key, salt, plain)
    frames[2] = frames[2][:-1] + bytes([frames[2][-1] ^ 1])
    reader = streaming.Reader(key, salt, io.BytesIO(b"".join(frames)).readinto, len(plain),
                              b"ad", FRAME)
    out = bytearray(b"\xff" * len(plain))
    with pytest.raises(IntegrityError):
        reader.read_into(memoryview(out))
    assert bytes(out[: 2 * FRAME]) == plain[: 2 * FRAME]  # authentic frames stay
    assert out[2 * FRAME : 4 * FRAME] == bytearray(2 * FRAME)  # the failed pair: zeros
    with pytest.raises(IntegrityError):  # and nothing more after a failure
        reader.skip(0)


def test_stream_reader_refuses_to_read_past_the_end_or_trailing_bytes(key: bytes) -> None:
    import io

    salt, plain = os.urandom(32), os.urandom(2 * FRAME)
    data = b"".join(_stream(key, salt, plain))
    reader = streaming.Reader(key, salt, io.BytesIO(data).readinto, len(plain), b"ad", FRAME)
    with pytest.raises(IntegrityError):
        reader.read_into(memoryview(bytearray(len(plain) + 1)))
    reader = streaming.Reader(key, salt, io.BytesIO(data + b"x").readinto, len(plain), b"ad",
                              FRAME)
    with pytest.raises(IntegrityError):
        reader.finish()
