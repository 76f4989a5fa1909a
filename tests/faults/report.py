"""The fault table: one row of figures per fault scenario, printed at the end of the run
and written as JSON next to pytest's temporary files."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tests.faults.load import Sample, failures_by_code, percentile


@dataclass
class FaultRow:
    scenario: str
    promise: str
    sent: int
    answered: int
    failed: dict[str, int]
    p99_during_fault_ms: float | None
    recovery_s: float | None
    figures: dict[str, Any] = field(default_factory=dict)


def fault_row(
    scenario: str,
    promise: str,
    samples: Sequence[Sample],
    *,
    during_fault: Iterable[Sample] = (),
    recovery_s: float | None = None,
    **figures: Any,
) -> FaultRow:
    fault_latencies = [sample.latency_s for sample in during_fault]
    p99 = percentile(fault_latencies, 0.99)
    return FaultRow(
        scenario=scenario,
        promise=promise,
        sent=len(samples),
        answered=sum(1 for sample in samples if sample.answered),
        failed=failures_by_code(samples),
        p99_during_fault_ms=None if math.isnan(p99) else round(p99 * 1000, 1),
        recovery_s=None if recovery_s is None else round(recovery_s, 3),
        figures={name: _rounded(value) for name, value in figures.items()},
    )


def outcome_row(scenario: str, promise: str, outcomes: Mapping[str, int], **figures: Any) -> FaultRow:
    """A row from counted outcomes: "OK"/"OVER_LIMIT" answers, else gRPC status names."""
    answers = ("OK", "OVER_LIMIT")
    return FaultRow(
        scenario=scenario,
        promise=promise,
        sent=sum(outcomes.values()),
        answered=sum(count for code, count in outcomes.items() if code in answers),
        failed={code: count for code, count in sorted(outcomes.items()) if code not in answers and count},
        p99_during_fault_ms=None,
        recovery_s=None,
        figures={name: _rounded(value) for name, value in figures.items()},
    )


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


class FaultTable:
    def __init__(self) -> None:
        self.rows: list[FaultRow] = []
        self.json_path: Path | None = None

    def add(self, row: FaultRow) -> FaultRow:
        self.rows.append(row)
        return row

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps([asdict(row) for row in self.rows], indent=2, ensure_ascii=False) + "\n")
        self.json_path = path

    def render(self) -> list[str]:
        header = ("scenario", "sent", "answered", "failed (gRPC code)", "p99 in fault ms", "recovery s")
        cells = [header]
        for row in self.rows:
            failed = ", ".join(f"{code} {count}" for code, count in row.failed.items()) or "-"
            cells.append(
                (
                    row.scenario,
                    str(row.sent),
                    str(row.answered),
                    failed,
                    "-" if row.p99_during_fault_ms is None else f"{row.p99_during_fault_ms:g}",
                    "-" if row.recovery_s is None else f"{row.recovery_s:g}",
                )
            )
        widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
        lines = []
        for number, line in enumerate(cells):
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            if number == 0:
                lines.append("  ".join("-" * width for width in widths))
        for row in self.rows:
            details = ", ".join(f"{name}={value}" for name, value in row.figures.items())
            lines.append(f"* {row.scenario}: {row.promise}" + (f" [{details}]" if details else ""))
        return lines
