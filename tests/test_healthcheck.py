"""The image's healthcheck asks the replica where and how it listens: plaintext, TLS, mTLS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.certs import make_ca
from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"
HEALTHCHECK = [sys.executable, str(Path(__file__).parent.parent / "scripts" / "healthcheck.py"), "--timeout", "3"]


def healthcheck(settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # As the image runs it: no target, only the server's own RATELIMIT_* environment.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RATELIMIT_")}
    return subprocess.run(HEALTHCHECK, env={**env, **settings}, capture_output=True, text=True, timeout=30)


def port_of(target: str) -> str:
    return target.rsplit(":", 1)[1]


def test_a_wildcard_host_is_asked_on_loopback(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=["--grpc-host", "0.0.0.0"]) as replica:
        settings = {"RATELIMIT_GRPC_HOST": "0.0.0.0", "RATELIMIT_GRPC_PORT": port_of(replica.target)}
        result = healthcheck(settings)
        assert result.returncode == 0, result.stderr
        assert "127.0.0.1" in result.stdout and "SERVING" in result.stdout


def test_a_tls_server_is_asked_over_tls_and_verified(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=pki.ca_cert) as replica:
        settings = {
            "RATELIMIT_GRPC_PORT": port_of(replica.target),
            "RATELIMIT_TLS_CERT_FILE": str(cert),
            "RATELIMIT_TLS_KEY_FILE": str(key),
        }
        trusted = healthcheck({**settings, "RATELIMIT_HEALTHCHECK_CA_FILE": str(pki.ca_cert)})
        assert trusted.returncode == 0, trusted.stderr
        # A server the probe cannot verify is not reported healthy.
        other = make_ca(tmp_path / "other", "other-ca")
        assert healthcheck({**settings, "RATELIMIT_HEALTHCHECK_CA_FILE": str(other.ca_cert)}).returncode == 1


def test_an_mtls_server_is_asked_with_the_healthcheck_client_certificate(tmp_path: Path) -> None:
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    client_cert, client_key = pki.issue(tmp_path / "pki", "healthcheck", server=False)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-client-ca-file", str(pki.ca_cert)]
    with running_replica(
        tmp_path, [SERVICE_YAML], extra_args=args, tls_ca=pki.ca_cert, tls_client=(client_cert, client_key)
    ) as replica:
        settings = {
            "RATELIMIT_GRPC_PORT": port_of(replica.target),
            "RATELIMIT_TLS_CERT_FILE": str(cert),
            "RATELIMIT_TLS_KEY_FILE": str(key),
            "RATELIMIT_TLS_CLIENT_CA_FILE": str(pki.ca_cert),
        }
        without_identity = healthcheck(settings)
        assert without_identity.returncode == 1
        assert "RATELIMIT_HEALTHCHECK_CERT_FILE" in without_identity.stderr
        identity = {
            "RATELIMIT_HEALTHCHECK_CERT_FILE": str(client_cert),
            "RATELIMIT_HEALTHCHECK_KEY_FILE": str(client_key),
        }
        with_identity = healthcheck({**settings, **identity})
        assert with_identity.returncode == 0, with_identity.stderr
