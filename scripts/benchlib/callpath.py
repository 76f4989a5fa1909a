"""CPU per ShouldRateLimit call of the service's own path, without the network: the servicer of a
`Replica` (memory backend) called directly, the way grpc.aio calls it, with Envoy-like metadata.

Run as `python -m benchlib.callpath MODE [OTLP_ENDPOINT]` with the tree to measure first on
PYTHONPATH: it serves bursts of calls on request (see `serve_bursts`), reporting process CPU
time, so the tracing exporter's thread is counted. `scripts/bench --tracing` starts one for
tracing off, on and unsampled, and one for the server of the revision before tracing, and asks
them in turn, burst after burst: a slow spell of a shared machine then lands on all of them,
and without gRPC's and the load's noise a few microseconds per call show.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP_CALLS = 2_000
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
    # Tracing on, the call not sampled by Envoy (its flag 00 is followed): what such a call costs.
    "unsampled": (
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


async def serve_bursts(mode: str, endpoint: str = "") -> None:
    """Answer `run N` lines on stdin with N calls (their spans exported) and the CPU per call since
    the last answer; end of input stops the replica."""
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
        tracing = getattr(replica, "tracing", None)  # None when off, or before tracing existed
        raw = build_request("bench", [[("user", "alice")]]).SerializeToString()
        context = _Context(ENVOY_METADATA + ((("traceparent", traceparent),) if traceparent else ()))
        for _ in range(WARMUP_CALLS):
            await servicer.ShouldRateLimit(raw, context)
        print("ready", flush=True)
        last = time.process_time()
        for line in sys.stdin:
            command = line.split()
            if command[:1] != ["run"]:
                break
            calls = int(command[1])
            for _ in range(calls):
                await servicer.ShouldRateLimit(raw, context)
            if tracing is not None:
                # The burst's spans leave now, in its own time: no export work spills into the
                # next burst or onto another mode's.
                tracing._provider.force_flush()
            now = time.process_time()
            print(json.dumps({"us_per_call": (now - last) / calls * 1e6}), flush=True)
            last = now
        await replica.stop()


if __name__ == "__main__":
    asyncio.run(serve_bursts(*sys.argv[1:]))
