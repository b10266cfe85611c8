"""``biotemplate``: the command line, a thin layer over the public API.

Every command calls the library and prints its answer: text for a person, or JSON on
stdout with ``--json`` (on every command). ``--quiet`` prints nothing but errors; a long
operation draws a progress bar on stderr when stderr is a terminal. No logic lives here
that the library lacks: a report, a diff or an export is a library call first.

Exit codes: **0** done; **1** refused or failed (not found, wrong key, a policy refusal,
an integrity problem, an unreadable input file, an audit trail that does not verify);
**2** bad usage (unknown option, missing argument, malformed value). Errors are one line
on stderr, ``biotemplate: <ErrorClass>: <message>``, never a traceback, and never quote a
subject id, a key or a template. The master key comes from ``--key-file``,
``--key-env`` or ``--passphrase-file`` (with ``--salt-file``), never from the command line.

Commands (``biotemplate COMMAND --help`` for each)::

    keygen, rotate-key                                   cli/keys.py
    init, stats, backup, purge                           cli/lifecycle.py
    enroll, search, verify, export, erase, delete, hold  cli/records.py
    policy show|check|diff|apply                         cli/policy.py
    report retention                                     cli/report.py
    audit verify|checkpoint|export                       cli/audit.py
    evaluate, calibrate                                  cli/evaluate.py

Adding a command (e.g. ``evaluate``): write a module ``cli/<name>.py`` with a function
``register(subparsers)`` that declares its commands with :func:`.common.add_command`
(its parser gets ``--json`` and ``--quiet``; its handler takes the parsed arguments and
returns a :class:`.common.Reply`), and add the module to ``COMMAND_MODULES`` in
``cli/main.py``. For example::

    from .common import Reply, add_command, add_store, add_key_options, opened

    def register(subparsers):
        p = add_command(subparsers, "evaluate", help="...", handler=_evaluate)
        add_store(p)
        add_key_options(p)

    def _evaluate(args):
        with opened(args) as store:
            result = ...  # a library call
        return Reply(data=jsonable(result), text=f"...")

Raise :class:`.common.CliError` (exit 1) or :class:`.common.UsageError` (exit 2) for
problems the library does not already raise as a ``BiotemplateError``.
"""

from .main import main

__all__ = ["main"]
