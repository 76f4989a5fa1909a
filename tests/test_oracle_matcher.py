"""The descriptor matcher against a brute-force oracle: which rule a value gets.

The README (after envoyproxy/ratelimit): at each level the exact `key_value` wins, then the
wildcard values in config order, then the key-only default. Each `*` matches any run of
characters, possibly empty. The oracle writes each pattern as an anchored regular expression
and tries them in that order; random configs and values over a small alphabet (so that
patterns overlap, repeat letters and nearly match) must get the same rule from the matcher.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ratelimit.config import load_config
from ratelimit.config.model import Unit

ALPHABET = "ab_"


def random_text(rng: random.Random, longest: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest)))


def random_pattern(rng: random.Random) -> str:
    pieces = [random_text(rng, 2) for _ in range(rng.randint(1, 4))]
    return "*".join(pieces)


def oracle(value: str, exact: dict[str, int], wildcards: list[tuple[str, int]], default: int | None) -> int | None:
    if value in exact:
        return exact[value]
    for pattern, limit in wildcards:
        if re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), value, re.DOTALL):
            return limit
    return default


def rule(limit: int) -> str:
    return f"unit: hour, requests_per_unit: {limit}"


def test_wildcard_values_match_as_the_oracle_says(tmp_path: Path) -> None:
    rng = random.Random(11)
    for round_number in range(120):
        values: list[str] = []
        while len(values) < rng.randint(2, 6):
            candidate = random_pattern(rng) if rng.random() < 0.8 else random_text(rng, 3)
            if candidate and candidate not in values:
                values.append(candidate)
        default = 999 if rng.random() < 0.5 else None
        # Each rule's limit says which one matched: its position in the config.
        lines = ["domain: w", "descriptors:"]
        for position, value in enumerate(values, start=1):
            lines += [f"  - key: k\n    value: '{value}'\n    rate_limit: {{{rule(position)}}}"]
        if default is not None:
            lines += [f"  - key: k\n    rate_limit: {{{rule(default)}}}"]
        config_file = tmp_path / f"w{round_number}.yaml"
        config_file.write_text("\n".join(lines) + "\n")
        config = load_config([config_file])
        exact = {value: position for position, value in enumerate(values, start=1) if "*" not in value}
        wildcards = [(value, position) for position, value in enumerate(values, start=1) if "*" in value]
        for _ in range(40):
            asked = random_text(rng, 7)
            match = config.lookup("w", [("k", asked)])
            got = match.rule.requests_per_unit if match is not None else None
            expected = oracle(asked, exact, wildcards, default)
            assert got == expected, f"value {asked!r} against {values} (default {default})"


def test_every_limited_rule_is_declared_for_metrics_nested_ones_too(tmp_path: Path) -> None:
    config_file = tmp_path / "nested.yaml"
    config_file.write_text(
        "domain: n\ndescriptors:\n"
        "  - key: top\n    rate_limit: {unit: hour, requests_per_unit: 1}\n"
        "  - key: free\n    rate_limit: {unlimited: true}\n"
        "  - key: tenant\n    descriptors:\n"
        "      - key: plan\n        value: gold\n        rate_limit: {unit: hour, requests_per_unit: 2}\n"
        "      - key: region\n        descriptors:\n"
        "          - key: zone\n            rate_limit: {unit: hour, requests_per_unit: 3}\n"
    )
    declared = set(load_config([config_file]).rule_stats_keys())
    assert declared == {
        ("n", ("top",)),
        ("n", ("tenant", "plan_gold")),
        ("n", ("tenant", "region", "zone")),
    }


def test_counter_entries_are_a_tuple_whatever_the_caller_passed(tmp_path: Path) -> None:
    config_file = tmp_path / "t.yaml"
    config_file.write_text("domain: t\ndescriptors:\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 1}\n")
    config = load_config([config_file])
    for override in (None, (5, Unit.MINUTE)):
        match = config.lookup("t", [("k", "v")], override)
        assert match is not None and match.counter_entries == (("k", "v"),)
        assert isinstance(match.counter_entries, tuple)


def test_an_empty_value_shows_the_bare_key_in_the_stats_key(tmp_path: Path) -> None:
    """("k", "") looks up the composite "k_", which here is a key-only node named "k_" (as in
    envoyproxy/ratelimit); the stats key shows the request's bare key, "k"."""
    config_file = tmp_path / "e.yaml"
    config_file.write_text("domain: e\ndescriptors:\n  - key: k_\n    rate_limit: {unit: hour, requests_per_unit: 1}\n")
    match = load_config([config_file]).lookup("e", [("k", "")])
    assert match is not None and match.rule.requests_per_unit == 1
    assert match.stats_key == "e.k" and match.stats_key_parts == ("k",)
