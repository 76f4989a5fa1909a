"""The README stays true: its settings table and commands match the code."""

from __future__ import annotations

import os
from pathlib import Path

from ratelimit.settings import OPTIONS, env_name

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
