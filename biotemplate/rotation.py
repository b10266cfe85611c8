"""Key rotation: the master key (cheap) and the whole key state (post-compromise security).

``rotate_master_key`` reseals only the keyring under a new master key: the audit entry
comes first, so a process killed before the new keyring is in place leaves an entry that
the next open answers with a "rollback" (it opened under the old key).

``rotate_keys`` answers a leaked copy of the key state (a keyring and its master key):
every readable record is resealed under a fresh ratchet state, every held record under a
fresh hold key, and every subject-key entry under fresh bucket keys, all drawn at random
(nothing is derived from the old state), saved as pending before one records transaction
and made current after its commit by the staged key change. A crash before the commit
leaves the old keys current (the pending ones are dropped on open); after it, open
completes the change. Records enrolled later are sealed under keys the leaked copy cannot
derive. Not rotated: the lookup key (re-keying subject refs would reseal every row under
a new associated datum), the digest, meta and audit keys (none protects a template).
The public methods are on :class:`~.store.TemplateStore`.
"""

from __future__ import annotations

from . import sealing
from ._calls import Parts
from .errors import InvalidInput
from .gallery import Progress
from .keys import KeyProvider
from .results import KeyReceipt, RotationReceipt


def rotate_master_key(p: Parts, new_key_provider: KeyProvider, *, actor: str) -> KeyReceipt:
    """The ordering of :meth:`TemplateStore.rotate_master_key`."""
    with p.audited("rotate-master-key", actor) as f:
        new_kek = new_key_provider.master_key()
        vault = p.vault
        with p.lock:
            old_id, new_id = vault.master_key_id, sealing.master_key_id(new_kek.reveal())
            if new_id.hex() == old_id:
                raise InvalidInput("the new master key is the current one")
            seq = p.trail.append("rotate-master-key", actor=str(actor), old_key=old_id,
                                 new_key=new_id.hex(), **f)
            vault.rewrap(new_kek)
            return KeyReceipt(master_key_id=new_id.hex(), audit_seq=seq)


def rotate_keys(p: Parts, *, actor: str, progress: Progress | None = None) -> RotationReceipt:
    """The ordering of :meth:`TemplateStore.rotate_keys`."""
    with p.audited("rotate-keys", actor) as f:
        vault = p.vault
        with p.lock:
            vault.prepare_rekey()  # pending keys saved before any row is sealed under them
            holds = len(vault.keyring.pending_holds)
            try:
                with p.gallery.resealing_all():
                    with p.mutation():
                        records = vault.rekey_rows(progress)
                        subjects = vault.rewrap_entries()
                        gen = vault.stage(rotate=range(len(vault.keyring.buckets)),
                                          rekey=True)
                        seq = p.trail.append("rotate-keys", actor=str(actor), records=records,
                                             subjects=subjects, holds=holds, gen=gen, **f)
            except BaseException:
                vault.discard_staged()
                vault.save_keys()  # the pending keys protect nothing that committed
                raise
            p.apply_key_change()
            return RotationReceipt(records_resealed=records, subjects_rewrapped=subjects,
                                   holds_rekeyed=holds, audit_seq=seq)
