"""The README stays true: its tables and commands match the code (its examples: test_readme_examples)."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry

from ratelimit.metrics import Metrics
from ratelimit.settings import OPTIONS, env_name, shown_default

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table_with_its_environment_variable() -> None:
    for option in OPTIONS:
        assert f"| `{option.flag}` | `{env_name(option.flag)}` |" in README, option.flag


def test_the_two_set_up_commands_exist_and_are_executable() -> None:
    for command in ("scripts/cluster up", "scripts/test"):
        assert command in README
        script = ROOT / command.split()[0]
        assert script.is_file() and os.access(script, os.X_OK), script


def test_ci_runs_the_readme_test_command() -> None:
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_the_settings_table_shows_each_default_as_help_does() -> None:
    for option in OPTIONS:
        row = next(line for line in README.splitlines() if line.startswith(f"| `{option.flag}` |"))
        shown = row.split(" | ")[2].strip("`")
        assert shown == ("(none)" if shown_default(option) == "none" else shown_default(option)), option.flag


def test_every_metric_is_in_the_metrics_table() -> None:
    table = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    families = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    assert families, "no metrics collected"
    for name in families:
        assert f"`{name}" in table, name
    assert "`circuit_open`" in table  # the breaker's own failure kind


def test_the_readme_says_where_the_conformance_data_comes_from() -> None:
    assert "RATELIMIT_CONFORMANCE_DIR" in README
    assert "../shared/conformance/envoy-ratelimit/" in README
    assert "RATELIMIT_CONFORMANCE_DIR" in (ROOT / "tests" / "test_config_conformance.py").read_text()
