"""The PostgreSQL schema of a store: tables, triggers, migrations and role grants.

Kept apart from the backend so the shape of the data can be read in one place. Names are
formatted into SQL only after they matched ``SCHEMA_NAME`` (a plain lower-case
identifier); values are always bound by the backend.

Versioning: ``schema_version`` holds one row. ``PostgresBackend.open`` migrates an older
store, one version per transaction under an advisory lock (instances opening together
migrate once), and refuses a newer one. ``MIGRATIONS[n]`` takes version n to n + 1.
"""

from __future__ import annotations

import re

from biotemplate.errors import InvalidInput

__all__ = ["MIGRATIONS", "SCHEMA_NAME", "SCHEMA_VERSION", "ddl", "grant_statements"]

SCHEMA_VERSION = 1
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
# names that are not roles (or not safe to grant to): a grant to them reaches every role
_RESERVED = frozenset({"public", "current_user", "session_user", "current_role", "user",
                       "all", "none", "pg_database_owner"})


def ddl(s: str) -> tuple[str, ...]:
    """The schema, version 1. ``s`` is a checked identifier (``_SCHEMA_NAME``)."""
    channel = f"biotemplate_{s}"
    return (
        f"CREATE TABLE {s}.meta (key text PRIMARY KEY, value bytea NOT NULL)",
        f"CREATE TABLE {s}.records (seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,"
        " record_id text PRIMARY KEY, subject_ref bytea NOT NULL, epoch bigint NOT NULL,"
        " expiry_us bigint NOT NULL, purposes text NOT NULL, model text NOT NULL,"
        " held boolean NOT NULL, blob bytea NOT NULL)",
        f"CREATE INDEX records_subject ON {s}.records (subject_ref)",
        f"CREATE INDEX records_expiry ON {s}.records (expiry_us)",
        f"CREATE TABLE {s}.subject_keys (bucket integer NOT NULL, subject_ref bytea NOT NULL,"
        " blob bytea NOT NULL, PRIMARY KEY (bucket, subject_ref))",
        f"CREATE TABLE {s}.keyring (id integer PRIMARY KEY CHECK (id = 1),"
        " version bigint NOT NULL, blob bytea NOT NULL)",
        f"CREATE TABLE {s}.changes (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " record_id text NOT NULL, op text NOT NULL)",
        f"CREATE TABLE {s}.audit_entries (seq bigint PRIMARY KEY, ref_seq bigint,"
        " body bytea NOT NULL, hash bytea NOT NULL, sig bytea NOT NULL)",
        f"CREATE INDEX audit_ref_seq ON {s}.audit_entries (ref_seq)",
        f"CREATE TABLE {s}.audit_meta (key text PRIMARY KEY, value bytea NOT NULL)",
        f"CREATE TABLE {s}.audit_lock (id integer PRIMARY KEY CHECK (id = 1))",
        f"INSERT INTO {s}.audit_lock VALUES (1)",
        # the feed: every write to records and keyring, logged by the database itself
        f"CREATE FUNCTION {s}.log_record() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF TG_OP = 'DELETE' THEN INSERT INTO {s}.changes (record_id, op)"
        " VALUES (OLD.record_id, 'del'); RETURN OLD; END IF;"
        f" INSERT INTO {s}.changes (record_id, op) VALUES (NEW.record_id,"
        " CASE TG_OP WHEN 'INSERT' THEN 'add' ELSE 'reseal' END); RETURN NEW; END $$",
        f"CREATE TRIGGER records_log AFTER INSERT OR UPDATE OR DELETE ON {s}.records"
        f" FOR EACH ROW EXECUTE FUNCTION {s}.log_record()",
        f"CREATE FUNCTION {s}.log_keys() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" INSERT INTO {s}.changes (record_id, op) VALUES ('', 'keys'); RETURN NEW; END $$",
        f"CREATE TRIGGER keyring_log AFTER INSERT OR UPDATE ON {s}.keyring"
        f" FOR EACH ROW EXECUTE FUNCTION {s}.log_keys()",
        f"CREATE FUNCTION {s}.notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$",
        f"CREATE TRIGGER changes_notify AFTER INSERT ON {s}.changes"
        f" FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify()",
        # the audit trail is append-only, here as in SQLite
        f"CREATE FUNCTION {s}.append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION 'the audit trail is append-only'; END $$",
        f"CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON {s}.audit_entries"
        f" FOR EACH ROW EXECUTE FUNCTION {s}.append_only()",
        f"CREATE TRIGGER audit_meta_write_once BEFORE UPDATE OR DELETE ON {s}.audit_meta"
        f" FOR EACH ROW EXECUTE FUNCTION {s}.append_only()",
        f"CREATE TABLE {s}.schema_version (version integer NOT NULL)",
        f"INSERT INTO {s}.schema_version VALUES ({SCHEMA_VERSION})",
    )


# Migrations: version n -> n + 1, each a list of statements run in one transaction with the
# version bump. Empty while the schema is at its first version.
MIGRATIONS: dict[int, tuple[str, ...]] = {}


def grant_statements(schema: str, *, service: str | None = None,
                     auditor: str | None = None) -> list[str]:
    """The least-privilege grants for a store's schema (the owner runs them):

    - ``service``, the role the matching service's instances log in as: read and write
      rows, entries, settings and key state; append to (never change) the audit trail;
      no DDL, so it cannot drop the append-only triggers (only the owner can);
    - ``auditor``: read the audit trail and its public key, nothing else (no row, no
      entry, no key state): enough for ``verify_audit(url)``.

    Raises:
        InvalidInput: a name that is not a plain lower-case identifier.
    """
    for name in (schema, service, auditor):
        if name is not None and (not SCHEMA_NAME.fullmatch(name) or name in _RESERVED):
            raise InvalidInput("schema and role names must be lower-case identifiers, not "
                               "a reserved name such as public")
    s = schema
    out = []
    if service is not None:
        out += [f"GRANT USAGE ON SCHEMA {s} TO {service}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.records, {s}.subject_keys,"
                f" {s}.meta, {s}.keyring TO {service}",
                f"GRANT SELECT, INSERT ON {s}.changes, {s}.audit_entries, {s}.audit_meta"
                f" TO {service}",
                f"GRANT SELECT ON {s}.schema_version TO {service}",
                f"GRANT SELECT, UPDATE ON {s}.audit_lock TO {service}"]
    if auditor is not None:
        out += [f"GRANT USAGE ON SCHEMA {s} TO {auditor}",
                f"GRANT SELECT ON {s}.audit_entries, {s}.audit_meta, {s}.schema_version"
                f" TO {auditor}"]
    return out
