"""The ``biotemplate`` parser, the dispatch to a command, and errors to exit codes.

``main`` is the one place where exceptions become exit codes and one-line messages
(``cli/__init__.py`` lists the codes): every ``BiotemplateError`` is a refusal or a
failure the user can act on (1), ``CliError`` too (1), ``UsageError`` and argparse's own
errors are bad usage (2). Anything else is a bug: its type is named, its message (which
could hold data) is not, and no traceback is printed unless ``BIOTEMPLATE_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import biotemplate as bt

from . import audit, evaluate, keys, lifecycle, policy, records, report
from .common import CliError, Handler, Reply, jsonable

COMMAND_MODULES = (keys, lifecycle, records, policy, report, audit, evaluate)
"""Each has ``register(subparsers)``; add a module here to add its commands."""


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line (sub-command parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="biotemplate",
                    description="A privacy-preserving store for face templates: enrol, "
                                "search, retention, legal holds, audit. Exit codes: 0 done, "
                                "1 refused or failed, 2 bad usage.")
    parser.add_argument("--version", action="version", version=f"biotemplate {bt.__version__}")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the answer as JSON on stdout, for scripts")
    parser.add_argument("--quiet", "-q", action="store_true", default=False,
                        help="print nothing but errors (and no progress bar)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (0, 1 or 2)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, printed)
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    try:
        reply = handler(args)
    except CliError as exc:
        return _fail(args, exc.exit_code, "error", str(exc))
    except bt.BiotemplateError as exc:
        return _fail(args, 1, type(exc).__name__, str(exc))
    except KeyboardInterrupt:
        return _fail(args, 130, "interrupted", "stopped by the user")
    except BrokenPipeError:
        return _closed_pipe()
    except Exception as exc:
        if os.environ.get("BIOTEMPLATE_DEBUG") == "1":
            raise
        return _fail(args, 1, "internal error",
                     f"{type(exc).__name__} (a bug: please report it with the command; "
                     "BIOTEMPLATE_DEBUG=1 shows where)")
    if reply is None:
        return 0
    try:
        _emit(args, reply)
    except BrokenPipeError:
        return _closed_pipe()
    return reply.code


def _emit(args: argparse.Namespace, reply: Reply) -> None:
    if args.json:
        print(json.dumps(reply.data, sort_keys=True, ensure_ascii=False))
    elif not args.quiet and reply.text:
        print(reply.text)
    if reply.error:
        print(f"biotemplate: {reply.error}", file=sys.stderr)


def _fail(args: argparse.Namespace, code: int, kind: str, message: str) -> int:
    """One line on stderr; with --json, the same as an object on stdout."""
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"biotemplate: {kind}: {line}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(jsonable({"error": {"type": kind, "message": line, "exit": code}})))
    return code


def _closed_pipe() -> int:
    """The reader went away (``| head``): stop quietly, without a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 1
