"""Fixtures of the fault tests, and the fault table printed at the end of the run."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.faults.report import FaultTable

FAULT_TABLE = pytest.StashKey[FaultTable]()


@pytest.fixture(scope="session")
def fault_table(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultTable]:
    """Collects one row of figures per scenario; written to <pytest tmp>/fault-table.json at the end."""
    table = FaultTable()
    request.config.stash[FAULT_TABLE] = table
    yield table
    table.write_json(tmp_path_factory.getbasetemp() / "fault-table.json")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    table = config.stash.get(FAULT_TABLE, None)
    if table is None or not table.rows:
        return
    terminalreporter.write_sep("=", "fault table")
    for line in table.render():
        terminalreporter.write_line(line)
    if table.json_path is not None:
        terminalreporter.write_line(f"figures as JSON: {table.json_path}")
