"""The code behind `scripts/bench` (benchmark) and `scripts/loadgen` (load generator)."""
