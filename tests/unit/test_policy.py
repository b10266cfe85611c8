"""Unit tests for biotemplate.policy: durations, validation, TTL resolution, helpers."""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from biotemplate.errors import InvalidInput, InvalidPolicy, PolicyViolation
from biotemplate.policy import (
    MODES,
    Purpose,
    RetentionPolicy,
    format_duration,
    parse_duration,
)

DESIGN_TOML = """
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
allowed_sources = ["enrolment-desk", "case-file"]   # optional allow-list (prefix match)
"""

DAY = timedelta(days=1)


def base_dict() -> dict[str, Any]:
    return {
        "epoch": "1d",
        "purposes": {
            "border-verification": {
                "description": "1:1 traveller verification at the gate",
                "max_retention": "12h",
                "default_retention": "12h",
                "modes": ["verification"],
                "match_threshold": 0.60,
            },
            "watchlist": {
                "max_retention": "3y",
                "modes": ["identification", "investigation"],
                "match_threshold": 0.55,
                "max_candidates": 20,
                "allowed_sources": ["enrolment-desk", "case-file"],
            },
        },
    }


def ttl_policy() -> RetentionPolicy:
    return RetentionPolicy.from_dict({
        "epoch": "1h",
        "purposes": {
            "short": {"max_retention": "30d", "default_retention": "7d",
                      "modes": ["verification"], "match_threshold": 0.5},
            "long": {"max_retention": "1y", "default_retention": "90d",
                     "modes": ["identification"], "match_threshold": 0.5},
            "nodefault": {"max_retention": "2y", "modes": ["identification"],
                          "match_threshold": 0.5},
            "other": {"max_retention": "3y", "modes": ["identification"],
                      "match_threshold": 0.5},
        },
    })


# --- durations ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("1s", timedelta(seconds=1)),
    ("90m", timedelta(minutes=90)),
    ("12h", timedelta(hours=12)),
    ("30d", timedelta(days=30)),
    ("2w", timedelta(weeks=2)),
    ("3y", timedelta(days=3 * 365)),
    ("1d12h", timedelta(days=1, hours=12)),
    ("1y2w3d4h5m6s", timedelta(days=365 + 14 + 3, hours=4, minutes=5, seconds=6)),
])
def test_parse_duration_valid(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", "0s", "0d", "-1d", "1.5d", "1", "d", "10", "1x", "1D", "1mo", " 1d", "1d ", "1 d",
    "1d\n", "+1d", "01d", "1d0h", "12h1d", "1d1d", "1e3s", "\u0661d", "9" * 70 + "y",
    "99999999999999y",
])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(InvalidPolicy) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [None, 5, 1.5, b"1d", timedelta(days=1)])
def test_parse_duration_rejects_non_str(value: Any) -> None:
    with pytest.raises(InvalidPolicy):
        parse_duration(value)


@pytest.mark.parametrize(("td", "text"), [
    (timedelta(seconds=1), "1s"),
    (timedelta(seconds=60), "1m"),
    (timedelta(minutes=90), "90m"),
    (timedelta(hours=24), "1d"),
    (timedelta(hours=36), "36h"),
    (timedelta(days=7), "1w"),
    (timedelta(days=30), "30d"),
    (timedelta(days=365), "1y"),
    (timedelta(days=3 * 365), "3y"),
    (timedelta(days=366), "366d"),  # same length as "1y1d", fewer parts
    (timedelta(days=365, hours=1), "1y1h"),
    (timedelta(days=365, seconds=1), "1y1s"),
    (timedelta(hours=12), "12h"),
])
def test_format_duration_canonical(td: timedelta, text: str) -> None:
    assert format_duration(td) == text
    assert parse_duration(text) == td


@pytest.mark.parametrize("td", [
    timedelta(0), timedelta(seconds=-1), timedelta(milliseconds=1500), "1d", 60,
])
def test_format_duration_rejects(td: Any) -> None:
    with pytest.raises(InvalidInput):
        format_duration(td)


UNIT_SECONDS = [1, 60, 3600, 86400, 7 * 86400, 365 * 86400]


@given(count=st.integers(min_value=1, max_value=10**6), unit=st.sampled_from(UNIT_SECONDS))
def test_format_parse_round_trip_whole_units(count: int, unit: int) -> None:
    td = timedelta(seconds=count * unit)
    text = format_duration(td)
    assert parse_duration(text) == td
    assert format_duration(parse_duration(text)) == text
    # never longer than the plain single-unit spelling
    single = max(u for u in UNIT_SECONDS if (count * unit) % u == 0)
    assert len(text) <= len(str(count * unit // single)) + 1


@given(seconds=st.integers(min_value=1, max_value=500 * 365 * 86400))
def test_format_parse_round_trip_any_seconds(seconds: int) -> None:
    td = timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


# --- from_dict / from_toml ---------------------------------------------------------------

def test_from_dict_design_example() -> None:
    policy = RetentionPolicy.from_dict(base_dict())
    assert policy.epoch == DAY
    assert list(policy.purposes) == ["border-verification", "watchlist"]
    gate = policy.purpose("border-verification")
    assert gate.description == "1:1 traveller verification at the gate"
    assert gate.max_retention == timedelta(hours=12)
    assert gate.default_retention == timedelta(hours=12)
    assert gate.modes == frozenset({"verification"})
    assert gate.match_threshold == 0.60
    assert gate.max_candidates == 50
    assert gate.allowed_sources is None
    wl = policy.purpose("watchlist")
    assert wl.max_retention == timedelta(days=3 * 365)
    assert wl.default_retention is None
    assert wl.modes == frozenset({"identification", "investigation"})
    assert wl.max_candidates == 20
    assert wl.allowed_sources == ("enrolment-desk", "case-file")
    assert wl.description == ""


def test_from_toml_string_matches_dict() -> None:
    assert RetentionPolicy.from_toml_string(DESIGN_TOML) == RetentionPolicy.from_dict(base_dict())


def test_from_toml_file(tmp_path: Any) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(DESIGN_TOML, encoding="utf-8")
    assert RetentionPolicy.from_toml(path) == RetentionPolicy.from_dict(base_dict())
    assert RetentionPolicy.from_toml(str(path)) == RetentionPolicy.from_dict(base_dict())


def test_from_toml_missing_file(tmp_path: Any) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(InvalidPolicy, match=re.escape("absent.toml")):
        RetentionPolicy.from_toml(path)


def test_from_toml_not_toml(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("epoch = \n[[", encoding="utf-8")
    with pytest.raises(InvalidPolicy, match=re.escape("bad.toml")):
        RetentionPolicy.from_toml(path)
    path.write_bytes(b"\xff\xfe epoch")
    with pytest.raises(InvalidPolicy, match=re.escape("bad.toml")):
        RetentionPolicy.from_toml(path)


def test_from_toml_invalid_field_names_file_and_field(tmp_path: Any) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(DESIGN_TOML.replace("max_candidates", "max_candidate"), encoding="utf-8")
    with pytest.raises(InvalidPolicy) as info:
        RetentionPolicy.from_toml(path)
    message = str(info.value)
    assert "typo.toml" in message
    assert "purposes.watchlist.max_candidate" in message
    assert "max_candidates" in message  # did-you-mean hint


def test_from_toml_string_errors() -> None:
    with pytest.raises(InvalidPolicy):
        RetentionPolicy.from_toml_string("not = [toml")
    with pytest.raises(InvalidPolicy):
        RetentionPolicy.from_toml_string(b"epoch = '1d'")  # type: ignore[arg-type]


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d[key]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()
WL = "purposes.watchlist"
GATE = "purposes.border-verification"


@pytest.mark.parametrize(("path", "value", "field"), [
    ("epoch", _DELETE, "epoch"),
    ("epoch", "30s", "epoch"),
    ("epoch", "367d", "epoch"),
    ("epoch", "1 day", "epoch"),
    ("epoch", 86400, "epoch"),
    ("epoch", timedelta(seconds=0.5), "epoch"),
    ("purposes", _DELETE, "purposes"),
    ("purposes", {}, "purposes"),
    ("purposes", ["watchlist"], "purposes"),
    ("retention", "1d", "retention"),
    (f"{WL}.max_retension", "1d", f"{WL}.max_retension"),
    (f"{WL}.max_retention", _DELETE, f"{WL}.max_retention"),
    (f"{WL}.max_retention", "3 years", f"{WL}.max_retention"),
    (f"{WL}.max_retention", "0d", f"{WL}.max_retention"),
    (f"{WL}.max_retention", 3, f"{WL}.max_retention"),
    (f"{WL}.max_retention", -DAY, f"{WL}.max_retention"),
    (f"{WL}.default_retention", "4y", f"{WL}.default_retention"),
    (f"{WL}.default_retention", "-1d", f"{WL}.default_retention"),
    (f"{GATE}.default_retention", "13h", f"{GATE}.default_retention"),
    (f"{WL}.modes", _DELETE, f"{WL}.modes"),
    (f"{WL}.modes", [], f"{WL}.modes"),
    (f"{WL}.modes", "identification", f"{WL}.modes"),
    (f"{WL}.modes", ["identification", "identification"], f"{WL}.modes"),
    (f"{WL}.modes", ["1:N"], f"{WL}.modes"),
    (f"{WL}.modes", [1], f"{WL}.modes"),
    (f"{WL}.match_threshold", _DELETE, f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", 1.5, f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", -1.01, f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", float("nan"), f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", float("inf"), f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", True, f"{WL}.match_threshold"),
    (f"{WL}.match_threshold", "0.5", f"{WL}.match_threshold"),
    (f"{WL}.max_candidates", 0, f"{WL}.max_candidates"),
    (f"{WL}.max_candidates", 10_001, f"{WL}.max_candidates"),
    (f"{WL}.max_candidates", True, f"{WL}.max_candidates"),
    (f"{WL}.max_candidates", 2.0, f"{WL}.max_candidates"),
    (f"{WL}.max_candidates", "20", f"{WL}.max_candidates"),
    (f"{WL}.allowed_sources", [], f"{WL}.allowed_sources"),
    (f"{WL}.allowed_sources", [""], f"{WL}.allowed_sources"),
    (f"{WL}.allowed_sources", "case-file", f"{WL}.allowed_sources"),
    (f"{WL}.allowed_sources", [3], f"{WL}.allowed_sources"),
    (f"{GATE}.description", 5, f"{GATE}.description"),
    ("purposes.watchlist", "table", WL),
    ("purposes.Watch List", {"max_retention": "1d", "modes": ["verification"],
                             "match_threshold": 0.5}, "purposes.Watch List"),
    ("purposes.-lead", {"max_retention": "1d", "modes": ["verification"],
                        "match_threshold": 0.5}, "purposes.-lead"),
    ("purposes." + "x" * 65, {"max_retention": "1d", "modes": ["verification"],
                              "match_threshold": 0.5}, "purposes." + "x" * 65),
])
def test_from_dict_invalid_field(path: str, value: Any, field: str) -> None:
    d = base_dict()
    if path.startswith("purposes.") and path.count(".") == 1:
        d["purposes"][path.split(".", 1)[1]] = value
    else:
        _set(d, path, value)
    with pytest.raises(InvalidPolicy) as info:
        RetentionPolicy.from_dict(d)
    assert field in str(info.value)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(InvalidPolicy):
        RetentionPolicy.from_dict(["epoch"])  # type: ignore[arg-type]


def test_from_dict_accepts_bounds_and_int_threshold() -> None:
    d = base_dict()
    d["epoch"] = "1m"
    d["purposes"]["watchlist"].update(match_threshold=1, max_candidates=10_000)
    d["purposes"]["border-verification"]["match_threshold"] = -1.0
    policy = RetentionPolicy.from_dict(d)
    assert policy.purpose("watchlist").match_threshold == 1.0
    assert isinstance(policy.purpose("watchlist").match_threshold, float)
    d["epoch"] = "366d"
    assert RetentionPolicy.from_dict(d).epoch == timedelta(days=366)


def test_from_dict_accepts_timedelta_values() -> None:
    d = base_dict()
    d["epoch"] = DAY
    d["purposes"]["watchlist"]["max_retention"] = timedelta(days=3 * 365)
    assert RetentionPolicy.from_dict(d) == RetentionPolicy.from_dict(base_dict())


# --- round trip, equality, immutability --------------------------------------------------

def test_to_dict_round_trip() -> None:
    policy = RetentionPolicy.from_toml_string(DESIGN_TOML)
    out = policy.to_dict()
    assert out == {
        "epoch": "1d",
        "purposes": {
            "border-verification": {
                "description": "1:1 traveller verification at the gate",
                "max_retention": "12h", "default_retention": "12h",
                "modes": ["verification"], "match_threshold": 0.6, "max_candidates": 50,
            },
            "watchlist": {
                "max_retention": "3y", "modes": ["identification", "investigation"],
                "match_threshold": 0.55, "max_candidates": 20,
                "allowed_sources": ["enrolment-desk", "case-file"],
            },
        },
    }
    again = RetentionPolicy.from_dict(out)
    assert again == policy
    assert again.to_dict() == out
    assert hash(again) == hash(policy)


def test_equality_ignores_purpose_order() -> None:
    d = base_dict()
    reordered = dict(d, purposes=dict(reversed(list(d["purposes"].items()))))
    a, b = RetentionPolicy.from_dict(d), RetentionPolicy.from_dict(reordered)
    assert a == b and hash(a) == hash(b)
    d["purposes"]["watchlist"]["match_threshold"] = 0.56
    assert RetentionPolicy.from_dict(d) != a


def test_policy_is_immutable_and_copyable() -> None:
    source = base_dict()
    policy = RetentionPolicy.from_dict(source)
    source["purposes"].clear()
    assert len(policy.purposes) == 2
    with pytest.raises(TypeError):
        policy.purposes["x"] = policy.purpose("watchlist")  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.epoch = DAY  # type: ignore[misc]
    assert copy.deepcopy(policy) == policy
    assert copy.copy(policy) == policy


def test_direct_construction_validates() -> None:
    gate = Purpose("gate", timedelta(hours=12), frozenset({"verification"}), 0.6)
    policy = RetentionPolicy(epoch=DAY, purposes={"gate": gate})
    assert policy.purpose("gate") is gate
    with pytest.raises(InvalidPolicy, match=re.escape("purposes.other")):
        RetentionPolicy(epoch=DAY, purposes={"other": gate})
    with pytest.raises(InvalidPolicy, match=re.escape("purposes.gate.match_threshold")):
        Purpose("gate", DAY, frozenset({"verification"}), 2.0)
    with pytest.raises(InvalidPolicy, match=re.escape("purposes.gate.modes")):
        Purpose("gate", DAY, frozenset({"matching"}), 0.5)
    with pytest.raises(InvalidPolicy, match="epoch"):
        RetentionPolicy(epoch=timedelta(seconds=30), purposes={"gate": gate})


# --- lookups and helpers -----------------------------------------------------------------

def test_unknown_purpose() -> None:
    policy = RetentionPolicy.from_dict(base_dict())
    with pytest.raises(PolicyViolation) as info:
        policy.purpose("marketing")
    message = str(info.value)
    assert "'marketing'" in message
    assert "border-verification" in message and "watchlist" in message


def test_allows_mode() -> None:
    policy = RetentionPolicy.from_dict(base_dict())
    gate, wl = policy.purpose("border-verification"), policy.purpose("watchlist")
    assert gate.allows_mode("verification")
    assert not gate.allows_mode("identification")
    assert wl.allows_mode("identification") and wl.allows_mode("investigation")
    assert not wl.allows_mode("verification")
    assert not wl.allows_mode("bogus")
    assert set(MODES) == {"verification", "identification", "investigation"}


def test_source_allowed() -> None:
    policy = RetentionPolicy.from_dict(base_dict())
    gate, wl = policy.purpose("border-verification"), policy.purpose("watchlist")
    assert gate.source_allowed(None)
    assert gate.source_allowed("anything")
    assert wl.source_allowed("enrolment-desk-3")
    assert wl.source_allowed("case-file")
    assert not wl.source_allowed("camera-7")
    assert not wl.source_allowed("")
    assert not wl.source_allowed(None)


# --- resolve_ttl -------------------------------------------------------------------------

def test_resolve_ttl_default_is_smallest() -> None:
    policy = ttl_policy()
    assert policy.resolve_ttl(["long"], None) == timedelta(days=90)
    assert policy.resolve_ttl(["long", "short"], None) == timedelta(days=7)
    assert policy.resolve_ttl(("short", "long", "nodefault"), None) == timedelta(days=7)
    assert policy.resolve_ttl(["nodefault", "long"], None) == timedelta(days=90)


def test_resolve_ttl_default_must_fit_smallest_max() -> None:
    policy = RetentionPolicy.from_dict({
        "epoch": "1h",
        "purposes": {
            "a": {"max_retention": "1y", "default_retention": "90d",
                  "modes": ["verification"], "match_threshold": 0.5},
            "b": {"max_retention": "30d", "modes": ["verification"], "match_threshold": 0.5},
        },
    })
    with pytest.raises(PolicyViolation, match="'b'"):
        policy.resolve_ttl(["a", "b"], None)
    assert policy.resolve_ttl(["a", "b"], timedelta(days=30)) == timedelta(days=30)


def test_resolve_ttl_missing_default() -> None:
    with pytest.raises(PolicyViolation, match="ttl is required"):
        ttl_policy().resolve_ttl(["nodefault", "other"], None)


def test_resolve_ttl_explicit() -> None:
    policy = ttl_policy()
    assert policy.resolve_ttl(["long"], timedelta(days=200)) == timedelta(days=200)
    assert policy.resolve_ttl(["long", "other"], timedelta(days=365)) == timedelta(days=365)
    assert policy.resolve_ttl(["short"], timedelta(seconds=1)) == timedelta(seconds=1)


def test_resolve_ttl_exactly_max_ok_and_over_max_refused() -> None:
    policy = ttl_policy()
    assert policy.resolve_ttl(["short", "long"], timedelta(days=30)) == timedelta(days=30)
    with pytest.raises(PolicyViolation) as info:
        policy.resolve_ttl(["long", "short"], timedelta(days=30, seconds=1))
    assert "'short'" in str(info.value) and "30d" in str(info.value)
    with pytest.raises(PolicyViolation):
        policy.resolve_ttl(["long"], timedelta(days=365, microseconds=1))


def test_resolve_ttl_unknown_purpose() -> None:
    with pytest.raises(PolicyViolation, match="unknown purpose 'marketing'"):
        ttl_policy().resolve_ttl(["long", "marketing"], timedelta(days=1))


def test_resolve_ttl_empty_list() -> None:
    with pytest.raises(PolicyViolation):
        ttl_policy().resolve_ttl([], timedelta(days=1))
    with pytest.raises(PolicyViolation):
        ttl_policy().resolve_ttl((), None)


def test_resolve_ttl_bare_string() -> None:
    with pytest.raises(InvalidInput, match="list"):
        ttl_policy().resolve_ttl("long", timedelta(days=1))


@pytest.mark.parametrize("purposes", [{"long"}, None, 5, iter(["long"]), [b"long"], [None]])
def test_resolve_ttl_bad_purposes_type(purposes: Any) -> None:
    with pytest.raises(InvalidInput):
        ttl_policy().resolve_ttl(purposes, timedelta(days=1))


def test_resolve_ttl_duplicates() -> None:
    with pytest.raises(InvalidInput, match="'long'"):
        ttl_policy().resolve_ttl(["long", "short", "long"], timedelta(days=1))


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(days=-1), timedelta(microseconds=-1)])
def test_resolve_ttl_non_positive(ttl: timedelta) -> None:
    with pytest.raises(InvalidInput):
        ttl_policy().resolve_ttl(["long"], ttl)


@pytest.mark.parametrize("ttl", [30, 86400.0, "30d", True])
def test_resolve_ttl_not_timedelta(ttl: Any) -> None:
    with pytest.raises(InvalidInput):
        ttl_policy().resolve_ttl(["long"], ttl)


def test_to_toml_reads_back_equal() -> None:
    """``policy show`` prints this; a compliance engineer edits it and applies it."""
    d = RetentionPolicy.from_toml_string(DESIGN_TOML).to_dict()
    d["purposes"]["door.v2"] = {"max_retention": "90m", "modes": ["verification"],
                                "match_threshold": 0.7,
                                "description": 'quotes " \\ tab\t DEL\x7f é 😀'}
    policy = RetentionPolicy.from_dict(d)
    text = policy.to_toml()
    assert RetentionPolicy.from_toml_string(text) == policy
    assert '[purposes."door.v2"]' in text and "[purposes.watchlist]" in text
