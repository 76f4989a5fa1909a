"""Matching request descriptors: precedence, wildcards, depth, overrides, stats keys."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimit.config import Match, RateLimitConfig, Unit, load_config
from ratelimit.config.matcher import _wildcard_matches


def config_from(tmp_path: Path, text: str) -> RateLimitConfig:
    path = tmp_path / "limits.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config([path])


def limit_of(match: Match | None) -> int | None:
    return None if match is None else match.rule.requests_per_unit


ORDERING = """\
domain: d
descriptors:
  - {key: path, rate_limit: {unit: minute, requests_per_unit: 1}}
  - {key: path, value: "/api/*", rate_limit: {unit: minute, requests_per_unit: 2}}
  - {key: path, value: "/a*", rate_limit: {unit: minute, requests_per_unit: 3}}
  - {key: path, value: "/api/v1", rate_limit: {unit: minute, requests_per_unit: 4}}
  - {key: path, value: "*/health", rate_limit: {unit: minute, requests_per_unit: 5}}
"""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/api/v1", 4),  # exact key_value first, though wildcards also match
        ("/api/v2", 2),  # then wildcards in config order: "/api/*" before "/a*"
        ("/admin", 3),
        ("/api/health", 2),  # "/api/*" is listed before "*/health"
        ("/b/health", 5),
        ("/other", 1),  # then the key-only default
        ("", 1),
    ],
)
def test_precedence_exact_then_wildcards_in_order_then_default(tmp_path: Path, value: str, expected: int) -> None:
    config = config_from(tmp_path, ORDERING)
    assert limit_of(config.lookup("d", [("path", value)])) == expected


def test_wildcards_keep_config_order_not_specificity(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """\
        domain: d
        descriptors:
          - {key: k, value: "f*", rate_limit: {unit: second, requests_per_unit: 1}}
          - {key: k, value: "foo*", rate_limit: {unit: second, requests_per_unit: 2}}
        """,
    )
    assert limit_of(config.lookup("d", [("k", "foobar")])) == 1


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("bar*b", "barb", True),  # "*" may match nothing
        ("bar*b", "bar123b", True),
        ("bar*b", "bara", False),
        ("bar*b", "xbarb", False),
        ("a*a", "a", False),  # prefix and suffix may not overlap
        ("a*a", "aa", True),
        ("foo*bar*baz", "foobarbaz", True),
        ("foo*bar*baz", "foo123baz", False),
        ("*", "", True),
        ("x**y", "xy", True),
    ],
)
def test_wildcard_anywhere(tmp_path: Path, pattern: str, value: str, matches: bool) -> None:
    config = config_from(
        tmp_path,
        f"""\
        domain: d
        descriptors:
          - {{key: k, value: "{pattern}", rate_limit: {{unit: second, requests_per_unit: 7}}}}
        """,
    )
    assert (config.lookup("d", [("k", value)]) is not None) is matches


_ALPHABET = "ab_*"


@given(
    pattern=st.text(alphabet=_ALPHABET, min_size=1, max_size=8).filter(lambda p: "*" in p),
    value=st.text(alphabet="ab_", max_size=10),
)
def test_wildcard_match_agrees_with_glob_semantics(pattern: str, value: str) -> None:
    parts = pattern.split("*")
    expected = re.fullmatch(".*".join(map(re.escape, parts)), value, re.DOTALL) is not None
    got = _wildcard_matches(value, parts[0], parts[-1], tuple(parts[1:-1]), len(pattern) - pattern.count("*"))
    assert got is expected


NESTED = """\
domain: d
descriptors:
  - key: a
    value: "1"
    rate_limit: {unit: second, requests_per_unit: 1}
    descriptors:
      - key: b
        rate_limit: {unit: second, requests_per_unit: 2}
  - key: leaf
    rate_limit: {unit: second, requests_per_unit: 3}
  - key: open
    descriptors:
      - {key: x, rate_limit: {unit: second, requests_per_unit: 4}}
"""


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([("a", "1")], 1),
        ([("a", "1"), ("b", "z")], 2),
        ([("a", "1"), ("c", "z")], None),  # no node for the last entry
        ([("leaf", "v"), ("more", "v")], None),  # deeper than the config: no limit
        ([("a", "1"), ("b", "z"), ("c", "z")], None),
        ([("open", "v")], None),  # a node without rate_limit
        ([("open", "v"), ("x", "y")], 4),
        ([("x", "y")], None),
        ([], None),
    ],
)
def test_limit_only_at_the_node_of_the_last_entry(
    tmp_path: Path, entries: list[tuple[str, str]], expected: int | None
) -> None:
    config = config_from(tmp_path, NESTED)
    assert limit_of(config.lookup("d", entries)) == expected


def test_unknown_domain(tmp_path: Path) -> None:
    config = config_from(tmp_path, NESTED)
    assert config.lookup("other", [("a", "1")]) is None
    assert config.lookup("other", [("a", "1")], (5, Unit.SECOND)) is None
    assert config.has_domain("d") and not config.has_domain("other")
    assert config.domains == ("d",)


def test_override_wins_whenever_the_domain_is_known(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """\
        domain: d
        descriptors:
          - {key: k, shadow_mode: true, rate_limit: {unit: second, requests_per_unit: 1}}
        """,
    )
    entries = (("k", "v"), ("unconfigured", ""))
    match = config.lookup("d", entries, (42, Unit.HOUR))
    assert match is not None
    rule = match.rule
    assert (rule.requests_per_unit, rule.unit) == (42, Unit.HOUR)
    assert not rule.shadow_mode and not rule.unlimited and rule.name == ""
    assert match.stats_key == rule.full_key == "d.k_v.unconfigured"
    assert match.stats_key_parts == ("k_v", "unconfigured")
    assert match.counter_entries == entries
    assert match.share_threshold_patterns is None
    # A unit number the enum does not know is passed on as UNKNOWN.
    assert config.lookup("d", [("k", "v")], (1, 99)).rule.unit is Unit.UNKNOWN  # type: ignore[arg-type, union-attr]
    assert config.lookup("d", [], (1, Unit.SECOND)).stats_key == "d."  # type: ignore[union-attr]


def test_unlimited_rules_are_matches(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        "domain: d\ndescriptors:\n  - {key: free, rate_limit: {unlimited: true}}\n",
    )
    match = config.lookup("d", [("free", "x")])
    assert match is not None and match.rule.unlimited
    assert match.stats_key == "d.free"


SHARED = """\
domain: d
descriptors:
  - key: tenant
    value: "t*"
    share_threshold: true
    descriptors:
      - key: file
        value: "*.pdf"
        share_threshold: true
        descriptors:
          - key: user
            rate_limit: {unit: minute, requests_per_unit: 9}
"""


def test_share_threshold_levels_count_under_the_pattern(tmp_path: Path) -> None:
    config = config_from(tmp_path, SHARED)
    first = config.lookup("d", [("tenant", "t1"), ("file", "a.pdf"), ("user", "u1")])
    second = config.lookup("d", [("tenant", "t2"), ("file", "b.pdf"), ("user", "u1")])
    assert first is not None and second is not None
    assert first.counter_entries == (("tenant", "t*"), ("file", "*.pdf"), ("user", "u1"))
    assert second.counter_entries == first.counter_entries
    assert first.share_threshold_patterns == ("t*", "*.pdf", "")
    assert first.stats_key == "d.tenant_t*.file_*.pdf.user"


def test_stats_keys(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        """\
        domain: d
        descriptors:
          - key: plain
            value: v
            descriptors:
              - {key: sub, rate_limit: {unit: second, requests_per_unit: 1}}
          - key: detailed
            detailed_metric: true
            rate_limit: {unit: second, requests_per_unit: 1}
          - key: vtm
            value_to_metric: true
            descriptors:
              - {key: sub, rate_limit: {unit: second, requests_per_unit: 1}}
        """,
    )
    plain = config.lookup("d", [("plain", "v"), ("sub", "x")])
    assert plain is not None
    assert plain.stats_key == plain.rule.full_key == "d.plain_v.sub"
    assert plain.stats_key_parts == ("plain_v", "sub")
    assert plain.counter_entries == (("plain", "v"), ("sub", "x"))

    detailed = config.lookup("d", [("detailed", "")])
    assert detailed is not None
    assert detailed.stats_key == "d.detailed_"  # Go's detailed key keeps the "_"
    assert detailed.stats_key_parts == ("detailed_",)

    runtime = config.lookup("d", [("vtm", "GET"), ("sub", "x")])
    empty = config.lookup("d", [("vtm", ""), ("sub", "x")])
    assert runtime is not None and empty is not None
    assert runtime.stats_key == "d.vtm_GET.sub"
    assert runtime.stats_key_parts == ("vtm_GET", "sub")
    assert runtime.rule.full_key == "d.vtm.sub"
    assert empty.stats_key == "d.vtm.sub"


def test_rules_lists_every_rule_in_config_order(tmp_path: Path) -> None:
    config = config_from(tmp_path, NESTED)
    assert [rule.full_key for rule in config.rules()] == [
        "d.a_1",
        "d.a_1.b",
        "d.leaf",
        "d.open.x",
    ]


def test_config_is_immutable(tmp_path: Path) -> None:
    config = config_from(tmp_path, NESTED)
    with pytest.raises(AttributeError):
        config._domains = {}
    with pytest.raises(AttributeError):
        del config._rules
    assert RateLimitConfig.empty().domains == ()
