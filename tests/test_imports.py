"""Import rules of the library, checked on the syntax tree (not with regexes):

- only ``biotemplate/sealing.py`` and ``biotemplate/keys.py`` import ``nacl`` or
  ``cryptography`` (the crypto a security reviewer must read lives in two files);
- only ``biotemplate/index.py`` imports ``hnswlib``;
- nothing imports ``pickle`` (or its relatives): templates and keys are never pickled;
- nothing calls ``.save_index(``: hnswlib's serializer writes plaintext vectors to disk.

Imports count wherever they appear (module level, in functions, under TYPE_CHECKING or
try/except), and so do ``__import__("x")`` / ``importlib.import_module("x")`` with a
constant name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "biotemplate"
CRYPTO = {"nacl", "cryptography"}
CRYPTO_ALLOWED = {"sealing.py", "keys.py"}
HNSW_ALLOWED = {"index.py"}
PICKLE_LIKE = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imported_roots(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(top-level package, line) of every absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and node.args:
            func, arg = node.func, node.args[0]
            name = (func.id if isinstance(func, ast.Name)
                    else func.attr if isinstance(func, ast.Attribute) else None)
            if (name in ("__import__", "import_module") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)):
                yield arg.value.split(".")[0], node.lineno


def save_index_calls(tree: ast.AST) -> Iterator[int]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr == "save_index":
            yield node.lineno
        elif (isinstance(node.func, ast.Name) and node.func.id == "getattr"
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value == "save_index"):
            yield node.lineno


def parsed() -> Iterator[tuple[str, ast.AST]]:
    for path in modules():
        yield rel(path), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_package_is_where_we_look() -> None:
    names = {rel(p) for p in modules()}
    assert {"sealing.py", "keys.py", "index.py", "store.py"} <= names
    assert any(n.startswith("backends/") for n in names)


def test_only_sealing_and_keys_import_crypto_libraries() -> None:
    offenders = [f"{name}:{line} imports {root}" for name, tree in parsed()
                 for root, line in imported_roots(tree)
                 if root in CRYPTO and name not in CRYPTO_ALLOWED]
    assert not offenders, offenders


def test_only_index_imports_hnswlib() -> None:
    offenders = [f"{name}:{line}" for name, tree in parsed()
                 for root, line in imported_roots(tree)
                 if root == "hnswlib" and name not in HNSW_ALLOWED]
    assert not offenders, offenders
    index_tree = ast.parse((PACKAGE / "index.py").read_text(encoding="utf-8"))
    assert "hnswlib" in {root for root, _ in imported_roots(index_tree)}


def test_nothing_imports_pickle() -> None:
    offenders = [f"{name}:{line} imports {root}" for name, tree in parsed()
                 for root, line in imported_roots(tree) if root in PICKLE_LIKE]
    assert not offenders, offenders


def test_nothing_calls_save_index() -> None:
    offenders = [f"{name}:{line}" for name, tree in parsed() for line in save_index_calls(tree)]
    assert not offenders, offenders


# The checker itself must catch what it is meant to catch.
@pytest.mark.parametrize(("source", "root"), [
    ("import pickle", "pickle"),
    ("import nacl.secret as s", "nacl"),
    ("from cryptography.hazmat import x", "cryptography"),
    ("def f():\n    import hnswlib", "hnswlib"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pickle", "pickle"),
    ("try:\n    import dill\nexcept ImportError:\n    pass", "dill"),
    ("m = __import__('pickle')", "pickle"),
    ("import importlib\nm = importlib.import_module('hnswlib')", "hnswlib"),
])
def test_checker_finds_imports(source: str, root: str) -> None:
    assert root in {r for r, _ in imported_roots(ast.parse(source))}


def test_checker_ignores_relative_imports_and_strings() -> None:
    tree = ast.parse("from . import sealing\nfrom .pickle import x\ns = 'import pickle'\n")
    assert {r for r, _ in imported_roots(tree)} == set()


@pytest.mark.parametrize("source", ["idx.save_index('f.bin')", "self._sub.index.save_index(p)",
                                    "getattr(idx, 'save_index')(p)"])
def test_checker_finds_save_index(source: str) -> None:
    assert list(save_index_calls(ast.parse(source)))


def test_checker_ignores_save_index_in_text() -> None:
    tree = ast.parse("# idx.save_index(p)\ns = 'x.save_index(p)'\nsave_index = 1\n")
    assert not list(save_index_calls(tree))
