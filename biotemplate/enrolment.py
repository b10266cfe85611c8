"""Enrolment: a validated batch of templates sealed, committed and indexed as one.

The ordering, and why: the policy decides first (purposes, TTL, source), under the lock
that ``set_policy`` changes it under; each subject's key is found (or, for a new subject,
drawn in memory only); the hnswlib insert (native, in a worker thread) overlaps the
sealing and the commit (Python, here); the rows, their subjects' key entries (a new
subject's key with them) and the audit entry commit in one transaction, and the keyring is
not written at all; the records become searchable only once both the commit and the insert
succeeded. If the commit fails, the new keys are simply dropped (they were never written
anywhere); if only the index fails, the committed rows stay and no snapshot may claim
them until a rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from . import sealing
from ._calls import Parts
from .codec import Plain
from .errors import PolicyViolation
from .gallery import Progress
from .validation import check_metadata, check_subject_id, check_text, normalised


def enroll(p: Parts, vecs: np.ndarray[Any, Any], subject_ids: list[str],
           purposes: Sequence[str], ttl: timedelta | None, source: str | None,
           metadata: dict[str, Any] | None, actor: str, fields: dict[str, Any],
           progress: Progress | None = None) -> list[str]:
    """Seal and commit a batch whose templates are validated: all rows or none; returns
    the record ids. ``fields`` are the audit fields the store's wrapper collected."""
    subject_ids = [check_subject_id(sid) for sid in subject_ids]  # NFC, before any ref
    src = check_text(source, "source", optional=True)
    meta = check_metadata(metadata)
    vault = p.vault
    with p.lock:  # the policy is read under the lock set_policy changes it under
        policy = vault.policy
        ttl = policy.resolve_ttl(purposes, ttl)
        for name in purposes:
            if not policy.purpose(name).source_allowed(src):
                raise PolicyViolation(f"this source is not allowed for purpose {name!r}")
        now_us = p.clock.now_us()
        expiry_us = now_us + ttl // timedelta(microseconds=1)
        refs = [vault.subject_ref(s) for s in subject_ids]
        ids = [sealing.random_id().hex() for _ in subject_ids]
        new_refs: set[bytes] = set()
        committed = False
        try:
            new_refs = vault.ensure_subject_keys(refs)  # in memory until the commit
            # The index insert (native, in a worker) overlaps the sealing and the commit
            # (Python, here); the records become searchable only once both succeeded.
            with p.gallery.adding(ids, refs, subject_ids, purposes, expiry_us,
                                  normalised(vecs), progress):
                rows = [vault.seal(record_id=rid, subject_ref=ref, purposes=purposes,
                                   expiry_us=expiry_us,
                                   plain=Plain(template=vec, subject_id=sid, metadata=meta,
                                               source=src, created_us=now_us))
                        for rid, vec, sid, ref in zip(ids, vecs, subject_ids, refs,
                                                      strict=True)]
                with p.mutation():
                    vault.insert(rows)  # and their ids (a new subject's key) in entries
                    p.trail.append("enroll", actor=actor, count=len(rows), expires=expiry_us,
                                   source=src, record_ids=ids[:100], **fields)
                committed = True
                p.gallery.remember(rows)  # before the records become searchable
        except BaseException:
            if committed:  # rows the index lacks: no snapshot may claim them covered
                p.gallery.mark_incomplete()
            else:  # never committed: the new keys exist nowhere
                vault.forget_subject_keys(new_refs)
            raise
        return ids
