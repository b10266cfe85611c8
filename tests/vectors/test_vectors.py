"""Frozen v1 vectors of the sealed formats (written once by ``generate.py``, never edited).

Every valid vector must re-seal byte-exactly through the private deterministic seams and
open through the public functions (``open_sealed``, ``open_keyring``, ``Keyring.from_bytes``
and the record codec) to the same plaintext; every invalid vector must fail with the error
it names. If one of these fails after a library change, the change broke the v1 format:
do not regenerate, add v2 (see README.md in this folder).
"""

from __future__ import annotations

import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import biotemplate as bt
from biotemplate import sealing
from biotemplate.backends.base import RecordRow
from biotemplate.codec import Plain, RecordCodec, decode_plain, encode_plain
from biotemplate.keyring import Keyring
from biotemplate.keys import SecretKey
from biotemplate.subject_keys import Entry

HERE = Path(__file__).resolve().parent
H = bytes.fromhex


@cache
def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HERE / name).read_text(encoding="utf-8"))
    return data


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["name"] for item in items]


RECORDS = load("record_v1.json")["records"]
KEYRINGS = load("keyring_v1.json")["keyrings"]
BAD_RECORDS = load("invalid_v1.json")["records"]
BAD_KEYRINGS = load("invalid_v1.json")["keyrings"]


def keyring_vector(name: str) -> dict[str, Any]:
    return next(k for k in KEYRINGS if k["name"] == name)


def opened_keyring(name: str) -> Keyring:
    v = keyring_vector(name)
    return Keyring.from_bytes(H(v["file"]), SecretKey(H(v["master_key"])))


def aad_args(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    for name in ("store_id", "record_id", "subject_ref"):
        out[name] = H(out[name])
    return out


def error(name: str) -> type[Exception]:
    cls = getattr(bt, name)
    assert issubclass(cls, bt.BiotemplateError)
    return cls  # type: ignore[no-any-return]


def test_vector_files_are_not_empty() -> None:
    assert len(RECORDS) >= 4 and len(KEYRINGS) >= 2
    assert len(BAD_RECORDS) >= 14 and len(BAD_KEYRINGS) >= 8
    assert {r["scope"]["kind"] for r in RECORDS} == {"epoch", "hold"}


# --- records --------------------------------------------------------------------------


@pytest.mark.parametrize("v", RECORDS, ids=_ids(RECORDS))
def test_record_reseals_byte_exactly(v: dict[str, Any]) -> None:
    sealed = sealing._seal_with_nonce(H(v["record_key"]), H(v["plaintext"]), H(v["aad"]),
                                      H(v["nonce"]))
    assert sealed.hex() == v["sealed"]
    # layout: version | nonce | ciphertext (same length as the plaintext) | tag
    assert sealed[0] == sealing.VERSION == 1
    assert sealed[1:25] == H(v["nonce"])
    assert len(sealed) == 1 + 24 + len(H(v["plaintext"])) + 16


@pytest.mark.parametrize("v", RECORDS, ids=_ids(RECORDS))
def test_record_intermediates(v: dict[str, Any]) -> None:
    """record_key and record_aad reproduce the stored intermediate values."""
    key = sealing.record_key(H(v["scope_key"]), H(v["subject_key"]), H(v["record_id"]))
    assert key.hex() == v["record_key"]
    assert sealing.record_aad(**aad_args(v["aad_fields"])).hex() == v["aad"]
    assert v["aad_fields"]["record_id"] == v["record_id"]


@pytest.mark.parametrize("v", RECORDS, ids=_ids(RECORDS))
def test_record_opens_to_the_same_plaintext(v: dict[str, Any]) -> None:
    raw = sealing.open_sealed(H(v["record_key"]), H(v["sealed"]), H(v["aad"]))
    assert raw.hex() == v["plaintext"]
    f = v["plaintext_fields"]
    plain = decode_plain(raw, v["dim"])
    assert plain.template.dtype == np.float32
    assert plain.template.tolist() == f["template"]
    assert plain.template.astype("<f4").tobytes().hex() == f["template_f32le"]
    assert plain.subject_id == f["subject_id"]
    assert plain.metadata == f["metadata"]
    assert plain.source == f["source"]
    assert plain.created_us == f["created_us"]


@pytest.mark.parametrize("v", RECORDS, ids=_ids(RECORDS))
def test_record_plaintext_format_is_still_written(v: dict[str, Any]) -> None:
    """The writer still produces the v1 plaintext (a change here is a v2)."""
    f = v["plaintext_fields"]
    plain = Plain(template=np.asarray(f["template"], dtype=np.float32),
                  subject_id=f["subject_id"], metadata=f["metadata"], source=f["source"],
                  created_us=f["created_us"])
    assert encode_plain(plain).hex() == v["plaintext"]


@pytest.mark.parametrize("v", RECORDS, ids=_ids(RECORDS))
def test_record_opens_through_the_keyring_and_codec(v: dict[str, Any]) -> None:
    """The whole v1 stack: keyring file -> scope and subject keys -> codec -> plaintext.
    (A v1 keyring holds the subject keys itself; a store moves them into records.db on
    open, as entries listing the subject's records: here, one that lists this record.)"""
    ring = opened_keyring(v["keyring"])
    a = v["aad_fields"]
    ref = H(a["subject_ref"])
    assert ring.subject_ref(v["plaintext_fields"]["subject_id"]) == ref
    assert ring.legacy_subjects[ref].hex() == v["subject_key"]
    if v["scope"]["kind"] == "hold":
        assert ring.holds[ref][0].hex() == v["scope_key"] and a["held"] is True
    else:
        assert ring.epoch_key(v["scope"]["epoch"]).hex() == v["scope_key"]
        assert a["epoch"] == v["scope"]["epoch"] == a["expiry_us"] // ring.epoch_us
    assert a["store_id"] == ring.store_id.hex()
    row = RecordRow(record_id=v["record_id"], subject_ref=ref, epoch=a["epoch"],
                    expiry_us=a["expiry_us"], purposes=tuple(sorted(a["purposes"])),
                    model=a["model"], held=a["held"], blob=H(v["sealed"]))
    entry = Entry(ring.legacy_subjects[ref], (H(v["record_id"]),))
    plain = RecordCodec(ring, model=a["model"], dim=v["dim"],
                        entries={ref: entry}.get).open(row)
    assert plain.template.tolist() == v["plaintext_fields"]["template"]
    assert plain.subject_id == v["plaintext_fields"]["subject_id"]


def test_ratchet_and_derivations() -> None:
    d = load("record_v1.json")["derivations"]
    ring = opened_keyring(d["keyring"])
    steps = d["ratchet"]
    assert ring.ratchet_state.hex() == steps[0]["state"]
    for prev, nxt in itertools.pairwise(steps):
        assert sealing.ratchet_step(H(prev["state"])).hex() == nxt["state"]
    for step in steps:
        epoch_key = sealing.epoch_key_from_state(H(step["state"]))
        assert epoch_key.hex() == step["epoch_key"]
        assert ring.epoch_key(step["epoch"]).hex() == step["epoch_key"]
        assert sealing.snapshot_key(epoch_key, 0).hex() == step["snapshot_key_erasures_0"]
        assert sealing.snapshot_key(epoch_key, 2).hex() == step["snapshot_key_erasures_2"]
    for item in d["subject_refs"]:
        ref = sealing.keyed_hash(H(item["lookup_key"]), b"subject:" + item["subject_id"].encode())
        assert ref.hex() == item["subject_ref"]
    # After a purge to the next epoch, the first epoch's key is gone.
    ring.advance(steps[1]["epoch"])
    assert ring.ratchet_state.hex() == steps[1]["state"]
    with pytest.raises(bt.KeyUnavailable):
        ring.epoch_key(steps[0]["epoch"])


@pytest.mark.parametrize("v", BAD_RECORDS, ids=_ids(BAD_RECORDS))
def test_invalid_record_fails(v: dict[str, Any]) -> None:
    assert v["reason"]
    if "aad_fields" in v:  # the tampered header really produces this AAD
        assert sealing.record_aad(**aad_args(v["aad_fields"])).hex() == v["aad"]
    with pytest.raises(error(v["error"])) as info:
        sealing.open_sealed(H(v["key"]), H(v["sealed"]), H(v["aad"]))
    assert str(info.value) == "sealed data failed authentication"  # no detail, ever


# --- keyrings -------------------------------------------------------------------------


@pytest.mark.parametrize("v", KEYRINGS, ids=_ids(KEYRINGS))
def test_keyring_reseals_byte_exactly(v: dict[str, Any]) -> None:
    data = sealing._seal_keyring_with_nonces(H(v["master_key"]), H(v["store_id"]),
                                             H(v["body"]), H(v["check_nonce"]),
                                             H(v["body_nonce"]))
    assert data.hex() == v["file"]
    assert data[:4] == b"BTKR" and data[4] == 1 and data[5:21] == H(v["store_id"])


@pytest.mark.parametrize("v", KEYRINGS, ids=_ids(KEYRINGS))
def test_keyring_opens_to_the_same_body(v: dict[str, Any]) -> None:
    store_id, body = sealing.open_keyring(H(v["master_key"]), H(v["file"]))
    assert store_id.hex() == v["store_id"]
    assert body.hex() == v["body"]


@pytest.mark.parametrize("v", KEYRINGS, ids=_ids(KEYRINGS))
def test_keyring_from_bytes_reads_every_field(v: dict[str, Any]) -> None:
    ring = Keyring.from_bytes(H(v["file"]), SecretKey(H(v["master_key"])))
    f = v["fields"]
    assert ring.store_id.hex() == f["store_id"]
    assert ring.epoch_us == f["epoch_us"]
    assert ring.ratchet_epoch == f["ratchet_epoch"]
    assert ring.ratchet_state.hex() == f["ratchet_state"]
    assert ring.lookup_key.hex() == f["lookup_key"]
    assert ring.digest_key.hex() == f["digest_key"]
    assert ring.meta_key.hex() == f["meta_key"]
    assert ring.audit_seed.hex() == f["audit_seed"]
    assert {r.hex(): k.hex() for r, k in ring.legacy_subjects.items()} == f["subjects"]
    assert {r.hex(): [k.hex(), a] for r, (k, a) in ring.holds.items()} == f["holds"]
    assert ring.erasures == f["erasures"]
    assert ring.high_water_us == f["high_water_us"]
    # Nothing is lost on the way: the keyring writes back the same v1 body.
    assert ring._body().hex() == v["body"]


@pytest.mark.parametrize("v", BAD_KEYRINGS, ids=_ids(BAD_KEYRINGS))
def test_invalid_keyring_fails(v: dict[str, Any]) -> None:
    assert v["reason"]
    master, data = H(v["master_key"]), H(v["file"])
    if v["open_keyring_error"] is None:
        sealing.open_keyring(master, data)  # the envelope itself is authentic
    else:
        with pytest.raises(error(v["open_keyring_error"])):
            sealing.open_keyring(master, data)
    with pytest.raises(error(v["from_bytes_error"])):
        Keyring.from_bytes(data, SecretKey(master))


def test_named_keyring_failures_are_present() -> None:
    """The two failures that must never be confused (docs/architecture.md §6) are both frozen."""
    by_name = {v["name"]: v for v in BAD_KEYRINGS}
    assert by_name["wrong-master-key"]["from_bytes_error"] == "KeyUnavailable"
    assert by_name["flipped-body-byte"]["from_bytes_error"] == "IntegrityError"
    wanted = {"flipped-tag", "flipped-ciphertext", "wrong-record-id-in-aad",
              "wrong-purposes-in-aad", "truncated-last-byte", "wrong-version-byte",
              "wrong-key-other-subject"}
    assert wanted <= {v["name"].split("/")[-1] for v in BAD_RECORDS}
