"""Write the frozen v1 test vectors of biotemplate's sealed formats. Run by hand, once:

    .venv/bin/python tests/vectors/generate.py           # writes the *_v1.json files
    .venv/bin/python tests/vectors/generate.py --check   # regenerates in memory, compares

It refuses to overwrite an existing v1 file: v1 vectors never change (see README.md here).
A format change adds a ``generate_v2`` beside this and new ``*_v2.json`` files.

Everything is deterministic: keys and nonces are SHA-256 of fixed labels, and the sealing
goes through the private seams ``sealing._seal_with_nonce`` and
``sealing._seal_keyring_with_nonces`` (the public functions draw random nonces). All
records belong to the store of the keyring vector "store-with-subjects", so the test can
also open them through the real stack (``Keyring.from_bytes`` + ``RecordCodec``).

Files (bytes as lowercase hex):
- ``record_v1.json``: ratchet/epoch-key/snapshot-key derivations, and sealed records with
  every intermediate value (scope key, subject key, record id -> record key; AAD fields ->
  AAD; plaintext fields -> plaintext; nonce -> sealed blob).
- ``keyring_v1.json``: keyring files (master key, store id, body, two nonces -> file) and
  the fields the body holds.
- ``invalid_v1.json``: records and keyrings that must fail, each with a ``reason`` and the
  name of the error the public API raises.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from biotemplate import sealing
from biotemplate.codec import Plain, encode_plain
from biotemplate.keyring import Keyring

HERE = Path(__file__).resolve().parent
FILES = ("record_v1.json", "keyring_v1.json", "invalid_v1.json")
EPOCH_US = 86_400_000_000  # 1 day
RATCHET_EPOCH = 20_454  # 2026-01-01 UTC, in days since 1970
NOW_US = RATCHET_EPOCH * EPOCH_US + 9 * 3_600_000_000  # 2026-01-01 09:00 UTC
MODEL = "test-model-v1"


def fixed(label: str, size: int = 32) -> bytes:
    """A deterministic stand-in for random bytes: SHA-256 of a fixed label."""
    return hashlib.sha256(b"biotemplate test vector v1/" + label.encode()).digest()[:size]


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# --- keyrings ---------------------------------------------------------------------------

# (subject id, records sealed for it); the last subject is under legal hold.
SUBJECTS = ("P-000001", "Zoë Ünïcødé 主体-7", "P-000003", "P-000004")
HELD = "P-000003"


def _keyring_fields(name: str, with_subjects: bool) -> dict[str, Any]:
    lookup = fixed(f"{name}/lookup")
    fields: dict[str, Any] = {
        "store_id": fixed(f"{name}/store-id", sealing.STORE_ID_SIZE),
        "epoch_us": EPOCH_US, "ratchet_epoch": RATCHET_EPOCH,
        "ratchet_state": fixed(f"{name}/ratchet-state"), "lookup_key": lookup,
        "digest_key": fixed(f"{name}/digest"), "meta_key": fixed(f"{name}/meta"),
        "audit_seed": fixed(f"{name}/audit-seed"), "subjects": {}, "holds": {},
        "erasures": 0, "high_water_us": NOW_US,
    }
    if with_subjects:
        for sid in SUBJECTS:
            ref = sealing.keyed_hash(lookup, b"subject:" + sid.encode())
            fields["subjects"][ref] = fixed(f"{name}/subject-key/{sid}")
        held_ref = sealing.keyed_hash(lookup, b"subject:" + HELD.encode())
        fields["holds"][held_ref] = (fixed(f"{name}/hold-key/{HELD}"), True)
        fields["erasures"] = 2
        fields["high_water_us"] = NOW_US + 3_600_000_000
    return fields


def _keyring_json(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "store_id": fields["store_id"].hex(), "epoch_us": fields["epoch_us"],
        "ratchet_epoch": fields["ratchet_epoch"],
        "ratchet_state": fields["ratchet_state"].hex(),
        "lookup_key": fields["lookup_key"].hex(), "digest_key": fields["digest_key"].hex(),
        "meta_key": fields["meta_key"].hex(), "audit_seed": fields["audit_seed"].hex(),
        "subjects": {ref.hex(): key.hex() for ref, key in fields["subjects"].items()},
        "holds": {ref.hex(): [key.hex(), active]
                  for ref, (key, active) in fields["holds"].items()},
        "erasures": fields["erasures"], "high_water_us": fields["high_water_us"],
    }


def keyring_vectors() -> tuple[list[dict[str, Any]], dict[str, Keyring], dict[str, bytes]]:
    out, rings, masters = [], {}, {}
    for name, with_subjects, comment in (
        ("store-with-subjects", True,
         "four subject keys, one active legal hold, two erasures; the records of "
         "record_v1.json belong to this store"),
        ("fresh-store", False, "a store just created: no subjects, no holds"),
    ):
        fields = _keyring_fields(name, with_subjects)
        # a v1 keyring: the subject keys in it ("subjects"; now Keyring.legacy_subjects)
        ring = Keyring(**{("legacy_subjects" if k == "subjects" else k): v
                          for k, v in fields.items()})
        master = fixed(f"{name}/master-key")
        body = ring._body()
        check_nonce = fixed(f"{name}/check-nonce", sealing.NONCE_SIZE)
        body_nonce = fixed(f"{name}/body-nonce", sealing.NONCE_SIZE)
        data = sealing._seal_keyring_with_nonces(master, ring.store_id, body,
                                                 check_nonce, body_nonce)
        out.append({
            "name": name, "comment": comment, "master_key": master.hex(),
            "store_id": ring.store_id.hex(), "body": body.hex(),
            "check_nonce": check_nonce.hex(), "body_nonce": body_nonce.hex(),
            "file": data.hex(), "fields": _keyring_json(fields),
        })
        rings[name], masters[name] = ring, master
    return out, rings, masters


# --- records ----------------------------------------------------------------------------

_RECORDS: tuple[dict[str, Any], ...] = (
    {"name": "epoch-scoped-one-purpose",
     "comment": "the common case: sealed under K_epoch(e+2) and the subject key",
     "subject_id": SUBJECTS[0], "purposes": ["watchlist"], "epoch_offset": 2,
     "held": False, "dim": 8,
     "template": [0.5, -0.25, 0.125, 1.0, -1.5, 0.0625, 2.0, -0.75],
     "metadata": {"case": "118", "n": 3}, "source": "enrolment-desk"},
    {"name": "epoch-scoped-unsorted-purposes-unicode-subject",
     "comment": "purposes given unsorted (the AAD sorts them), a non-ASCII subject id, "
                "nested metadata, no source, the current ratchet epoch (scope = K_epoch(e))",
     "subject_id": SUBJECTS[1], "purposes": ["watchlist", "border-verification", "rare"],
     "epoch_offset": 0, "held": False, "dim": 8,
     "template": [-0.03125, 0.5, 0.25, -0.125, 3.0, -2.0, 0.75, 0.375],
     "metadata": {"tags": ["a", "b"], "quality": 0.5, "flag": True, "none": None,
                  "nested": {"k": 1}},
     "source": None},
    {"name": "held",
     "comment": "a subject under legal hold: sealed under the hold key, held = true in AAD",
     "subject_id": HELD, "purposes": ["rare"], "epoch_offset": 1, "held": True, "dim": 8,
     "template": [1.0, 1.0, -1.0, 0.5, 0.0, 0.25, -0.5, 0.125],
     "metadata": {}, "source": "case-file"},
    {"name": "epoch-scoped-dim-16-far-epoch",
     "comment": "dim 16, an epoch 100 steps ahead of the ratchet (3-year retention-like)",
     "subject_id": SUBJECTS[3], "purposes": ["rare", "watchlist"], "epoch_offset": 100,
     "held": False, "dim": 16,
     "template": [float(x) / 8 for x in (1, -2, 3, -4, 5, -6, 7, -8,
                                         8, -7, 6, -5, 4, -3, 2, -1)],
     "metadata": {"site": "gate-7"}, "source": "enrolment-desk"},
)


def _record(spec: dict[str, Any], ring: Keyring) -> tuple[dict[str, Any], dict[str, Any]]:
    """One valid vector, plus the raw values the invalid vectors are built from."""
    name = spec["name"]
    ref = ring.subject_ref(spec["subject_id"])
    subject_key = ring.legacy_subjects[ref]
    epoch = RATCHET_EPOCH + spec["epoch_offset"]
    expiry_us = epoch * EPOCH_US + 17 * 3_600_000_000 + 123_456
    if spec["held"]:
        scope_key, scope = ring.holds[ref][0], {"kind": "hold"}
    else:
        scope_key, scope = ring.epoch_key(epoch), {"kind": "epoch", "epoch": epoch}
    record_id = fixed(f"record/{name}/record-id", 16)
    rkey = sealing.record_key(scope_key, subject_key, record_id)
    aad_fields = {"store_id": ring.store_id, "model": MODEL, "record_id": record_id,
                  "subject_ref": ref, "purposes": list(spec["purposes"]),
                  "expiry_us": expiry_us, "epoch": epoch, "held": spec["held"]}
    aad = sealing.record_aad(**aad_fields)
    template = np.asarray(spec["template"], dtype=np.float32)
    assert template.shape == (spec["dim"],)
    assert template.astype(np.float64).tolist() == spec["template"]  # exact in float32
    created_us = NOW_US - 86_400_000_000 + 42
    plain = Plain(template=template, subject_id=spec["subject_id"],
                  metadata=spec["metadata"], source=spec["source"], created_us=created_us)
    plaintext = encode_plain(plain)
    nonce = fixed(f"record/{name}/nonce", sealing.NONCE_SIZE)
    sealed = sealing._seal_with_nonce(rkey, plaintext, aad, nonce)
    vector = {
        "name": name, "comment": spec["comment"], "keyring": "store-with-subjects",
        "dim": spec["dim"], "scope": scope, "scope_key": scope_key.hex(),
        "subject_key": subject_key.hex(), "record_id": record_id.hex(),
        "record_key": rkey.hex(),
        "aad_fields": _aad_json(aad_fields), "aad": aad.hex(),
        "plaintext_fields": {
            "template": spec["template"], "template_f32le": template.astype("<f4").tobytes().hex(),
            "subject_id": spec["subject_id"], "metadata": spec["metadata"],
            "source": spec["source"], "created_us": created_us,
        },
        "plaintext": plaintext.hex(), "nonce": nonce.hex(), "sealed": sealed.hex(),
    }
    raw = {"key": rkey, "aad": aad, "aad_fields": aad_fields, "sealed": sealed,
           "scope_key": scope_key, "record_id": record_id, "plaintext": plaintext,
           "nonce": nonce}
    return vector, raw


def _aad_json(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in fields.items()}


def derivations(ring: Keyring) -> dict[str, Any]:
    """The ratchet chain S_e -> S_{e+1} -> S_{e+2}, epoch keys and snapshot keys."""
    steps, state = [], ring.ratchet_state
    for i in range(3):
        epoch_key = sealing.epoch_key_from_state(state)
        steps.append({"epoch": RATCHET_EPOCH + i, "state": state.hex(),
                      "epoch_key": epoch_key.hex(),
                      "snapshot_key_erasures_0": sealing.snapshot_key(epoch_key, 0).hex(),
                      "snapshot_key_erasures_2": sealing.snapshot_key(epoch_key, 2).hex()})
        state = sealing.ratchet_step(state)
    subject_refs = [{"lookup_key": ring.lookup_key.hex(), "subject_id": sid,
                     "subject_ref": ring.subject_ref(sid).hex()} for sid in SUBJECTS]
    return {"keyring": "store-with-subjects", "ratchet": steps, "subject_refs": subject_refs}


# --- invalid vectors --------------------------------------------------------------------


def invalid_records(raw: dict[str, Any], ring: Keyring,
                    based_on: str) -> list[dict[str, Any]]:
    key, aad, sealed, fields = raw["key"], raw["aad"], raw["sealed"], raw["aad_fields"]
    out: list[dict[str, Any]] = []

    def add(name: str, reason: str, *, k: bytes = key, a: bytes = aad, s: bytes = sealed,
            f: dict[str, Any] | None = None) -> None:
        item: dict[str, Any] = {"name": name, "reason": reason, "based_on": based_on,
                                "key": k.hex(), "aad": a.hex(), "sealed": s.hex(),
                                "error": "IntegrityError"}
        if f is not None:
            item["aad_fields"] = _aad_json(f)
        out.append(item)

    def with_field(**change: Any) -> tuple[bytes, dict[str, Any]]:
        f = {**fields, **change}
        return sealing.record_aad(**f), f

    add("flipped-tag", "last byte of the Poly1305 tag flipped", s=flip(sealed, len(sealed) - 1))
    add("flipped-ciphertext", "first ciphertext byte (offset 25) flipped", s=flip(sealed, 25))
    add("flipped-nonce", "a nonce byte (offset 1) flipped", s=flip(sealed, 1))
    a, f = with_field(record_id=fixed("record/other-record-id", 16))
    add("wrong-record-id-in-aad", "blob moved to another row: the AAD names another record "
        "id (the record key is kept, so only the AAD differs)", a=a, f=f)
    a, f = with_field(purposes=[*fields["purposes"], "rare"]
                      if "rare" not in fields["purposes"] else ["watchlist"])
    add("wrong-purposes-in-aad", "purposes widened/changed in the row header", a=a, f=f)
    a, f = with_field(expiry_us=fields["expiry_us"] + 86_400_000_000)
    add("extended-expiry-in-aad", "expiry extended by a day in the row header", a=a, f=f)
    a, f = with_field(held=not fields["held"])
    add("flipped-held-in-aad", "hold state claimed/denied in the row header", a=a, f=f)
    a, f = with_field(subject_ref=ring.subject_ref("P-000004"))
    add("wrong-subject-ref-in-aad", "template re-attributed to another subject", a=a, f=f)
    a, f = with_field(store_id=fixed("another-store", sealing.STORE_ID_SIZE))
    add("wrong-store-id-in-aad", "row copied from another store", a=a, f=f)
    a, f = with_field(model="test-model-v2")
    add("wrong-model-in-aad", "template passed off as another model's", a=a, f=f)
    add("truncated-last-byte", "sealed blob missing its last byte", s=sealed[:-1])
    add("truncated-below-minimum", "40 bytes: shorter than version + nonce + tag (41)",
        s=sealed[:40])
    add("empty", "an empty blob", s=b"")
    add("wrong-version-byte", "version byte 0x02 instead of 0x01", s=b"\x02" + sealed[1:])
    add("version-byte-zero", "version byte 0x00 instead of 0x01", s=b"\x00" + sealed[1:])
    other_subject = ring.legacy_subjects[ring.subject_ref("P-000004")]
    add("wrong-key-other-subject", "record key derived with another subject's key",
        k=sealing.record_key(raw["scope_key"], other_subject, raw["record_id"]))
    add("wrong-key-next-epoch", "record key derived with the next epoch's key",
        k=sealing.record_key(ring.epoch_key(fields["epoch"] + 1),
                             ring.legacy_subjects[fields["subject_ref"]], raw["record_id"]))
    add("wrong-key-random", "an unrelated key", k=fixed("record/unrelated-key"))
    return out


def invalid_keyrings(valid: list[dict[str, Any]], masters: dict[str, bytes],
                     rings: dict[str, Keyring]) -> list[dict[str, Any]]:
    a, b = valid[0], valid[1]
    data, master = bytes.fromhex(a["file"]), masters[a["name"]]
    head_len = len(sealing.KEYRING_MAGIC) + 1 + sealing.STORE_ID_SIZE
    check_len = 1 + sealing.NONCE_SIZE + sealing.TAG_SIZE
    out: list[dict[str, Any]] = []

    def add(name: str, reason: str, file: bytes, *, open_error: str | None,
            from_bytes_error: str, key: bytes = master) -> None:
        out.append({"name": name, "reason": reason, "based_on": a["name"],
                    "master_key": key.hex(), "file": file.hex(),
                    "open_keyring_error": open_error, "from_bytes_error": from_bytes_error})

    add("wrong-master-key", "another store's master key", data,
        key=masters[b["name"]], open_error="KeyUnavailable", from_bytes_error="KeyUnavailable")
    add("flipped-body-byte", "a byte of the body ciphertext flipped",
        flip(data, head_len + check_len + 1 + sealing.NONCE_SIZE + 5),
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("flipped-body-tag", "last byte (body tag) flipped", flip(data, len(data) - 1),
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("truncated", "file missing its last byte", data[:-1],
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("truncated-to-header", "only magic, version, store id and check blob",
        data[: head_len + check_len],
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("wrong-magic", "magic 'BTKX' instead of 'BTKR'", b"BTKX" + data[4:],
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("wrong-version-byte", "version byte 0x02", data[:4] + b"\x02" + data[5:],
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    other = bytes.fromhex(b["file"])
    add("body-of-another-keyring", "this header and check blob, the body blob of another "
        "keyring (another master key)", data[: head_len + check_len] + other[head_len + check_len:],
        open_error="IntegrityError", from_bytes_error="IntegrityError")
    add("flipped-store-id-in-header",
        "a store id byte flipped. v1 binds the header as AAD of the check blob too, so this "
        "tampering is indistinguishable from a wrong master key: KeyUnavailable, not "
        "IntegrityError (fails closed either way)", flip(data, 6),
        open_error="KeyUnavailable", from_bytes_error="KeyUnavailable")
    ring = rings[a["name"]]
    for name, reason, body in (
        ("body-not-a-map", "a valid envelope whose body is a msgpack list, not a map",
         msgpack.packb([1, 2, 3])),
        ("body-missing-field", "a valid envelope whose body lacks 'high_water_us'",
         msgpack.packb({k: v for k, v in msgpack.unpackb(ring._body(), raw=False,
                                                           strict_map_key=False).items()
                        if k != "high_water_us"}, use_bin_type=True)),
    ):
        file = sealing._seal_keyring_with_nonces(
            master, ring.store_id, body, fixed(f"invalid/{name}/check-nonce", 24),
            fixed(f"invalid/{name}/body-nonce", 24))
        add(name, reason + " (open_keyring authenticates it; Keyring.from_bytes refuses it)",
            file, open_error=None, from_bytes_error="IntegrityError")
    return out


# --- main -------------------------------------------------------------------------------


def build() -> dict[str, Any]:
    keyrings, rings, masters = keyring_vectors()
    ring = rings["store-with-subjects"]
    records, bad_records = [], []
    for spec in _RECORDS:
        vector, raw = _record(spec, ring)
        records.append(vector)
        if spec["name"] in ("epoch-scoped-one-purpose", "held"):
            bad_records += [{**v, "name": f"{spec['name']}/{v['name']}"}
                            for v in invalid_records(raw, ring, spec["name"])]
    header = {"format": "biotemplate sealed formats v1 (see biotemplate/sealing.py)",
              "generator": "tests/vectors/generate.py", "note": "never edit; add v2 instead"}
    return {
        "record_v1.json": {**header, "derivations": derivations(ring), "records": records},
        "keyring_v1.json": {**header, "keyrings": keyrings},
        "invalid_v1.json": {**header, "records": bad_records,
                            "keyrings": invalid_keyrings(keyrings, masters, rings)},
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and compare with the files; write nothing")
    args = parser.parse_args(argv)
    files = {name: dumps(content) for name, content in build().items()}
    if args.check:
        bad = [n for n, text in files.items()
               if not (HERE / n).exists() or (HERE / n).read_text(encoding="utf-8") != text]
        print("vectors match the generator" if not bad else f"differ or missing: {bad}")
        return 1 if bad else 0
    existing = [n for n in FILES if (HERE / n).exists()]
    if existing:
        print(f"refusing to overwrite frozen v1 vectors: {existing}. v1 never changes; a "
              "format change adds v2 files (see README.md).", file=sys.stderr)
        return 1
    for name, text in files.items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
