"""Loading limits configs: file discovery, each error kind, merging, the algorithm key."""

from __future__ import annotations

import os
import pickle
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from ratelimit.config import (
    Algorithm,
    ConfigError,
    InvalidConfig,
    RateLimitConfig,
    Unit,
    discover_config_files,
    load_config,
    validate_paths,
)

BASIC = """\
domain: basic
descriptors:
  - key: key1
    rate_limit:
      unit: second
      requests_per_unit: 5
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, name: str = "limits.yaml") -> RateLimitConfig:
    return load_config([write(tmp_path, name, text)])


def load_error(tmp_path: Path, text: str, name: str = "limits.yaml") -> ConfigError:
    path = write(tmp_path, name, text)
    with pytest.raises(InvalidConfig) as raised:
        load_config([path])
    error = raised.value.errors[0]  # the file's first error; a file may have more
    assert error.file == str(path)
    where = f"line {error.line}: " if error.line is not None else ""
    assert str(error) == f"{path}: {where}{error.message}"
    return error


# --- one test per error kind: (YAML, the Go server's words, the key and line it names) --

ERROR_CASES = {
    "unknown key nested": (
        """\
        domain: d
        descriptors:
          - key: k
            ratelimit: {unit: day, requests_per_unit: 5}
        """,
        "config error, unknown key 'ratelimit'",
        "ratelimit",
        4,
    ),
    "unknown key top level": (
        "domain: d\ndescriptor: []\n",
        "config error, unknown key 'descriptor'",
        "descriptor",
        2,
    ),
    "non-string key int": ("domain: d\n1: x\n", "config error, key is not of type string: 1", None, 2),
    "non-string key bool": (
        "domain: d\ntrue: x\n",
        "config error, key is not of type string: true",
        None,
        2,
    ),
    "non-string key null": (
        "domain: d\n~: x\n",
        "config error, key is not of type string: <nil>",
        None,
        2,
    ),
    "non-string key float": (
        "0.25: d\n",
        "config error, key is not of type string: 0.25",
        None,
        1,
    ),
    "list item not a map": (
        "domain: d\ndescriptors: [a, b]\n",
        "config error, yaml file contains list of type other than map: a",
        "descriptors",
        2,
    ),
    "list item a list": (
        "domain: d\ndescriptors: [[1, 2]]\n",
        "config error, yaml file contains list of type other than map: [1 2]",
        "descriptors",
        2,
    ),
    "float leaf": (
        """\
        domain: d
        descriptors:
          - key: k
            value: 1.5
        """,
        "error checking config",
        "value",
        4,
    ),
    "empty domain": ("descriptors: []\n", "config file cannot have empty domain", "domain", 1),
    "empty file": ("", "config file cannot have empty domain", "domain", 1),
    "empty key": (
        "domain: d\ndescriptors:\n  - value: v\n",
        "descriptor has empty key",
        "key",
        3,
    ),
    "duplicate composite key nested": (
        """\
        domain: d
        descriptors:
          - key: a
            descriptors:
              - {key: b, value: c}
              - {key: b, value: c}
        """,
        "duplicate descriptor composite key 'd.a.b_c'",
        "d.a.b_c",
        6,
    ),
    "ambiguous composite key": (
        """\
        domain: d
        descriptors:
          - {key: a_b, value: c}
          - {key: a, value: b_c}
        """,
        "duplicate descriptor composite key 'd.a_b_c'",
        "d.a_b_c",
        4,
    ),
    "bad unit": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n",
        "invalid rate limit unit 'fortnight' for key 'unit' "
        "(valid units: second, minute, hour, day, week, month, year)",
        "unit",
        4,
    ),
    "unit unknown": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: unknown}\n",
        "invalid rate limit unit 'unknown'",
        "unit",
        4,
    ),
    "missing unit": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n",
        "missing rate limit unit for 'd.k': set key 'unit' to one of second, minute, hour, day, week, month, year",
        "unit",
        4,
    ),
    "unlimited with unit": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: day}\n",
        "should not specify rate limit unit when unlimited",
        "unit",
        4,
    ),
    "empty replaces": (
        """\
        domain: d
        descriptors:
          - key: k
            rate_limit: {unit: day, name: n, replaces: [{name: }]}
        """,
        "should not have an empty replaces entry",
        "replaces",
        4,
    ),
    "self replaces": (
        """\
        domain: d
        descriptors:
          - key: k
            rate_limit: {unit: day, name: n, replaces: [{name: n}]}
        """,
        "replaces should not contain name of same descriptor",
        "replaces",
        4,
    ),
    "share_threshold without wildcard": (
        "domain: d\ndescriptors:\n  - {key: k, value: v, share_threshold: true}\n",
        "share_threshold can only be used with wildcard values (containing '*'), but found key 'k_v'",
        "d.k_v",
        3,
    ),
    "requests_per_unit negative": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: -1}\n",
        "cannot unmarshal !!int `-1` into uint32 for key 'requests_per_unit'",
        "requests_per_unit",
        4,
    ),
    "requests_per_unit 2**32": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: day\n      requests_per_unit: 4294967296\n",
        "cannot unmarshal !!int `4294967296` into uint32 for key "
        "'requests_per_unit' (must be a non-negative integer < 2**32)",
        "requests_per_unit",
        6,
    ),
    "requests_per_unit string": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: '5'}\n",
        "cannot unmarshal !!str `5` into uint32 for key 'requests_per_unit'",
        "requests_per_unit",
        4,
    ),
    "requests_per_unit bool": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, requests_per_unit: true}\n",
        "cannot unmarshal !!bool `true` into uint32 for key 'requests_per_unit'",
        "requests_per_unit",
        4,
    ),
    "requests_per_unit beyond int64": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      requests_per_unit: 99999999999999999999\n",
        "error checking config",
        "requests_per_unit",
        5,
    ),
    "quoted bool": (
        "domain: d\ndescriptors:\n  - {key: k, shadow_mode: 'true'}\n",
        "cannot unmarshal !!str `true` into bool for key 'shadow_mode'",
        "shadow_mode",
        3,
    ),
    "descriptors a map": (
        "domain: d\ndescriptors: {key: k}\n",
        "cannot unmarshal !!map into a list of descriptors for key 'descriptors'",
        "descriptors",
        2,
    ),
    "rate_limit a string": (
        "domain: d\ndescriptors:\n  - {key: k, rate_limit: fast}\n",
        "cannot unmarshal !!str `fast` into a rate_limit map for key 'rate_limit'",
        "rate_limit",
        3,
    ),
    "metadata a list": (
        "domain: d\ndescriptors:\n  - {key: k, metadata: [a]}\n",
        "cannot unmarshal !!seq into a metadata map for key 'metadata'",
        "metadata",
        3,
    ),
    "domain a map": (
        "domain: {key: x}\n",
        "cannot unmarshal !!map into string for key 'domain'",
        "domain",
        1,
    ),
    "domain a list of strings": (
        # The key validator sees the list first, as in Go.
        "domain: [a]\n",
        "config error, yaml file contains list of type other than map: a (in list 'domain')",
        "domain",
        1,
    ),
    "unknown algorithm": (
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: day, algorithm: token_bucket}\n",
        "invalid rate limit algorithm 'token_bucket' for key 'algorithm' "
        "(valid algorithms: sliding_window, fixed_window)",
        "algorithm",
        4,
    ),
    "top level a list": (
        "- domain: d\n",
        "error loading config file: cannot unmarshal !!seq into a map",
        None,
        1,
    ),
    "yaml syntax": (
        "domain: 'unterminated\n",
        "error loading config file: yaml: found unexpected end of stream",
        None,
        2,
    ),
    "recursive alias": (
        "domain: d\ndescriptors: &loop [*loop]\n",
        "error loading config file: yaml: recursive alias",
        None,
        2,
    ),
}


@pytest.mark.parametrize(("text", "message", "key", "line"), ERROR_CASES.values(), ids=list(ERROR_CASES))
def test_error_names_file_line_and_key(
    tmp_path: Path, text: str, message: str, key: str | None, line: int | None
) -> None:
    error = load_error(tmp_path, textwrap.dedent(text))
    assert message in error.message
    assert error.key == key
    assert error.line == line


def test_duplicate_domain_names_second_file(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", BASIC)
    second = write(tmp_path, "b.yaml", "domain: basic\n")
    with pytest.raises(ConfigError) as raised:
        load_config([first, second])
    assert str(raised.value) == f"{second}: line 1: duplicate domain 'basic' in config file"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as raised:
        load_config([missing])
    assert raised.value.file == str(missing)
    assert "error loading config file: No such file or directory" in str(raised.value)


def test_config_error_pickles() -> None:
    error = ConfigError("a.yaml", "config error, unknown key 'x'", key="x")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.file, copy.message, copy.key, str(copy)) == (
        "a.yaml",
        "config error, unknown key 'x'",
        "x",
        "a.yaml: config error, unknown key 'x'",
    )


# --- what the Go server accepts, including its quirks ----------------------------------


def test_scalars_decode_into_strings_by_their_source_text(tmp_path: Path) -> None:
    # yaml.v2 keeps the text of a non-string scalar in a string field; so must we.
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - {key: hex, value: 0x10, rate_limit: {unit: day, requests_per_unit: 1}}
          - {key: flag, value: yes, rate_limit: {unit: day, requests_per_unit: 2}}
          - {key: day, value: 2024-01-01, rate_limit: {unit: day, requests_per_unit: 3}}
          - {key: 7, rate_limit: {unit: day, requests_per_unit: 4}}
        """,
    )
    assert [rule.full_key for rule in config.rules()] == [
        "d.hex_0x10",
        "d.flag_yes",
        "d.day_2024-01-01",
        "d.7",
    ]
    assert config.lookup("d", [("flag", "yes")]) is not None


def test_units_are_case_insensitive_and_week_is_known(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - {key: a, rate_limit: {unit: SECOND, requests_per_unit: 1}}
          - {key: b, rate_limit: {unit: Week, requests_per_unit: 1}}
          - {key: c, rate_limit: {unit: year, requests_per_unit: 4294967295}}
        """,
    )
    assert [(rule.unit, rule.requests_per_unit) for rule in config.rules()] == [
        (Unit.SECOND, 1),
        (Unit.WEEK, 1),
        (Unit.YEAR, 2**32 - 1),
    ]


def test_go_quirks_are_kept(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        unit: minute            # a known key at the wrong level is ignored
        descriptors:
          - key: unlimited_bad_unit
            rate_limit: {unlimited: true, unit: fortnight}
          - key: null_limit
            rate_limit:
          - key: no_limit
            shadow_mode: true   # flags without a rate_limit mean nothing
        """,
    )
    rules = list(config.rules())
    assert len(rules) == 1
    assert rules[0].unlimited and rules[0].unit is Unit.UNKNOWN
    assert config.lookup("d", [("null_limit", "x")]) is None
    assert config.lookup("d", [("no_limit", "x")]) is None


def test_merge_keys_and_anchors(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - key: a
            rate_limit: &per_minute {unit: minute, requests_per_unit: 10}
          - key: b
            rate_limit:
              <<: *per_minute
              requests_per_unit: 20
        """,
    )
    assert [(rule.unit, rule.requests_per_unit) for rule in config.rules()] == [
        (Unit.MINUTE, 10),
        (Unit.MINUTE, 20),
    ]


def test_rule_fields(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - key: k
            value: v
            shadow_mode: true
            quota_mode: true
            detailed_metric: true
            rate_limit:
              unit: hour
              requests_per_unit: 3
              name: mine
              replaces: [{name: other}, {name: third}]
        """,
    )
    (rule,) = config.rules()
    assert rule.full_key == "d.k_v"
    assert (rule.shadow_mode, rule.quota_mode, rule.detailed_metric) == (True, True, True)
    assert (rule.name, rule.replaces) == ("mine", ("other", "third"))
    assert rule.algorithm is Algorithm.SLIDING_WINDOW


def test_metadata_is_read_only_data(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - key: a
            rate_limit: {unit: day, requests_per_unit: 1}
            metadata:
              service: {name: svc, ports: [80, 443]}
              1: one
              nested_list_of_maps: [{x: 1}]
          - key: b
            rate_limit: {unit: day, requests_per_unit: 1}
            metadata: {}
        """,
    )
    first, second = config.rules()
    metadata = first.metadata
    assert isinstance(metadata, Mapping)
    assert metadata["service"]["name"] == "svc"
    assert metadata["service"]["ports"] == (80, 443)
    assert metadata["1"] == "one"  # keys become strings, as in Go's structpb
    assert metadata["nested_list_of_maps"][0]["x"] == 1
    with pytest.raises(TypeError):
        metadata["service"] = "changed"  # type: ignore[index]
    with pytest.raises(TypeError):
        metadata["service"]["name"] = "changed"
    assert second.metadata is None  # Go keeps no metadata for an empty map


# --- the algorithm extension -------------------------------------------------------------


def test_algorithm_key(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - {key: a, rate_limit: {unit: second, requests_per_unit: 1}}
          - {key: b, rate_limit: {unit: second, requests_per_unit: 1, algorithm: fixed_window}}
          - {key: c, rate_limit: {unit: second, requests_per_unit: 1, algorithm: SLIDING_WINDOW}}
        """,
    )
    assert [rule.algorithm for rule in config.rules()] == [
        Algorithm.SLIDING_WINDOW,
        Algorithm.FIXED_WINDOW,
        Algorithm.SLIDING_WINDOW,
    ]


# --- files and directories ---------------------------------------------------------------


def test_directory_loads_yaml_files_sorted_non_recursively(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", "domain: b\n")
    write(tmp_path, "a.yaml", "domain: a\n")
    write(tmp_path, "c.yaml.bak", "not: [valid\n")
    write(tmp_path, "notes.txt", "ignored\n")
    write(tmp_path, ".hidden.yaml", "ignored: [\n")
    write(tmp_path, "sub/d.yaml", "domain: d\n")
    (tmp_path / "dir.yaml").mkdir()
    config = load_config([tmp_path])
    assert config.domains == ("a", "b")
    assert config.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))


def test_files_and_directories_mix_in_order(tmp_path: Path) -> None:
    explicit = write(tmp_path, "explicit.conf", "domain: first\n")
    write(tmp_path, "dir/z.yaml", "domain: z\n")
    config = load_config([str(explicit), tmp_path / "dir"])
    assert config.domains == ("first", "z")


def test_error_in_directory_names_the_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "domain: a\n")
    bad = write(tmp_path, "b.yaml", "domain: b\nratelimit: {}\n")
    with pytest.raises(ConfigError) as raised:
        load_config([tmp_path])
    assert str(raised.value) == f"{bad}: line 2: config error, unknown key 'ratelimit'"


def test_configmap_mount_loads_each_file_once(tmp_path: Path) -> None:
    # The layout kubelet writes for a ConfigMap volume.
    timestamped = tmp_path / "..2024_05_01_10_00_00.123456"
    write(timestamped, "limits.yaml", BASIC)
    write(timestamped, "other.yml", "domain: other\n")
    os.symlink(timestamped.name, tmp_path / "..data")
    os.symlink("..data/limits.yaml", tmp_path / "limits.yaml")
    os.symlink("..data/other.yml", tmp_path / "other.yml")
    assert discover_config_files([tmp_path]) == [
        str(tmp_path / "limits.yaml"),
        str(tmp_path / "other.yml"),
    ]
    config = load_config([tmp_path])
    assert config.domains == ("basic", "other")
    assert len(list(config.rules())) == 1


def test_dangling_symlink_is_skipped(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "domain: a\n")
    os.symlink("gone.yaml", tmp_path / "b.yaml")
    assert load_config([tmp_path]).domains == ("a",)


def test_an_empty_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    # Serving no domain answers OK to everything: a wrong path, never an intent.
    (tmp_path / "notes.txt").write_text("not a config")
    with pytest.raises(InvalidConfig) as raised:
        load_config([tmp_path])
    assert str(raised.value) == f"{tmp_path}: no config files (*.yaml, *.yml) in this folder, so it holds no domain"


def test_no_paths_at_all_is_an_error() -> None:
    assert [error.message for error in validate_paths([])] == [
        "no limits config given: name YAML files or folders of them"
    ]


# --- merging domains across files --------------------------------------------------------


def test_merge_domains(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "1.yaml",
        """\
        domain: shared
        descriptors:
          - {key: a, value: "x*", rate_limit: {unit: minute, requests_per_unit: 1}}
        """,
    )
    second = write(
        tmp_path,
        "2.yaml",
        """\
        domain: shared
        descriptors:
          - {key: a, value: "*", rate_limit: {unit: minute, requests_per_unit: 2}}
          - {key: b, rate_limit: {unit: minute, requests_per_unit: 3}}
        """,
    )
    config = load_config([first, second], merge_domains=True)
    assert config.domains == ("shared",)
    # The first file's wildcard stays ahead of the second's.
    assert _limit(config, "shared", [("a", "xylophone")]) == 1
    assert _limit(config, "shared", [("a", "other")]) == 2
    assert _limit(config, "shared", [("b", "anything")]) == 3
    with pytest.raises(ConfigError, match="duplicate domain 'shared'"):
        load_config([first, second])


def test_merge_rejects_same_top_level_key_naming_second_file(tmp_path: Path) -> None:
    first = write(tmp_path, "1.yaml", BASIC)
    second = write(tmp_path, "2.yaml", BASIC)
    with pytest.raises(ConfigError) as raised:
        load_config([first, second], merge_domains=True)
    assert str(raised.value) == f"{second}: line 3: duplicate descriptor composite key 'basic.key1'"


# --- validate_paths ----------------------------------------------------------------------


def test_validate_paths_reports_every_error_of_every_file_in_order(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", BASIC)
    write(tmp_path, "b.yaml", "domain: b\nbogus: 1\ndescriptors:\n  - {key: k, shadow_mode: maybe}\n")
    write(tmp_path, "c.yaml", BASIC)  # duplicate domain of a.yaml
    write(
        tmp_path,
        "d.yaml",
        """\
        domain: d
        descriptors:
          - {key: k, rate_limit: {unit: x}}
          - {key: j, rate_limit: {requests_per_unit: 1}}
          - {key: k}
        """,
    )
    write(tmp_path, "e.yaml", "domain: e\n")
    errors = validate_paths([tmp_path])
    units = "second, minute, hour, day, week, month, year"
    assert [str(error) for error in errors] == [
        f"{tmp_path / 'b.yaml'}: line 2: config error, unknown key 'bogus'",
        f"{tmp_path / 'b.yaml'}: line 4: error loading config file: cannot unmarshal !!str `maybe` into bool "
        "for key 'shadow_mode' (expected true or false)",
        f"{tmp_path / 'c.yaml'}: line 1: duplicate domain 'basic' in config file",
        f"{tmp_path / 'd.yaml'}: line 3: invalid rate limit unit 'x' for key 'unit' (valid units: {units})",
        f"{tmp_path / 'd.yaml'}: line 4: missing rate limit unit for 'd.j': set key 'unit' to one of {units} "
        "(or unlimited: true)",
        f"{tmp_path / 'd.yaml'}: line 5: duplicate descriptor composite key 'd.k'",
    ]
    assert validate_paths([tmp_path / "a.yaml", tmp_path / "e.yaml"]) == []


def test_load_config_raises_every_error_at_once(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "domain: a\nbogus: 1\n")
    second = write(tmp_path, "b.yaml", "domain: b\ndescriptors:\n  - {key: k, rate_limit: {unit: fortnight}}\n")
    with pytest.raises(InvalidConfig) as raised:
        load_config([first, second])
    assert [(error.file, error.line, error.key) for error in raised.value.errors] == [
        (str(first), 2, "bogus"),
        (str(second), 3, "unit"),
    ]
    # It reads as its first error, and str() shows them all, one a line.
    assert (raised.value.file, raised.value.line) == (str(first), 2)
    assert str(raised.value).splitlines() == [str(error) for error in raised.value.errors]
    copy = pickle.loads(pickle.dumps(raised.value))
    assert isinstance(copy, InvalidConfig) and str(copy) == str(raised.value)


def test_a_key_written_twice_in_one_map_is_an_error_with_both_lines(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        """\
        domain: d
        descriptors:
          - key: k
            rate_limit: {unit: fortnight, requests_per_unit: 1}
            rate_limit: {unit: day, requests_per_unit: 1}
        """,
    )
    assert (error.line, error.key) == (5, "rate_limit")
    assert error.message == (
        "config error, duplicate key 'rate_limit' (first on line 4; YAML would keep only the last one)"
    )


def test_a_merge_key_overridden_in_place_is_no_duplicate(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """\
        domain: d
        descriptors:
          - &base {key: k, rate_limit: {unit: day, requests_per_unit: 1}}
          - <<: *base
            key: j
        """,
    )
    assert _limit(config, "d", [("j", "")]) == 1


def test_a_failing_file_leaves_nothing_behind(tmp_path: Path) -> None:
    # b.yaml fails after its first descriptor; c.yaml may then define that descriptor.
    write(tmp_path, "a.yaml", "domain: d\n")
    write(
        tmp_path,
        "b.yaml",
        """\
        domain: d
        descriptors:
          - {key: fine, rate_limit: {unit: day, requests_per_unit: 1}}
          - {key: broken, rate_limit: {unit: never}}
        """,
    )
    write(
        tmp_path,
        "c.yaml",
        "domain: d\ndescriptors:\n  - {key: fine, rate_limit: {unit: day, requests_per_unit: 2}}\n",
    )
    errors = validate_paths([tmp_path], merge_domains=True)
    assert [error.file for error in errors] == [str(tmp_path / "b.yaml")]


def _limit(config: RateLimitConfig, domain: str, entries: list[tuple[str, str]]) -> int | None:
    match = config.lookup(domain, entries)
    return None if match is None else match.rule.requests_per_unit
