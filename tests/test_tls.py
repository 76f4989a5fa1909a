"""gRPC over TLS and mTLS, certificates reloaded on change."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimit.client import RateLimitClient, TlsOptions
from tests.faults.probes import metric_value, scrape, wait_until
from tests.support.certs import make_ca
from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"


def ask(target: str, tls: TlsOptions | None) -> str:
    with RateLimitClient(target, timeout_s=5, tls=tls) as client:
        return client.should_rate_limit("svc", [[("roomy", "tls")]]).overall_code


def test_tls_serves_trusting_clients_and_refuses_plaintext(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=pki.ca_cert) as replica:
        assert ask(replica.target, TlsOptions.from_files(str(pki.ca_cert))) == "OK"
        with pytest.raises(grpc.RpcError) as plaintext:
            ask(replica.target, None)
        assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
        other_ca = make_ca(tmp_path / "other", "other-ca")
        with pytest.raises(grpc.RpcError) as untrusted:
            ask(replica.target, TlsOptions.from_files(str(other_ca.ca_cert)))
        assert untrusted.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_valid_certificate(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    client_cert, client_key = pki.issue(tmp_path / "pki", "client", server=False)
    rogue = make_ca(tmp_path / "rogue", "rogue-ca")
    rogue_cert, rogue_key = rogue.issue(tmp_path / "rogue", "intruder", server=False)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-client-ca-file", str(pki.ca_cert)]
    with running_replica(
        tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=pki.ca_cert, tls_client=(client_cert, client_key)
    ) as replica:
        good = TlsOptions.from_files(str(pki.ca_cert), str(client_cert), str(client_key))
        assert ask(replica.target, good) == "OK"
        for refused in (
            TlsOptions.from_files(str(pki.ca_cert)),  # no certificate
            TlsOptions.from_files(str(pki.ca_cert), str(rogue_cert), str(rogue_key)),  # signed by someone else
        ):
            with pytest.raises(grpc.RpcError) as caught:
                ask(replica.target, refused)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def served_copies(directory: Path, cert: Path, key: Path) -> tuple[Path, Path, list[str]]:
    """Copies of the pair that a test may swap under a replica, and the flags that serve them."""
    live_cert, live_key = directory / "live.crt", directory / "live.key"
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    return live_cert, live_key, ["--tls-cert-file", str(live_cert), "--tls-key-file", str(live_key)]


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    first = make_ca(tmp_path / "first", "first-ca")
    second = make_ca(tmp_path / "second", "second-ca")
    cert, key = first.issue(tmp_path / "first", "server", server=True)
    new_cert, new_key = second.issue(tmp_path / "second", "server", server=True)
    live_cert, live_key, args = served_copies(tmp_path, cert, key)
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=first.ca_cert) as replica:
        assert ask(replica.target, TlsOptions.from_files(str(first.ca_cert))) == "OK"
        for source, target in ((new_key, live_key), (new_cert, live_cert)):
            staged = target.with_suffix(".new")
            shutil.copy(source, staged)
            os.replace(staged, target)
        time.sleep(0.1)
        assert ask(replica.target, TlsOptions.from_files(str(second.ca_cert))) == "OK"
        with pytest.raises(grpc.RpcError):
            ask(replica.target, TlsOptions.from_files(str(first.ca_cert)))


def tls_health(target: str, ca_cert: Path) -> str:
    credentials = grpc.ssl_channel_credentials(ca_cert.read_bytes())
    with grpc.secure_channel(target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="ratelimit.Tls"), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@pytest.mark.parametrize("broken", ["garbage-pem", "mismatched-key"])
def test_an_invalid_certificate_change_is_refused_and_the_old_one_kept(tmp_path: Path, broken: str) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    _other_cert, other_key = pki.issue(tmp_path / "pki", "other", server=True)
    _live_cert, live_key, args = served_copies(tmp_path, cert, key)
    trusting = TlsOptions.from_files(str(pki.ca_cert))
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=pki.ca_cert) as replica:
        assert tls_health(replica.target, pki.ca_cert) == "SERVING"
        staged = live_key.with_suffix(".new")
        if broken == "garbage-pem":
            staged.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        else:
            shutil.copy(other_key, staged)
        os.replace(staged, live_key)
        # Each new connection asks for the certificate: the old one still serves every one.
        for _ in range(3):
            assert ask(replica.target, trusting) == "OK"
        assert wait_until(lambda: tls_health(replica.target, pki.ca_cert) == "NOT_SERVING", timeout_s=5) is not None
        metrics = scrape(replica.metrics_port)
        assert metric_value(metrics, "ratelimit_tls_certificate_healthy") == 0
        shutil.copy(key, staged)  # the valid key back: in force again
        os.replace(staged, live_key)
        assert ask(replica.target, trusting) == "OK"
        assert wait_until(lambda: tls_health(replica.target, pki.ca_cert) == "SERVING", timeout_s=5) is not None
        assert "Traceback" not in replica.log()
