"""Redis AUTH (user and password) and TLS (rediss://); secrets never reach logs or metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from ratelimit.client import RateLimitClient
from tests.support.certs import make_ca
from tests.support.processes import free_port, running_redis
from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"
SECRET = "s3cret-Pa55word"


def test_acl_user_over_tls_works_and_the_password_is_never_shown(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "redis", server=True)
    tls_port = free_port()
    redis_args = [
        "--port", "0", "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(pki.ca_cert),
        "--tls-auth-clients", "no",
        "--user", "default", "off",
        "--user", "limiter", "on", f">{SECRET}", "~*", "&*", "+@all",
    ]  # fmt: skip
    with running_redis(tls_port, redis_args):
        url = f"rediss://limiter:{SECRET}@127.0.0.1:{tls_port}/0"
        with running_replica(
            tmp_path, [SERVICE_YAML], redis_url=url, extra_args=["--redis-ca-file", str(pki.ca_cert)]
        ) as replica:
            with RateLimitClient(replica.target) as client:
                codes = [client.should_rate_limit("svc", [[("user", "tls")]]).overall_code for _ in range(4)]
            assert codes == ["OK", "OK", "OK", "OVER_LIMIT"]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read()
        assert SECRET not in replica.log() and "limiter:***@" in replica.log()
        assert SECRET.encode() not in metrics

        wrong = f"rediss://limiter:not-the-password@127.0.0.1:{tls_port}/0"
        with running_replica(
            tmp_path, [SERVICE_YAML], redis_url=wrong, extra_args=["--redis-ca-file", str(pki.ca_cert)]
        ) as replica:
            with RateLimitClient(replica.target) as client, pytest.raises(grpc.RpcError) as refused:
                client.should_rate_limit("svc", [[("user", "tls")]])
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "not-the-password" not in (refused.value.details() or "")
        assert "not-the-password" not in replica.log()
