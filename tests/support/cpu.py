"""Keeping a thread busy on purpose, for the tests of what counts as a busy event loop."""

from __future__ import annotations

import time


def spin(seconds: float) -> None:
    """Compute (never sleep) for `seconds` of wall time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
