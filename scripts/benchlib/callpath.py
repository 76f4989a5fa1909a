"""CPU per ShouldRateLimit call of the service's own path, without the network: the servicer of a
`Replica` (memory backend) called directly, the way grpc.aio calls it, with Envoy-like metadata.

Run as `python -m benchlib.callpath MODE [OTLP_ENDPOINT]` with the tree to measure first on
PYTHONPATH; it prints one JSON line: {"us_per_call": ..., "calls": ...}. Process CPU time is
counted, the replica's stop included, so the tracing exporter's thread and its last batch are.
`scripts/bench --tracing` runs it for tracing off, on and sampled out, and for the server of the
revision before tracing: without gRPC's and the load's noise, a few microseconds per call show.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CALLS = 10_000
WARMUP_CALLS = 1_000
LIMITS = """\
domain: bench
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 1000000000}
"""
# What Envoy's rate limit client sends along (its traceparent when tracing, added below).
ENVOY_METADATA = (
    (":authority", "ratelimit"),
    ("user-agent", "envoy/1.40.0"),
    ("x-envoy-expected-rq-timeout-ms", "20"),
    ("x-request-id", "d372bae9-3e8b-9022-9086-b0524ab642ec"),
)


TRACE_ID, ENVOY_SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
# MODE: (serve flags, the traceparent Envoy sends, if any); {endpoint} is the OTLP receiver.
MODES = {
    "off": ([], None),
    "on": (["--otlp-endpoint", "{endpoint}", "--trace-sampling-ratio", "1"], f"00-{TRACE_ID}-{ENVOY_SPAN_ID}-01"),
    # Tracing on, the call not sampled (Envoy's flag 00 is followed): the cost of asking.
    "sampled-out": (
        ["--otlp-endpoint", "{endpoint}", "--trace-sampling-ratio", "0"],
        f"00-{TRACE_ID}-{ENVOY_SPAN_ID}-00",
    ),
}


class _Context:
    """The part of grpc.aio's ServicerContext that the servicer uses on an answered call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"the call failed: {code} {details}")


async def measure(mode: str, endpoint: str = "") -> dict[str, float]:
    from ratelimit.app import Replica
    from ratelimit.client import build_request
    from ratelimit.settings import settings_from_environment

    with tempfile.TemporaryDirectory() as work:
        limits = Path(work) / "limits.yaml"
        limits.write_text(LIMITS)
        flags = ["--config", str(limits), "--backend", "memory", "--grpc-port", "0", "--metrics-port", "0"]
        serve_flags, traceparent = MODES[mode]
        flags += [flag.format(endpoint=endpoint) for flag in serve_flags]
        replica = Replica(settings_from_environment({}, flags))
        servicer = replica.server._servicer  # the call path itself, without gRPC in front of it
        raw = build_request("bench", [[("user", "alice")]]).SerializeToString()
        context = _Context(ENVOY_METADATA + ((("traceparent", traceparent),) if traceparent else ()))
        for _ in range(WARMUP_CALLS):
            await servicer.ShouldRateLimit(raw, context)
        started = time.process_time()
        for _ in range(CALLS):
            await servicer.ShouldRateLimit(raw, context)
        await replica.stop()  # the tracing exporter's last batch
        spent = time.process_time() - started
    return {"us_per_call": spent / CALLS * 1e6, "calls": CALLS}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(*sys.argv[1:]))))
