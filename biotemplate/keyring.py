"""The keyring: the store's key state, in a small file of its own, sealed under the master key.

It is not in SQLite and it is replaced atomically (``_files.atomic_replace``), so a crash
leaves either the old or the new keyring, never neither and never a blend. It holds:

- the epoch ratchet state S_e (e = first epoch not yet shredded); purge advances it,
- the bucket keys (1,024 of them, 32 KiB): each subject's own random key lives in
  ``records.db``, sealed under the key of its bucket (``subject_keys.py``); deleting or
  erasing rotates that bucket key, so the subject's entry in an older copy dies,
- while such a rotation is in flight, the bucket's next key (``pending``),
- per-subject legal-hold keys (records under hold are resealed with them),
- the lookup key (subject refs), the digest key (probe digests), the meta key (sealed
  settings), the audit signing seed,
- the erasure generation and snapshot secret (snapshot keys change with both), the
  digests of the accepted policy versions, and the time high-water mark;
- the state generation: how many key-state changes the store has committed. The records
  database and the audit trail carry it too, so a file put back from an older copy is
  caught on open (``vault.Vault.open``, docs/architecture.md "Rollback").

Because it is rewritten on every shredding event, back it up on its own short schedule
(no longer than one epoch): a keyring backup is what could resurrect expired or erased
records from an old database copy. Owned by the vault (``vault.Vault``); nothing else
mutates it. A keyring written before the bucket keys existed holds the subject keys
themselves (``legacy_subjects``, body field "subjects"); ``Vault.open`` moves them into
records.db once, and the field is then always written empty.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import msgpack

from . import _files, sealing
from .errors import IntegrityError, KeyUnavailable
from .keys import SecretKey

__all__ = ["BUCKETS", "Keyring", "epoch_of"]

BUCKETS = 1024  # bucket keys of a new store: fixed for its life (a rotation costs ~n/1024)


def epoch_of(t_us: int, epoch_us: int) -> int:
    """The epoch number of a time: whole epoch lengths since the Unix epoch (UTC)."""
    return t_us // epoch_us


@dataclass(eq=False)
class Keyring:
    """The key material of one store. Mutate, then ``save`` (atomic) before relying on it."""

    store_id: bytes
    epoch_us: int
    ratchet_epoch: int
    ratchet_state: bytes
    lookup_key: bytes
    digest_key: bytes
    meta_key: bytes
    audit_seed: bytes
    # ref -> subject key, only in a keyring from before bucket keys (moved on open)
    legacy_subjects: dict[bytes, bytes] = field(default_factory=dict)
    holds: dict[bytes, tuple[bytes, bool]] = field(default_factory=dict)
    erasures: int = 0
    high_water_us: int = 0
    # Digests of the policy versions the store accepts (one; two while set_policy runs):
    # a sealed policy put back from an older database copy is refused on open.
    policies: list[bytes] = field(default_factory=list)
    # Mixed into the snapshot key and replaced whenever a subject key is destroyed: the
    # erasure generation is only a counter, this makes a snapshot copy from before an
    # erasure unopenable even with the current keyring.
    snapshot_secret: bytes | None = None
    generation: int = 0
    # K_bucket: seals the subject-key entries of one bucket in records.db; len() = B
    buckets: list[bytes] = field(default_factory=list)
    # bucket -> its next key, saved before a transaction reseals the bucket under it and
    # made current after the commit (``Vault.apply_staged``)
    pending: dict[int, bytes] = field(default_factory=dict)
    # While ``rotate_keys`` is in flight: a fresh ratchet state standing at
    # ``ratchet_epoch`` and a fresh hold key per subject with a hold, saved before the
    # transaction that reseals the records under them, made current after its commit.
    pending_ratchet: bytes | None = None
    pending_holds: dict[bytes, bytes] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _epoch_cache: dict[int, bytes] = field(default_factory=dict)
    _state_cache: dict[int, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"Keyring(store={self.store_id.hex()}, epoch={self.ratchet_epoch}, "
                f"buckets={len(self.buckets)}, holds={len(self.holds)})")

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")

    @classmethod
    def new(cls, store_id: bytes, epoch_us: int, now_us: int) -> Keyring:
        rk = sealing.random_key
        return cls(store_id=store_id, epoch_us=epoch_us,
                   ratchet_epoch=epoch_of(now_us, epoch_us), ratchet_state=rk(),
                   lookup_key=rk(), digest_key=rk(), meta_key=rk(), audit_seed=rk(),
                   high_water_us=now_us, snapshot_secret=rk(), buckets=new_buckets())

    # --- epochs ---

    def epoch_key(self, epoch: int) -> bytes:
        """K_epoch(e), derived forward from S_e. Raises KeyUnavailable for a shredded epoch."""
        with self._mutex:  # the ratchet (epoch, state) pair must be read as one
            if epoch < self.ratchet_epoch:
                raise KeyUnavailable("that epoch has been shredded")
            cached = self._epoch_cache.get(epoch)
            if cached is not None:
                return cached
            # Step forward from the nearest state already derived. States of epochs >= the
            # ratchet epoch are derivable from S_e anyway, so caching them exposes no more.
            e = max((x for x in self._state_cache if x <= epoch), default=self.ratchet_epoch)
            state = self._state_cache.get(e, self.ratchet_state)
            for _ in range(epoch - e):
                state = sealing.ratchet_step(state)
                e += 1
                if e % 64 == 0:
                    self._state_cache[e] = state
            key = sealing.epoch_key_from_state(state)
            self._epoch_cache[epoch] = key
            return key

    def pending_epoch_key(self, epoch: int) -> bytes:
        """K_epoch(e) of the pending ratchet state (``rotate_keys`` in flight)."""
        if self.pending_ratchet is None or epoch < self.ratchet_epoch:
            raise KeyUnavailable("no pending ratchet state for that epoch")
        state = self.pending_ratchet
        for _ in range(epoch - self.ratchet_epoch):
            state = sealing.ratchet_step(state)
        return sealing.epoch_key_from_state(state)

    def promote_pending_ratchet(self) -> None:
        """Make the pending ratchet state and hold keys current: the old state, and every
        epoch key derived from it, are gone from this keyring."""
        if self.pending_ratchet is None:
            return
        with self._mutex:
            self.ratchet_state, self.pending_ratchet = self.pending_ratchet, None
            self._epoch_cache, self._state_cache = {}, {}
        for ref, (key, active) in list(self.holds.items()):
            self.holds[ref] = (self.pending_holds.get(ref, key), active)
        self.pending_holds = {}

    def advance(self, to_epoch: int) -> bool:
        """Ratchet S_e forward to S_to_epoch, forgetting the old state. True if it moved."""
        with self._mutex:
            if to_epoch <= self.ratchet_epoch:
                return False
            state = self.ratchet_state
            for _ in range(to_epoch - self.ratchet_epoch):
                state = sealing.ratchet_step(state)
            self.ratchet_state, self.ratchet_epoch = state, to_epoch
            self._epoch_cache = {e: k for e, k in self._epoch_cache.items() if e >= to_epoch}
            self._state_cache = {e: k for e, k in self._state_cache.items() if e >= to_epoch}
            return True

    # --- subjects and holds ---

    def subject_ref(self, subject_id: str) -> bytes:
        return sealing.subject_ref(self.lookup_key, subject_id)

    def bucket_of(self, ref: bytes) -> int:
        """The bucket of a subject: a stable function of its (keyed, uniform) ref."""
        return int.from_bytes(ref[:4], "big") % len(self.buckets)

    def held(self, ref: bytes) -> bool:
        entry = self.holds.get(ref)
        return entry is not None and entry[1]

    # --- persistence ---

    def _body(self) -> bytes:
        data: dict[str, Any] = {
            "v": 1, "epoch_us": self.epoch_us,
            "ratchet": [self.ratchet_epoch, self.ratchet_state],
            "lookup": self.lookup_key, "digest": self.digest_key, "meta": self.meta_key,
            "audit": self.audit_seed, "subjects": self.legacy_subjects,
            "holds": {ref: [key, active] for ref, (key, active) in self.holds.items()},
            "erasures": self.erasures, "high_water_us": self.high_water_us,
        }
        if self.policies:  # optional in v1: absent in keyrings written before it existed
            data["policies"] = self.policies
        if self.snapshot_secret is not None:  # likewise optional
            data["snapshot"] = self.snapshot_secret
        if self.generation:  # likewise (0 until the first key-state change)
            data["gen"] = self.generation
        if self.buckets:  # likewise: one 32 * B byte string
            data["buckets"] = b"".join(self.buckets)
        if self.pending:
            data["pending"] = self.pending
        if self.pending_ratchet is not None:
            data["pending_ratchet"] = self.pending_ratchet
            data["pending_holds"] = self.pending_holds
        return bytes(msgpack.packb(data, use_bin_type=True))

    def to_bytes(self, master_key: SecretKey) -> bytes:
        return sealing.seal_keyring(master_key.reveal(), self.store_id, self._body())

    @classmethod
    def from_bytes(cls, data: bytes, master_key: SecretKey) -> Keyring:
        """Raises KeyUnavailable (wrong master key) or IntegrityError (tampered/corrupt)."""
        store_id, body = sealing.open_keyring(master_key.reveal(), data)
        try:
            d = msgpack.unpackb(body, raw=False, strict_map_key=False)
            ratchet_epoch, ratchet_state = d["ratchet"]
            return cls(
                store_id=store_id, epoch_us=_int(d["epoch_us"]),
                ratchet_epoch=_int(ratchet_epoch), ratchet_state=_key(ratchet_state),
                lookup_key=_key(d["lookup"]), digest_key=_key(d["digest"]),
                meta_key=_key(d["meta"]), audit_seed=_key(d["audit"]),
                legacy_subjects=_keys(d["subjects"]),
                holds={_key(k): (_key(v[0]), _bool(v[1])) for k, v in d["holds"].items()},
                erasures=_int(d["erasures"]), high_water_us=_int(d["high_water_us"]),
                policies=[_key(x) for x in d.get("policies", [])],
                snapshot_secret=None if "snapshot" not in d else _key(d["snapshot"]),
                generation=_int(d.get("gen", 0)), buckets=_buckets(d.get("buckets", b"")),
                pending={_int(b): _key(k) for b, k in d.get("pending", {}).items()},
                pending_ratchet=(None if "pending_ratchet" not in d
                                 else _key(d["pending_ratchet"])),
                pending_holds={_key(r): _key(v)
                               for r, v in d.get("pending_holds", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                msgpack.ExtraData):
            raise IntegrityError("keyring content is malformed") from None

    def save(self, path: Path, master_key: SecretKey,
             before_rename: Callable[[], None] | None = None) -> None:
        """Atomically replace the keyring file (``before_rename``: the crash tests' seam).

        A temp keyring left by a killed process is deleted by this call and on open: it
        holds key material the new keyring may just have shredded.
        """
        _files.atomic_replace(path, self.to_bytes(master_key), before_rename)

    def assume(self, other: Keyring) -> None:
        """Take over ``other``'s key state in place (an instance of a shared store reloads
        the state another instance saved); the parts holding this object see it at once,
        and keys derived from the old state are dropped."""
        if other.store_id != self.store_id:
            raise IntegrityError("the key state belongs to another store")
        with self._mutex:
            for f in fields(self):
                if not f.name.startswith("_"):
                    setattr(self, f.name, getattr(other, f.name))
            self._epoch_cache.clear()
            self._state_cache.clear()

    @classmethod
    def load(cls, path: Path, master_key: SecretKey) -> Keyring:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(f"keyring {path} is missing") from None
        return cls.from_bytes(data, master_key)


def _key(value: object) -> bytes:
    """A 32-byte key, ref or digest as stored: anything else means a corrupt keyring."""
    if not isinstance(value, bytes) or len(value) != sealing.KEY_SIZE:
        raise ValueError("not a 32-byte value")
    return value


def _keys(value: object) -> dict[bytes, bytes]:
    """The subject-key map: ``_key`` for every key and value, in C-level passes (a store
    of 100k subjects opens this map on every open)."""
    if not isinstance(value, dict):
        raise ValueError("not a map")
    for column in (value.keys(), value.values()):
        if not set(map(type, column)) <= {bytes} or not set(map(len, column)) <= {sealing.KEY_SIZE}:
            raise ValueError("not a 32-byte value")
    return dict(value)


def new_buckets(count: int = BUCKETS) -> list[bytes]:
    """The bucket keys of a new store (or of one moved from a v1 keyring)."""
    return [sealing.random_key() for _ in range(count)]


def _buckets(value: object) -> list[bytes]:
    """The bucket keys as stored: one byte string of 32-byte keys."""
    size = sealing.KEY_SIZE
    if not isinstance(value, bytes) or len(value) % size:
        raise ValueError("not a list of 32-byte keys")
    return [value[i : i + size] for i in range(0, len(value), size)]


def _int(value: object) -> int:
    if type(value) is not int:
        raise ValueError("not an int")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError("not a bool")
    return value
