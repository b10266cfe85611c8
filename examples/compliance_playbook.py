"""Compliance playbook: the tasks of a data-protection or compliance engineer, in order.

Who it is for: whoever answers for what the store keeps. Each step is the library call
and, in the comment above it, the ``biotemplate`` command that does the same from a shell
(docs/compliance.md explains each field and guarantee):

1. write the retention policy as TOML and validate it   ``policy check policy.toml``
2. answer an access request (GDPR Art. 15)               ``export STORE SUBJECT``
3. answer an erasure request, keep its receipt (Art. 17) ``erase STORE SUBJECT``
4. place and release a legal hold                        ``hold place|release``
5. see what is about to expire                           ``report retention STORE``
6. tighten a limit: see its effect, then apply it        ``policy diff`` / ``policy apply``
7. export the audit trail for a regulator (AI Act Art. 12), take a checkpoint for a
   witness, and verify the trail against it, all without the master key
                                  ``audit export`` / ``audit checkpoint`` / ``audit verify``

Runs as it is, on synthetic templates, in a temporary folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import biotemplate as bt
from biotemplate.synthetic import make_gallery

POLICY_TOML = """\
epoch = "1d"   # expired or erased data is unreadable in every copy within a day of a purge

[purposes.access-control]
description = "1:1 verification at the staff entrance"
max_retention = "1y"          # GDPR Art. 5(1)(e): no longer than necessary
default_retention = "180d"
modes = ["verification"]
match_threshold = 0.6         # synthetic data; calibrate for your model

[purposes.watchlist]
description = "persons sought under a court order"
max_retention = "3y"          # e.g. BIPA's outer limit
modes = ["identification", "investigation"]
match_threshold = 0.55
max_candidates = 20
allowed_sources = ["case-file/"]
"""


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="biotemplate-compliance-"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    # 1. The policy file, validated: an unknown key or a bad duration names its field.
    (work / "policy.toml").write_text(POLICY_TOML)
    policy = bt.RetentionPolicy.from_toml(work / "policy.toml")  # policy check policy.toml
    print(f"1. policy valid: {sorted(policy.purposes)}")

    keys = bt.FileKeyProvider.generate(work / "master.key")
    staff = make_gallery(40, 1, 128, seed=31, prefix="E-")
    sought = make_gallery(10, 2, 128, seed=32, prefix="W-")
    store = bt.TemplateStore.create(work / "store", dim=128, model="faces-v3",
                                    policy=policy, key_provider=keys)
    store.enroll_many(staff.templates, subject_ids=staff.subject_ids,
                      purposes=["access-control"], actor="hr-onboarding")
    store.enroll_many(sought.templates, subject_ids=sought.subject_ids,
                      purposes=["watchlist"], ttl=timedelta(days=900),
                      source="case-file/2026-7", actor="case-officer-4")

    # 2. Access request: everything held about E-000003, decrypted, with purposes and
    # expiry (the command prints JSON with the templates in base64, or --out FILE.npy).
    views = store.export_subject("E-000003", actor="dpo", reason="Art. 15 request 2026-31")
    for v in views:
        print(f"2. access request: record {v.record_id[:8]}..., purposes {v.purposes}, "
              f"expires {v.expires_at:%Y-%m-%d}, {v.template.shape[0]}-d template")

    # 3. Erasure request: the receipt is the proof; keep it outside the store (a backup
    # restored later would bring the subject back: re-apply receipts after a restore).
    receipt = store.erase_subject("E-000005", actor="dpo", reason="Art. 17 request 2026-32")
    receipts = work / "receipts"
    receipts.mkdir()
    (receipts / "2026-32.json").write_text(json.dumps({
        "request": "2026-32", "subject_ref": receipt.subject_ref,
        "records_erased": receipt.records_erased, "key_destroyed": receipt.key_destroyed,
        "at": receipt.at.isoformat(), "audit_seq": receipt.audit_seq}))
    print(f"3. erasure: {receipt.records_erased} record, key destroyed "
          f"{receipt.key_destroyed}, audit entry {receipt.audit_seq}")

    # 4. A legal hold freezes a subject: no erasure, no purge, until released.
    store.place_hold("W-000002", actor="legal", reason="litigation 2026-4")
    try:
        store.erase_subject("W-000002", actor="dpo", reason="Art. 17 request 2026-33")
    except bt.PolicyViolation as exc:
        print(f"4. erasure under hold refused: {exc}")
    store.release_hold("W-000002", actor="legal", reason="litigation closed")

    # 5. What is stored and what is about to expire (read-only beside a running service).
    report = store.retention_report()
    for p in report.purposes:
        print(f"5. {p.purpose}: {p.live} live, {p.expiring_30d} expire within 30 days, "
              f"oldest expiry {p.oldest_expiry:%Y-%m-%d}, next purge shreds "
              f"{p.purge_removes}")

    # 6. Tighten the watch list from 3 years to 1: first the effect, then the change.
    # A tighter limit applies to stored records (counted from their enrolment); a looser
    # one never extends them.
    tighter = bt.RetentionPolicy.from_toml_string(
        POLICY_TOML.replace('max_retention = "3y"', 'max_retention = "1y"'))
    diff = store.policy_diff(tighter)                               # policy diff STORE F
    for change in diff.changes:
        print(f"6. diff: {change.purpose} {dict(change.fields)}: {change.shortened} of "
              f"{change.records} stored records would be shortened")
    applied = store.set_policy(tighter, actor="dpo", reason="DPIA review 2026")
    print(f"6. applied: {applied.records_shortened} records shortened, "
          f"{applied.records_expired} expired at once, audit entry {applied.audit_seq}")
    store.close()

    # 7. The auditor's side: no master key; the files may be live under the service.
    exported = work / "audit.jsonl"
    with exported.open("w") as out:                                 # audit export STORE
        for record in bt.export_audit(work / "store"):
            out.write(record.to_json() + "\n")
    lines = exported.read_text().splitlines()
    print(f"7. audit export: {len(lines)} entries as JSON Lines, e.g. "
          f"{json.loads(lines[-1])['event']!r} by {json.loads(lines[-1])['actor']!r}")
    checkpoint = bt.checkpoint_audit(work / "store")                # audit checkpoint
    (work / "witness-cp.json").write_text(checkpoint.to_json())  # send it off the host
    kept = bt.Checkpoint.from_json((work / "witness-cp.json").read_text())
    result = bt.verify_audit(work / "store", kept)                  # audit verify --checkpoint
    print(f"7. audit verifies against the witness's checkpoint: {result.ok} "
          f"({result.entries} entries)")
    assert result.ok and applied.records_shortened == 20


if __name__ == "__main__":
    main()
