"""The behaviour suites, again, on PostgreSQL: every contract test that needs nothing but a
store (the ``store`` fixture, here one in a fresh schema: tests/pg/conftest.py) and the
shared fixtures is collected here a second time, so PostgreSQL is not a second-class path.

Tests that edit or copy the store's files (tamper, crash, rollback, lock, backup) are
SQLite's: their PostgreSQL counterparts (a killed connection, a restored database, a stale
instance, roles) are in test_pg_store.py and test_instances.py.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # their helper modules

SUITES = ("tests.unit.test_store", "tests.unit.test_bad_input", "tests.unit.test_audit",
          "tests.unit.test_rotation", "tests.unit.test_policy",
          "tests.test_clock", "tests.unit.test_subject_keys", "tests.tamper.test_confirmation")
SHARED = frozenset({"store", "sstore", "gallery", "clock", "policy", "keys", "monkeypatch",
                    "request"})
FILE_BOUND = ("backup", "snapshot_file", "records_db", "sqlite")

collected: list[str] = []
for _suite in SUITES:
    _module = importlib.import_module(_suite)
    for _name, _test in sorted(vars(_module).items()):
        if not (_name.startswith("test_") and inspect.isfunction(_test)):
            continue
        _wants = set(inspect.signature(_test).parameters)
        if (_wants & {"store", "sstore"} and _wants <= SHARED
                and not any(w in _name for w in FILE_BOUND)
                and "SQLiteBackend" not in inspect.getsource(_test)):  # patches SQLite
            _alias = f"test_{_suite.rsplit('.', 1)[-1][5:]}__{_name[5:]}"
            globals()[_alias] = _test
            collected.append(_alias)
