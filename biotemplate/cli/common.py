"""What every command shares: how it is declared, where its key comes from, how it opens
the store, reads its input files and prints its answer.

A command is a function ``handler(args) -> Reply``: it calls the library and returns what
to print, as data (``--json``) and as text (for a person). It raises :class:`CliError`
(exit 1: refused, not found, unreadable input) or :class:`UsageError` (exit 2: bad
usage); the library's own errors (``BiotemplateError``) reach ``main``, which prints them
as one line. Nothing here logs, and no message quotes a subject id, a key or a template.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

import biotemplate as bt
from biotemplate.errors import InvalidInput, InvalidPolicy, KeyUnavailable
from biotemplate.keys import read_private
from biotemplate.policy import format_duration, parse_duration
from biotemplate.validation import MAX_SUBJECT_ID, check_subject_id

from .progress import progress_bar

JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
MAX_INPUT_BYTES = 1 << 32  # a .npy or id file larger than 4 GiB is refused, not mapped


class CliError(Exception):
    """A command failed for a reason the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(CliError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True, slots=True)
class Reply:
    """What a command prints: ``data`` with ``--json``, ``text`` otherwise (none with
    ``--quiet``). A non-zero ``code`` with an ``error`` line on stderr marks an answer
    that is also a failure (e.g. an audit trail that does not verify)."""

    data: JSON
    text: str
    code: int = 0
    error: str | None = None


Handler = Callable[[argparse.Namespace], Reply | None]

# --json and --quiet on every command, after its name too: SUPPRESS keeps a value given
# before the command name (on the main parser) when it is not repeated after it.
OUTPUT = argparse.ArgumentParser(add_help=False)
OUTPUT.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print the answer as JSON on stdout, for scripts")
OUTPUT.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                    help="print nothing but errors (and no progress bar)")


def add_command(subparsers: Subparsers, name: str, *, help: str, handler: Handler,
                description: str | None = None) -> argparse.ArgumentParser:
    """Declare one command: its parser (with ``--json`` and ``--quiet``) and handler."""
    parser = subparsers.add_parser(name, help=help, description=description or help,
                                   parents=[OUTPUT])
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers: Subparsers, name: str, *, help: str) -> Subparsers:
    """Declare a command with sub-commands (``policy show``, ``audit verify``, ...)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


# --- arguments ---------------------------------------------------------------------------

def add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE",
                        help="the store: a folder (or, with that backend, a PostgreSQL URL)")


def add_key_options(parser: argparse.ArgumentParser) -> None:
    """The master key, from one source; never from the command line itself (it would be
    in the shell history and in every process listing)."""
    group = parser.add_argument_group("master key (one of)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--key-file", metavar="PATH",
                        help="a key file (mode 0600) written by 'biotemplate keygen'")
    source.add_argument("--key-env", metavar="VAR",
                        help="an environment variable holding the key text (removed from "
                             "the environment once read)")
    source.add_argument("--passphrase-file", metavar="PATH",
                        help="a file (mode 0600) whose first line is a passphrase "
                             "(Argon2id); needs --salt-file")
    group.add_argument("--salt-file", metavar="PATH",
                       help="the passphrase's salt file (created on first use; keep it "
                            "outside the store folder)")


def add_actor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", required=True,
                        help="who is acting (a person or service id), for the audit trail")


def add_reason(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--reason", required=required,
                        help="why (a case or request number), for the audit trail")


def duration(text: str) -> timedelta:
    """An argparse type: a policy duration such as ``30d`` or ``1d12h``."""
    try:
        return parse_duration(text)
    except InvalidPolicy as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def aware_time(text: str) -> datetime:
    """An argparse type: an ISO 8601 time with a UTC offset (``2026-11-26T09:00Z``)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise argparse.ArgumentTypeError("expected an ISO 8601 time with its UTC offset, "
                                         "e.g. 2026-11-26T09:00:00+00:00")
    return moment


def subject_id(text: str) -> str:
    """An argparse type: a subject id, checked here so that a bad one is a usage error
    whose message does not repeat it."""
    try:
        return check_subject_id(text)
    except InvalidInput:
        raise argparse.ArgumentTypeError(f"not a valid subject id (1 to {MAX_SUBJECT_ID} "
                                         "characters of valid text)") from None


# --- keys and the store ------------------------------------------------------------------

def key_provider(args: argparse.Namespace) -> bt.KeyProvider:
    """The provider the key options name.

    Raises:
        UsageError: --passphrase-file without --salt-file (or --salt-file alone).
        KeyUnavailable: the passphrase file is unsafe, unreadable or not text.
    """
    if args.salt_file and not args.passphrase_file:
        raise UsageError("--salt-file goes with --passphrase-file")
    if args.key_file:
        return bt.FileKeyProvider(args.key_file)
    if args.key_env:
        return bt.EnvKeyProvider(args.key_env)
    if not args.salt_file:
        raise UsageError("--passphrase-file needs --salt-file (where the Argon2id salt is "
                         "kept; outside the store folder)")
    raw = read_private(Path(args.passphrase_file), "passphrase file")
    try:
        text = raw.decode("utf-8").splitlines()[0] if raw.strip() else ""
    except UnicodeDecodeError:
        raise KeyUnavailable(f"passphrase file {args.passphrase_file} is not UTF-8 "
                             "text") from None
    if not text:
        raise KeyUnavailable(f"passphrase file {args.passphrase_file} is empty")
    return bt.PassphraseKeyProvider(text, salt_file=args.salt_file)


@contextmanager
def opened(args: argparse.Namespace, *, read_only: bool = False,
           ) -> Iterator[bt.TemplateStore]:
    """The store named by ``args.store``, opened with the key options, closed after.

    A writable open takes the store's writer lock (a running service holding it makes
    this fail with ``StoreLocked``); ``read_only=True`` does not, writes nothing and
    decrypts no template (reports, stats, the policy in force)."""
    provider = key_provider(args)
    with progress_bar("rebuilding the index", sys.stderr, quiet=args.quiet) as bar:
        store = bt.TemplateStore.open(args.store, key_provider=provider, read_only=read_only,
                                      progress=None if read_only else bar)
    try:
        yield store
    finally:
        store.close()


# --- input files -------------------------------------------------------------------------

def read_array(path: str, option: str) -> np.ndarray[Any, Any]:
    """A numeric array from a ``.npy`` file (never a pickle: ``allow_pickle=False``).

    Raises:
        CliError: the file cannot be read or is not a numeric .npy array.
    """
    _check_size(path, option)
    try:
        array = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot read it ({_reason(exc)})") from None
    except ValueError:
        raise CliError(f"{option} {path}: not a .npy array of numbers (np.save writes "
                       "one; object arrays and pickles are refused)") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise CliError(f"{option} {path}: not a .npy array of numbers")
    return array


def read_subject_ids(path: str) -> list[str]:
    """One subject id per line (UTF-8); every line must hold one.

    Raises:
        CliError: unreadable, not UTF-8, or a line is not a valid subject id (the
            message names the line number, never its content).
    """
    _check_size(path, "--subject-ids")
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise CliError(f"--subject-ids {path}: cannot read it ({_reason(exc)})") from None
    except UnicodeDecodeError:
        raise CliError(f"--subject-ids {path}: not UTF-8 text") from None
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(check_subject_id(line))
        except InvalidInput:
            raise CliError(f"--subject-ids {path}: line {number} is not a valid subject id "
                           "(empty, too long, or not valid text)") from None
    return out


def read_text(path: str, option: str, limit: int = 1 << 20) -> str:
    """A small text file (a checkpoint, a policy).

    Raises:
        CliError: unreadable, too large or not UTF-8.
    """
    _check_size(path, option, limit)
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot read it ({_reason(exc)})") from None
    except UnicodeDecodeError:
        raise CliError(f"{option} {path}: not UTF-8 text") from None


def _check_size(path: str, option: str, limit: int = MAX_INPUT_BYTES) -> None:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot read it ({_reason(exc)})") from None
    if size > limit:
        raise CliError(f"{option} {path}: larger than {limit} bytes")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --- output ------------------------------------------------------------------------------

def jsonable(value: object) -> JSON:
    """Library results as JSON: dataclasses as objects, times as ISO 8601, durations in
    the policy spelling, bytes as hex. A template (a numpy array) is refused: only
    ``export`` prints templates, deliberately and in its own format."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return jsonable(value.item())
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return [jsonable(v) for v in sorted(value)]
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def when(moment: datetime | None) -> str:
    """A time for people: UTC, to the second."""
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
