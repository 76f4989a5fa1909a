"""The bench's instruction counts (scripts/benchlib/instructions.py): callgrind counts what Redis
executes for the measured decisions alone, the same from run to run, so a change to the script
shows at its true size on a machine whose CPU times move by a third between runs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.cluster import scripts_module


@pytest.fixture(scope="module")
def instructions() -> Any:
    module = scripts_module("benchlib.instructions")
    assert module.available() is None, module.available()  # scripts/bootstrap installs valgrind
    return module


def test_a_count_repeats_and_covers_only_the_measured_decisions(instructions: Any) -> None:
    script = scripts_module("benchlib.statecost").sources_of(None)["project"]
    first = instructions.count(script, 1, decisions=640)
    again = instructions.count(script, 1, decisions=640)
    twice_as_many = instructions.count(script, 1, decisions=1280)
    assert abs(again - first) / first < 0.01, (first, again)
    # Start-up, loading and seeding counted too would weigh half as much per decision here.
    assert abs(twice_as_many - first) / first < 0.02, (first, twice_as_many)


def test_counts_rank_the_script_above_the_anchor_and_grow_with_counters(instructions: Any) -> None:
    script = scripts_module("benchlib.statecost").sources_of(None)["project"]
    one, four = (instructions.count(script, d, decisions=640) for d in (1, 4))
    anchor = instructions.count(None, 1, decisions=640)
    assert anchor < one < four, (anchor, one, four)
