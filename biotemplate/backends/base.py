"""The storage interface the store is written against.

A backend keeps sealed rows, sealed subject-key entries and a little metadata. It knows no
keys and no templates: every field of :class:`RecordRow` except ``blob`` is a header that
is stored in clear and bound as associated data inside ``blob``, so a backend (or whoever
edits its files) can lose or damage data but cannot change what a record means without
detection. Entries are bound likewise to their subject ref and bucket.

SQLite is the embedded default; PostgreSQL fits beside it by implementing this Protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from biotemplate.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class RecordRow:
    """One sealed record as stored.

    Attributes:
        record_id: random id (32 lowercase hex characters), unique in the store.
        subject_ref: keyed hash of the subject id (never the id itself).
        epoch: the retention epoch in which the record expires (selects its key).
        expiry_us: expiry, microseconds since the Unix epoch, UTC.
        purposes: sorted purpose tags.
        model: the template model id (one per store, bound per record).
        held: True when sealed under the subject's legal-hold key instead of the epoch key.
        blob: version byte, nonce and AEAD ciphertext (see ``sealing``).
        seq: the row's sequence number, assigned by the backend on insert (0 before).
    """

    record_id: str
    subject_ref: bytes
    epoch: int
    expiry_us: int
    purposes: tuple[str, ...]
    model: str
    held: bool
    blob: bytes
    seq: int = 0


class Backend(Protocol):
    """What the store needs from a database. Writes happen only inside ``transaction()``."""

    def transaction(self) -> AbstractContextManager[None]:
        """One write transaction: committed on normal exit, rolled back on exception."""
        ...

    def get_meta(self, key: str) -> bytes | None: ...

    def put_meta(self, key: str, value: bytes) -> None: ...

    def insert(self, rows: Sequence[RecordRow]) -> None:
        """Add new rows; a duplicate record id raises and the transaction rolls back."""
        ...

    def update(self, rows: Sequence[RecordRow]) -> None:
        """Replace expiry, epoch, held and blob of existing rows (a reseal), by record id.
        The expiry only ever moves earlier (a tighter policy applied to stored records)."""
        ...

    def delete(self, record_ids: Sequence[str]) -> int:
        """Delete rows by id; returns how many existed."""
        ...

    def get(self, record_id: str) -> RecordRow | None: ...

    def headers(self, record_ids: Sequence[str]) -> list[RecordRow]:
        """The rows of these ids with ``blob`` cut to its last 16 bytes (the AEAD tag)."""
        ...

    def by_subject(self, subject_ref: bytes) -> list[RecordRow]: ...

    def expired(self, now_us: int) -> list[RecordRow]:
        """Rows whose expiry is at or before ``now_us`` (held or not), ``blob`` cut to
        its last 16 bytes (a purge needs no ciphertext)."""
        ...

    def below_epoch(self, epoch: int) -> list[RecordRow]:
        """Rows that are not held and whose epoch is below ``epoch`` (their key is gone),
        ``blob`` cut to its last 16 bytes."""
        ...

    def scan(self, batch_size: int = 4096) -> Iterator[list[RecordRow]]:
        """Every row, in batches, in ``seq`` order."""
        ...

    def scan_headers(self, batch_size: int = 16384) -> Iterator[list[RecordRow]]:
        """Every row with ``blob`` cut to its last 16 bytes (the AEAD tag), in seq order."""
        ...

    def last_change(self) -> int: ...

    def external_version(self) -> int | None:
        """A number that changes whenever another connection commits to the database
        (never on this connection's own commits), or None if the backend cannot tell
        (then every search confirms its candidates against their rows: ``_baseline``)."""
        ...

    # Subject-key entries: (bucket, subject ref) -> sealed blob. A bucket's entries are
    # stored together, so resealing one bucket touches a few pages, not one per entry.

    def get_entry(self, bucket: int, subject_ref: bytes) -> bytes | None: ...

    def bucket_entries(self, bucket: int) -> list[tuple[bytes, bytes]]:
        """(subject ref, blob) of every entry of one bucket."""
        ...

    def put_entries(self, entries: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Insert or replace (bucket, subject ref, blob) entries."""
        ...

    def delete_entries(self, keys: Sequence[tuple[int, bytes]]) -> int:
        """Delete entries by (bucket, subject ref); returns how many existed."""
        ...

    def scan_entries(self, batch_size: int = 16384) -> Iterator[list[tuple[int, bytes, bytes]]]:
        """Every (bucket, subject ref, blob) entry, in batches."""
        ...

    def entry_count(self) -> int: ...

    def subject_refs(self) -> set[bytes]: ...

    def count(self) -> int: ...

    def backup(self, dest: Path) -> None:
        """A consistent copy of the live database in a new file (never overwritten)."""
        ...

    def checkpoint(self) -> None:
        """Truncate the write-ahead log so deleted bytes do not linger in it."""
        ...

    def close(self) -> None: ...


def purposes_column(purposes: Sequence[str]) -> str:
    """Purpose tags as both backends store them: sorted, comma-joined (a tag with a comma
    is refused, since it would read back as two).

    Raises:
        InvalidInput: a tag contains a comma.
    """
    if any("," in tag for tag in purposes):
        raise InvalidInput("a purpose tag contains a comma")
    return ",".join(sorted(purposes))


def purposes_of(column: str) -> tuple[str, ...]:
    return tuple(column.split(",")) if column else ()
