"""Input validation: templates, identifiers, free text and metadata from callers.

Validation happens here, once, before anything touches keys or disk: a template must be a
1-D array-like of the store's dimension, finite (also after the cast to float32) and of
non-zero norm. The error says what to fix and never echoes an input value: where a message
must name what it got, :func:`shown` gives a bounded, safe form (a short prefix of a str,
a plain number, else only the type's name: never the repr of an array, list or object).

Subject ids are normalised to Unicode NFC where they enter (:func:`check_subject_id`),
before a keyed subject ref is computed from them: "José" typed as one code point or as "e"
plus a combining accent names the same subject.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from .errors import InvalidInput, InvalidTemplate

MAX_SUBJECT_ID = 256
MAX_TEXT = 1024
MAX_SHOWN = 80  # characters of a caller's string an error message may quote
MAX_METADATA_BYTES = 16 * 1024
UNPACK_LIMITS = {"max_str_len": 1 << 20, "max_bin_len": 1 << 20,
                  "max_array_len": 1 << 16, "max_map_len": 1 << 12}


def _shape_error(dim: int, got: str) -> InvalidTemplate:
    return InvalidTemplate(f"expected a 1-D template of length {dim}, got {got}")


_CHUNK = 8192  # rows per float64 temporary: validation never doubles a batch in memory


def _row_norms(rows: NDArray[np.float32]) -> NDArray[np.float64]:
    """L2 norms computed in float64 (float32 squares overflow near 1e19), chunk by chunk."""
    norms = np.empty(rows.shape[0], dtype=np.float64)
    for i in range(0, rows.shape[0], _CHUNK):
        norms[i : i + _CHUNK] = np.linalg.norm(rows[i : i + _CHUNK].astype(np.float64), axis=1)
    return norms


def _as_float_array(template: object, dim: int) -> NDArray[Any]:
    if isinstance(template, str | bytes | bytearray | Mapping) or template is None:
        raise _shape_error(dim, type(template).__name__)
    try:
        arr = np.asarray(template)
    except (TypeError, ValueError):
        raise _shape_error(dim, "an object that is not an array of numbers") from None
    if arr.dtype.kind not in "iuf":  # bool, complex, object, strings: not a template
        raise InvalidTemplate(f"template values must be real numbers, got dtype {arr.dtype}")
    return arr


def _check_rows(arr: NDArray[Any],
                row_label: Callable[[int], str]) -> NDArray[np.float32]:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused next
        out: NDArray[np.float32] = arr.astype(np.float32)
    finite = np.isfinite(out).all(axis=-1)
    if not finite.all():
        raise InvalidTemplate(f"{row_label(int(np.argmin(finite)))}contains NaN or infinity "
                              "(or a value too large for float32)")
    norms = _row_norms(out)
    if not (norms > 1e-12).all():
        bad = int(np.argmin(norms > 1e-12))
        raise InvalidTemplate(f"{row_label(bad)}is a zero vector (no direction to compare)")
    return out


def as_template(template: object, dim: int) -> NDArray[np.float32]:
    """Validate one template and return it as a new float32 array of shape (dim,).

    Raises:
        InvalidTemplate: wrong type, shape or length; NaN/inf; zero norm.
    """
    arr = _one_row(template, dim)
    one: NDArray[np.float32] = _check_rows(arr[None, :], lambda _i: "the template ")[0]
    return one.copy()


def _one_row(template: object, dim: int) -> NDArray[Any]:
    """A real-valued array of shape (dim,), not yet checked for finiteness or norm."""
    arr = _as_float_array(template, dim)
    if arr.ndim != 1 or arr.shape[0] != dim:
        hint = "; use enroll_many for a batch" if arr.ndim == 2 else ""
        raise _shape_error(dim, f"shape {arr.shape}{hint}")
    return arr


def unit_template(template: object, dim: int) -> NDArray[np.float32]:
    """:func:`as_template` then :func:`normalised`, in one pass for the one-probe path of
    a search: the same checks, the same float64 norm, computed once.

    Raises:
        InvalidTemplate: wrong type, shape or length; NaN/inf; zero norm.
    """
    arr = _one_row(template, dim)
    if arr.dtype == np.float32:  # the common case: no cast can overflow, no errstate
        one = arr.astype(np.float64)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused
            one = arr.astype(np.float32).astype(np.float64)
    # One dot product checks both: a NaN or infinity makes it non-finite, and float32
    # values cannot overflow a float64 sum of squares (dim <= 65536).
    square = float(one @ one)
    if not math.isfinite(square):
        raise InvalidTemplate("the template contains NaN or infinity "
                              "(or a value too large for float32)")
    if not square > 1e-24:
        raise InvalidTemplate("the template is a zero vector (no direction to compare)")
    one /= math.sqrt(square)  # as normalised() does, bit for bit
    out: NDArray[np.float32] = one.astype(np.float32)
    return out


def as_templates(templates: object, dim: int) -> NDArray[np.float32]:
    """Validate a batch, shape (n, dim) with n >= 1; the error names the first bad row."""
    arr = _as_float_array(templates, dim)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise InvalidTemplate(f"expected a 2-D batch of shape (n >= 1, {dim}), got {arr.shape}")
    return _check_rows(arr, lambda i: f"row {i} ")


def normalised(vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """L2-normalise rows (cosine similarity = inner product of unit vectors)."""
    v = np.asarray(vectors, dtype=np.float32)
    out = np.empty(v.shape, dtype=np.float32)
    rows, flat = out.reshape(-1, v.shape[-1]), v.reshape(-1, v.shape[-1])
    for i in range(0, rows.shape[0], _CHUNK):
        chunk = flat[i : i + _CHUNK].astype(np.float64)
        rows[i : i + _CHUNK] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def check_text(value: object, name: str, *, optional: bool = False,
               limit: int = MAX_TEXT) -> str | None:
    """Identifiers and free text: str, non-empty, bounded (huge strings are a DoS)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise InvalidInput(f"{name} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} must be valid Unicode (no lone surrogates)") from None
    return value


def check_subject_id(value: object, name: str = "subject_id") -> str:
    """A subject id as the store keys it: :func:`check_text`, then Unicode NFC.

    Every call that takes a subject id (enrol, verify, export, erase, holds) goes through
    here, so canonically equivalent spellings reach the same records.

    Raises:
        InvalidInput: not a non-empty str of at most ``MAX_SUBJECT_ID`` characters (also
            after normalisation), or not valid Unicode.
    """
    text = unicodedata.normalize("NFC", str(check_text(value, name, limit=MAX_SUBJECT_ID)))
    if len(text) > MAX_SUBJECT_ID:
        raise InvalidInput(f"{name} is longer than {MAX_SUBJECT_ID} characters")
    return text


def shown(value: object) -> str:
    """A caller's value as an error message may quote it: the repr of a str cut to
    ``MAX_SHOWN`` characters, a Python int, float, bool or None, else only its type's name
    in angle brackets, e.g. ``<ndarray>`` (a template passed by mistake must not be echoed,
    whole or in part)."""
    if isinstance(value, str):  # repr escapes what a terminal or log could misread
        return repr(value[:MAX_SHOWN]) + ("..." if len(value) > MAX_SHOWN else "")
    if value is None or type(value) in (bool, float):
        return repr(value)
    if isinstance(value, int) and type(value) is int and abs(value) < 10**18:
        return repr(value)
    return f"<{type(value).__name__[:MAX_SHOWN]}>"


_RECORD_ID = re.compile(r"[0-9a-f]{32}")


def loggable_record_id(value: object) -> str:
    """A record id as it may appear in the audit or an error: a well-formed id verbatim,
    anything else never (a caller may pass a subject id where a record id belongs)."""
    if isinstance(value, str) and _RECORD_ID.fullmatch(value):
        return value
    return "<malformed>"


def check_metadata(metadata: object) -> dict[str, Any]:
    """Metadata: a str-keyed mapping of msgpack-able primitives, at most 16 KiB packed."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata must be a mapping with string keys")
    try:
        packed = msgpack.packb(dict(metadata), use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput("metadata values must be str, int, float, bool, None, "
                           "bytes, lists or mappings of those") from None
    if len(packed) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:  # what we seal must decode under the limits we read it back with
        msgpack.unpackb(packed, raw=False, **UNPACK_LIMITS)
    except (ValueError, TypeError, msgpack.ExtraData):
        raise InvalidInput("metadata keys must be strings at every level, "
                           "with at most 4096 entries per mapping") from None
    if any(isinstance(v, float) and not math.isfinite(v) for v in metadata.values()):
        raise InvalidInput("metadata floats must be finite")
    return dict(metadata)
