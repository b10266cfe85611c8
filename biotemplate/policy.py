"""Retention policy: which purposes exist, how long their records may live, how they match.

The policy is written by a compliance engineer, usually as TOML, and read with
:meth:`RetentionPolicy.from_toml`. It is validated strictly: an unknown key, a typo in a
duration or a threshold out of range is an :class:`~biotemplate.errors.InvalidPolicy`
whose message names the field path (``purposes.watchlist.match_threshold``), because a
compliance file that is silently half-ignored is worse than one that fails to load.

Example::

    epoch = "1d"              # crypto-shredding granularity
    [purposes.border-verification]
    description = "1:1 traveller verification at the gate"
    max_retention = "12h"
    default_retention = "12h"
    modes = ["verification"]
    match_threshold = 0.60
    [purposes.watchlist]
    max_retention = "3y"      # e.g. BIPA's 3-year outer limit
    modes = ["identification", "investigation"]
    match_threshold = 0.55
    max_candidates = 20
    allowed_sources = ["enrolment-desk", "case-file"]   # prefix match

``match_threshold`` is a cosine similarity and belongs to the face model that made the
templates (0.55 suits the synthetic demo data; dlib's 128-d embeddings need about 0.92):
measure it with ``TemplateStore.calibrate`` or :mod:`biotemplate.evaluation` (README,
"Choosing a threshold").

Durations are ``<positive integer><unit>`` parts, largest unit first: ``s``, ``m``
(minutes, never months), ``h``, ``d``, ``w`` and ``y`` (365 days, so the limit never
depends on leap years), e.g. ``"90m"``, ``"30d"``, ``"1d12h"``.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Final

from biotemplate.errors import InvalidInput, InvalidPolicy, PolicyViolation
from biotemplate.validation import MAX_SHOWN, shown

__all__ = ["MODES", "Purpose", "RetentionPolicy", "format_duration", "parse_duration"]

MODES: Final = ("verification", "identification", "investigation")

_UNITS: Final = (("y", 365 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60),
                 ("s", 1))
# One optional part per unit, largest first: order and "at most once" live in the grammar.
_DURATION_RE: Final = re.compile("".join(f"(?:([1-9][0-9]*){unit})?" for unit, _ in _UNITS))
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MIN_EPOCH: Final = timedelta(minutes=1)
_MAX_EPOCH: Final = timedelta(days=366)
_MAX_CANDIDATES: Final = 10_000
_TOP_KEYS: Final = frozenset({"epoch", "purposes"})
_PURPOSE_KEYS: Final = frozenset({"description", "max_retention", "default_retention", "modes",
                                  "match_threshold", "max_candidates", "allowed_sources"})
_PURPOSE_REQUIRED: Final = frozenset({"max_retention", "modes", "match_threshold"})


def parse_duration(text: str) -> timedelta:
    """Parse a policy duration such as ``"30d"`` or ``"1d12h"``.

    The grammar is deliberately narrow (no signs, decimals, spaces, zero parts or repeated
    units) so that a typo in a compliance file fails loudly instead of meaning something else.

    Raises:
        InvalidPolicy: the text is not a positive duration in this grammar; names the text.
    """
    match = _DURATION_RE.fullmatch(text) if isinstance(text, str) and len(text) <= 64 else None
    if match is None or not text:
        raise InvalidPolicy(f"invalid duration {shown(text)}: expected <positive integer><unit> "
                            "parts, largest unit first, with units s, m (minutes), h, d, w, "
                            "y (365 days), e.g. '12h', '30d', '1d12h'")
    seconds = sum(int(n) * size for n, (_, size) in zip(match.groups(), _UNITS, strict=True) if n)
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise InvalidPolicy(f"invalid duration {shown(text)}: too long") from None


def format_duration(td: timedelta) -> str:
    """Spell a duration in the canonical form used to persist and print policies.

    The canonical form is the shortest spelling among the largest-unit-first decompositions
    that either skip a unit or take as many of it as fit (ties: fewer parts, then larger
    units), so ``30d`` stays ``"30d"`` rather than ``"4w2d"`` and ``7d`` becomes ``"1w"``.
    It depends only on the value, so equal policies always serialise identically.

    Raises:
        InvalidInput: ``td`` is not a positive whole number of seconds.
    """
    if not isinstance(td, timedelta) or td <= timedelta(0) or td.microseconds:
        raise InvalidInput(f"cannot format {_shown_span(td)}: need a positive whole number "
                           "of seconds")
    best = min(_spellings(td.days * 86400 + td.seconds, 0),
               key=lambda parts: (sum(map(len, parts)), len(parts)))  # min keeps the first tie
    return "".join(best)


def _spellings(seconds: int, index: int) -> Iterator[tuple[str, ...]]:
    """Yield the candidate spellings of ``seconds`` using units from ``_UNITS[index:]``."""
    if seconds == 0:
        yield ()
        return
    if index == len(_UNITS):
        return
    unit, size = _UNITS[index]
    count, rest = divmod(seconds, size)
    if count:
        for tail in _spellings(rest, index + 1):
            yield (f"{count}{unit}", *tail)
    yield from _spellings(seconds, index + 1)


def _name(key: object) -> str:
    """A field or purpose name as a message's field path may spell it (bounded)."""
    return key if isinstance(key, str) and len(key) <= MAX_SHOWN else shown(key)


def _shown_span(value: object) -> str:
    """A duration as a message may quote it: a timedelta in full, anything else bounded."""
    return repr(value) if isinstance(value, timedelta) else shown(value)


def _show(td: timedelta) -> str:
    """Format for messages: canonical when possible, never raising."""
    return format_duration(td) if td > timedelta(0) and not td.microseconds else str(td)


def _check_span(value: object, path: str) -> timedelta:
    """Check a typed duration field: persisted as text, so positive whole seconds only."""
    if not isinstance(value, timedelta) or value <= timedelta(0) or value.microseconds:
        raise InvalidPolicy(f"{path}: must be a positive duration in whole seconds, "
                            f"got {_shown_span(value)}")
    return value


def _duration(value: object, path: str) -> timedelta:
    """Read a raw duration field (string, or a timedelta when built in Python)."""
    if isinstance(value, timedelta):
        return _check_span(value, path)
    if not isinstance(value, str):
        raise InvalidPolicy(f"{path}: must be a duration string such as '30d', "
                            f"got {shown(value)}")
    try:
        return parse_duration(value)
    except InvalidPolicy as exc:
        raise InvalidPolicy(f"{path}: {exc}") from None


def _modes(value: object, path: str) -> frozenset[str]:
    """Normalise ``modes`` to a frozenset, refusing anything a reader could misread."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or not value:
        raise InvalidPolicy(f"{path}: must be a non-empty list drawn from {list(MODES)}")
    for mode in value:
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidPolicy(f"{path}: unknown mode {shown(mode)}; allowed: {list(MODES)}")
    if len(set(value)) != len(value):
        raise InvalidPolicy(f"{path}: lists a mode more than once")
    return frozenset(value)


def _check_keys(raw: Mapping[Any, Any], allowed: frozenset[str], required: frozenset[str],
                path: str) -> None:
    """Refuse unknown keys (with a did-you-mean) and missing required ones."""
    prefix = f"{path}." if path else ""
    for key in raw:
        if not isinstance(key, str) or key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1) if isinstance(
                key, str) and len(key) <= 64 else []
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {sorted(allowed)}"
            raise InvalidPolicy(f"{prefix}{_name(key)}: unknown key; {hint}")
    for key in sorted(required.difference(raw)):
        raise InvalidPolicy(f"{prefix}{key}: required key is missing")


@dataclass(frozen=True, slots=True)
class Purpose:
    """One purpose a record may be enrolled for, with its retention limit and matching rules.

    Fields are validated on construction (the same checks as the policy file), so a
    ``Purpose`` that exists is a valid one.

    Raises:
        InvalidPolicy: a field is out of range; the message names ``purposes.<name>.<field>``.
    """

    name: str
    max_retention: timedelta
    modes: frozenset[str]
    match_threshold: float
    default_retention: timedelta | None = None
    max_candidates: int = 50
    description: str = ""
    allowed_sources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise InvalidPolicy(f"purposes.{_name(self.name)}: a purpose name must match "
                                f"{_NAME_RE.pattern} (lower case, digits, '.', '_', '-')")
        path = f"purposes.{self.name}"
        _check_span(self.max_retention, f"{path}.max_retention")
        if self.default_retention is not None:
            _check_span(self.default_retention, f"{path}.default_retention")
            if self.default_retention > self.max_retention:
                raise InvalidPolicy(f"{path}.default_retention: {_show(self.default_retention)} "
                                    f"exceeds max_retention {_show(self.max_retention)}")
        object.__setattr__(self, "modes", _modes(self.modes, f"{path}.modes"))
        threshold: object = self.match_threshold
        if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                or not math.isfinite(threshold) or not -1.0 <= float(threshold) <= 1.0):
            raise InvalidPolicy(f"{path}.match_threshold: must be a number in [-1, 1] "
                                f"(cosine similarity), got {shown(threshold)}")
        object.__setattr__(self, "match_threshold", float(threshold))
        cap: object = self.max_candidates
        if (isinstance(cap, bool) or not isinstance(cap, numbers.Integral)
                or not 1 <= int(cap) <= _MAX_CANDIDATES):
            raise InvalidPolicy(f"{path}.max_candidates: must be an integer in "
                                f"[1, {_MAX_CANDIDATES}], got {shown(cap)}")
        object.__setattr__(self, "max_candidates", int(cap))
        if not isinstance(self.description, str):
            raise InvalidPolicy(f"{path}.description: must be a string")
        sources: object = self.allowed_sources
        if sources is not None:
            if (not isinstance(sources, (list, tuple)) or not sources
                    or not all(isinstance(s, str) and s for s in sources)):
                raise InvalidPolicy(f"{path}.allowed_sources: must be a non-empty list of "
                                    "non-empty strings (source prefixes)")
            object.__setattr__(self, "allowed_sources", tuple(sources))

    def allows_mode(self, mode: str) -> bool:
        """Whether searches/verifications in ``mode`` may run under this purpose."""
        return mode in self.modes

    def source_allowed(self, source: str | None) -> bool:
        """Whether a record from ``source`` may be enrolled for this purpose.

        Without an allow-list any source (even none) is accepted. With one, the source must
        start with one of its prefixes, and an unnamed source is refused: a purpose that
        restricts provenance cannot accept records of unknown provenance. Prefixes match
        literally, so end them with a separator when a longer name must not match.
        """
        if self.allowed_sources is None:
            return True
        return isinstance(source, str) and source.startswith(self.allowed_sources)

    def to_dict(self) -> dict[str, Any]:
        """The policy-file table for this purpose (optional fields only when set)."""
        out = {
            "description": self.description or None,
            "max_retention": format_duration(self.max_retention),
            "default_retention": (None if self.default_retention is None
                                  else format_duration(self.default_retention)),
            "modes": [mode for mode in MODES if mode in self.modes],
            "match_threshold": self.match_threshold,
            "max_candidates": self.max_candidates,
            "allowed_sources": None if self.allowed_sources is None else list(self.allowed_sources),
        }
        return {key: value for key, value in out.items() if value is not None}  # TOML has no null


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """The whole policy: the epoch length and the purposes, immutable once built.

    ``purposes`` is stored as a read-only mapping; equality ignores purpose order.

    Raises:
        InvalidPolicy: the epoch is outside [1m, 366d], or ``purposes`` is empty or keyed
            by a name other than the purpose's own.
    """

    epoch: timedelta
    purposes: Mapping[str, Purpose]

    def __post_init__(self) -> None:
        _check_span(self.epoch, "epoch")
        if not _MIN_EPOCH <= self.epoch <= _MAX_EPOCH:
            raise InvalidPolicy(f"epoch: must be between 1m and 366d, got {_show(self.epoch)}")
        if not isinstance(self.purposes, Mapping) or not self.purposes:
            raise InvalidPolicy("purposes: must be a non-empty table of purposes")
        for name, purpose in self.purposes.items():
            if not isinstance(purpose, Purpose) or purpose.name != name:
                raise InvalidPolicy(f"purposes.{_name(name)}: must be a Purpose named "
                                    f"{shown(name)}")
        object.__setattr__(self, "purposes", MappingProxyType(dict(self.purposes)))

    def __hash__(self) -> int:
        return hash((self.epoch, frozenset(self.purposes.values())))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy cannot be copied or pickled; rebuild from the canonical dict.
        return (RetentionPolicy.from_dict, (self.to_dict(),))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetentionPolicy:
        """Build and validate a policy from the structure of the TOML file.

        Raises:
            InvalidPolicy: any field is unknown, missing, mistyped or out of range; the
                message starts with the field path.
        """
        if not isinstance(d, Mapping):
            raise InvalidPolicy("policy: must be a table with 'epoch' and 'purposes'")
        _check_keys(d, _TOP_KEYS, _TOP_KEYS, "")
        raw_purposes = d["purposes"]
        if not isinstance(raw_purposes, Mapping) or not raw_purposes:
            raise InvalidPolicy("purposes: must be a non-empty table of purposes")
        purposes: dict[str, Purpose] = {}
        for name, raw in raw_purposes.items():
            path = f"purposes.{_name(name)}"
            if not isinstance(raw, Mapping):
                raise InvalidPolicy(f"{path}: must be a table")
            _check_keys(raw, _PURPOSE_KEYS, _PURPOSE_REQUIRED, path)
            default = raw.get("default_retention")
            purposes[name] = Purpose(
                name=name,
                max_retention=_duration(raw["max_retention"], f"{path}.max_retention"),
                modes=raw["modes"],
                match_threshold=raw["match_threshold"],
                default_retention=(None if default is None
                                   else _duration(default, f"{path}.default_retention")),
                max_candidates=raw.get("max_candidates", 50),
                description=raw.get("description", ""),
                allowed_sources=raw.get("allowed_sources"),
            )
        return cls(epoch=_duration(d["epoch"], "epoch"), purposes=purposes)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> RetentionPolicy:
        """Read and validate a policy file.

        Raises:
            InvalidPolicy: the file cannot be read, is not TOML, or fails validation; the
                message starts with the file path.
        """
        where = os.fspath(path)
        try:
            with open(where, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise InvalidPolicy(f"{where}: cannot read policy file: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidPolicy(f"{where}: not valid TOML: {exc}") from exc
        try:
            return cls.from_dict(data)
        except InvalidPolicy as exc:
            raise InvalidPolicy(f"{where}: {exc}") from None

    @classmethod
    def from_toml_string(cls, text: str) -> RetentionPolicy:
        """Validate a policy given as TOML text (e.g. from a secret store or a test).

        Raises:
            InvalidPolicy: the text is not TOML or fails validation.
        """
        if not isinstance(text, str):
            raise InvalidPolicy(f"policy TOML must be str, got {type(text).__name__}")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidPolicy(f"policy: not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The canonical policy structure; ``from_dict`` rebuilds an equal policy from it."""
        return {"epoch": format_duration(self.epoch),
                "purposes": {name: p.to_dict() for name, p in self.purposes.items()}}

    def to_toml(self) -> str:
        """The policy as a TOML file that :meth:`from_toml_string` reads back equal (the
        canonical structure of :meth:`to_dict`; no comments: the file is regenerated)."""
        lines = [f"epoch = {_toml_value(format_duration(self.epoch))}"]
        for name, purpose in self.purposes.items():
            key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else _toml_value(name)
            lines += ["", f"[purposes.{key}]"]
            lines += [f"{field} = {_toml_value(value)}"
                      for field, value in purpose.to_dict().items()]
        return "\n".join(lines) + "\n"

    def purpose(self, name: str) -> Purpose:
        """Look up a purpose by name.

        Raises:
            PolicyViolation: the policy does not define ``name``.
        """
        try:
            return self.purposes[name]
        except (KeyError, TypeError):
            # never echo a template passed by mistake, nor a long string in full
            raise PolicyViolation(f"unknown purpose {shown(name)}; the policy defines: "
                                  f"{', '.join(sorted(self.purposes))}") from None

    def resolve_ttl(self, purposes: Sequence[str], ttl: timedelta | None) -> timedelta:
        """Return the retention a record enrolled for ``purposes`` gets, never clamping.

        Without ``ttl`` the smallest ``default_retention`` among the purposes applies. Either
        way the result must fit the smallest ``max_retention``: a record carries every limit
        of every purpose it serves, and shortening a caller's ttl silently would hide a bug.

        Raises:
            InvalidInput: ``purposes`` is not a list/tuple of str (a bare str is refused) or
                repeats a name; ``ttl`` is not a positive timedelta.
            PolicyViolation: ``purposes`` is empty or names an undefined purpose; no ttl and
                no default; the ttl exceeds a purpose's ``max_retention``.
        """
        chosen = self._chosen(purposes)
        source = "ttl"
        if ttl is None:
            defaults = [(p.default_retention, p.name) for p in chosen
                        if p.default_retention is not None]
            if not defaults:
                raise PolicyViolation(f"ttl is required: no purpose among {list(purposes)} "
                                      "defines default_retention")
            ttl, owner = min(defaults)
            source = f"default_retention of purpose {owner!r}"
        elif not isinstance(ttl, timedelta):
            raise InvalidInput(f"ttl must be a datetime.timedelta, got {type(ttl).__name__}")
        elif ttl <= timedelta(0):
            raise InvalidInput(f"ttl must be positive, got {ttl}")
        limit = min(chosen, key=lambda p: (p.max_retention, p.name))
        if ttl > limit.max_retention:
            raise PolicyViolation(f"{source} {_show(ttl)} exceeds max_retention "
                                  f"{_show(limit.max_retention)} of purpose {limit.name!r}; "
                                  "nothing is clamped: pass a shorter ttl")
        return ttl

    def _chosen(self, purposes: Sequence[str]) -> list[Purpose]:
        """Validate the shape of a ``purposes`` argument and look each name up."""
        if isinstance(purposes, str) or not isinstance(purposes, (list, tuple)):
            hint = (f"e.g. [{purposes[:64]!r}], not a bare string"
                    if isinstance(purposes, str) else f"got {type(purposes).__name__}")
            raise InvalidInput(f"purposes must be a list of purpose names, {hint}")
        if not purposes:
            raise PolicyViolation("purposes must name at least one purpose; the policy "
                                  f"defines: {', '.join(sorted(self.purposes))}")
        if not all(isinstance(name, str) for name in purposes):
            kinds = sorted({type(n).__name__ for n in purposes if not isinstance(n, str)})
            raise InvalidInput(f"purposes must be strings, got {', '.join(kinds)}")
        repeated = sorted({name for name in purposes if purposes.count(name) > 1})
        if repeated:
            raise InvalidInput(f"purposes lists {', '.join(map(shown, repeated[:4]))} "
                               "more than once")
        return [self.purpose(name) for name in purposes]


def _toml_value(value: object) -> str:
    """A TOML value of the policy's types: str, int, float, bool, list of str."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are TOML's (without surrogates, since non-ASCII text is
        # written as it is); DEL must be escaped in TOML and is not in JSON.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise InvalidInput(f"a policy holds no {type(value).__name__}")
