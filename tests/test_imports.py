"""Import rules of the library, checked on the syntax tree (not with regexes):

- the crypto boundary: only ``biotemplate/sealing.py`` (and ``streaming.py``, the STREAM
  construction beside it) import ``nacl`` or ``cryptography``, and only ``hsm.py`` imports
  ``pkcs11`` (python-pkcs11: the token does the crypto there); no other module imports
  ``hmac``, calls a keyed or password hash from ``hashlib``, draws randomness for keys or
  nonces (``os.urandom``, ``secrets``), or spells a key-derivation label
  (``biotemplate/v1/...``): a security reviewer reads every key in one file;
- only ``biotemplate/index.py`` imports ``hnswlib``;
- nothing imports ``pickle`` (or its relatives): templates and keys are never pickled;
- nothing calls ``.save_index(``: hnswlib's serializer writes plaintext vectors to disk;
- python-pkcs11 is optional (the ``hsm`` extra): ``import biotemplate`` does not import it.

Imports count wherever they appear (module level, in functions, under TYPE_CHECKING or
try/except), and so do ``__import__("x")`` / ``importlib.import_module("x")`` with a
constant name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "biotemplate"
CRYPTO = {"nacl", "cryptography", "hmac", "secrets", "pkcs11"}
CRYPTO_ALLOWED = {"sealing.py", "streaming.py"}
PKCS11_ALLOWED = {"hsm.py"}  # and nothing else of CRYPTO
KEYED_HASHLIB = {"pbkdf2_hmac", "scrypt"}  # and any hashlib call with key=
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


def crypto_calls(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(what, line) of every crypto primitive used outside an import: ``os.urandom``,
    a keyed or password hash from ``hashlib``, a ``biotemplate/v1/`` key-derivation label."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            base = owner.id if isinstance(owner, ast.Name) else None
            if base == "os" and node.func.attr == "urandom":
                yield "os.urandom", node.lineno
            if base == "hashlib" and (node.func.attr in KEYED_HASHLIB
                                      or any(k.arg == "key" for k in node.keywords)):
                yield f"hashlib.{node.func.attr} (keyed)", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name == "urandom" for a in node.names):
            yield "from os import urandom", node.lineno
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
              and (b"biotemplate/v1/" if isinstance(node.value, bytes)
                   else "biotemplate/v1/") in node.value):
            yield "a key-derivation label", node.lineno


def test_the_package_is_where_we_look() -> None:
    names = {rel(p) for p in modules()}
    assert {"sealing.py", "streaming.py", "keys.py", "index.py", "store.py"} <= names
    assert any(n.startswith("backends/") for n in names)


def crypto_allowed(name: str, root: str) -> bool:
    return name in (PKCS11_ALLOWED if root == "pkcs11" else CRYPTO_ALLOWED)


def test_only_the_crypto_modules_import_crypto_libraries() -> None:
    offenders = [f"{name}:{line} imports {root}" for name, tree in parsed()
                 for root, line in imported_roots(tree)
                 if root in CRYPTO and not crypto_allowed(name, root)]
    assert not offenders, offenders
    hsm_tree = ast.parse((PACKAGE / "hsm.py").read_text(encoding="utf-8"))
    assert "pkcs11" in {root for root, _ in imported_roots(hsm_tree)}


@pytest.mark.parametrize(("name", "root", "allowed"), [
    ("hsm.py", "pkcs11", True), ("sealing.py", "pkcs11", False), ("keys.py", "pkcs11", False),
    ("hsm.py", "nacl", False), ("hsm.py", "cryptography", False), ("hsm.py", "hmac", False),
    ("sealing.py", "nacl", True),
])
def test_the_crypto_rule_keeps_pkcs11_in_hsm_and_hsm_off_the_rest(
        name: str, root: str, allowed: bool) -> None:
    assert root in CRYPTO and crypto_allowed(name, root) is allowed


def test_no_module_outside_the_crypto_boundary_uses_a_primitive() -> None:
    """Every key derivation, label, nonce and AEAD call is in sealing.py (streaming.py
    for snapshot frames): a reviewer who reads those two has read every key."""
    offenders = [f"{name}:{line} {what}" for name, tree in parsed()
                 for what, line in crypto_calls(tree) if name not in CRYPTO_ALLOWED]
    assert not offenders, offenders
    labels = [line for _, line in crypto_calls(ast.parse(
        (PACKAGE / "sealing.py").read_text(encoding="utf-8")))]
    assert labels, "sealing.py should hold the key-derivation labels"


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


def test_biotemplate_imports_without_python_pkcs11() -> None:
    """Nothing imports pkcs11 until an HSM provider is built, and building one without it
    says what to install."""
    code = ("import sys; sys.modules['pkcs11'] = None  # as if not installed\n"
            "import biotemplate as bt\n"
            "try:\n"
            "    bt.Pkcs11KeyProvider('x.so', token_label='T', key_label='k', pin='p',\n"
            "                         wrapped_key_file='w')\n"
            "except bt.KeyUnavailable as e:\n"
            "    print(e)\n")
    root = PACKAGE.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True)
    assert "pip install 'biotemplate[hsm]'" in out.stdout
    lazy = subprocess.run([sys.executable, "-c", "import sys, biotemplate; "
                           "print('pkcs11' in sys.modules)"], cwd=root, capture_output=True,
                          text=True, check=True)
    assert lazy.stdout.strip() == "False"


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


@pytest.mark.parametrize("source", [
    "import os\nn = os.urandom(24)", "from os import urandom",
    "import hashlib\nh = hashlib.blake2b(b'x', key=k)", "import hashlib\nhashlib.scrypt(p)",
    "info = b'biotemplate/v1/record'", "label = 'x biotemplate/v1/meta'",
])
def test_checker_finds_crypto_outside_the_boundary(source: str) -> None:
    assert list(crypto_calls(ast.parse(source)))


def test_checker_allows_plain_hashes() -> None:
    tree = ast.parse("import hashlib\nh = hashlib.sha256(b'x').digest()\n"
                     "f = hashlib.blake2b(b'x', digest_size=16)\n")
    assert not list(crypto_calls(tree))


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
