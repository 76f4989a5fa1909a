"""Security faults under load: Redis refusing the replica's credentials, and clients
without a valid certificate at an mTLS replica. (The features themselves are tested in
tests/test_redis_security.py and tests/test_tls.py.)"""

from __future__ import annotations

from pathlib import Path

import grpc

from ratelimit.client import build_request
from tests.faults import probes
from tests.faults.load import Load
from tests.faults.report import FaultTable, fault_row
from tests.support.certs import make_ca
from tests.support.processes import running_redis
from tests.support.replica import running_replica

LIMITS = "domain: faults\ndescriptors:\n  - key: user\n    rate_limit: {unit: hour, requests_per_unit: 1000000}\n"
REQUEST = build_request("faults", [[("user", "secure")]])
SECRET = "right-Pa55word"


def test_redis_refusing_the_password_is_a_backend_failure_that_leaks_no_secret(
    tmp_path: Path, fault_table: FaultTable
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    acl = ["--user", "default", "off", "--user", "limiter", "on", f">{SECRET}", "~*", "&*", "+@all"]
    wrong = "Wr0ng-Pa55word"
    with running_redis(extra_args=acl) as server:
        url = f"redis://limiter:{wrong}@127.0.0.1:{server.port}/0"
        with running_replica(tmp_path, [limits], redis_url=url, extra_args=["--redis-timeout-ms", "200"]) as replica:
            load = Load([replica.target], lambda _index: REQUEST, rate_per_s=100, max_requests=150, max_duration_s=1.5)
            load.start()
            samples = load.join()
            body = probes.scrape(replica.metrics_port)
        log = replica.log()
    fault_table.add(
        fault_row(
            "redis refuses the password (ACL user)",
            "answered UNAVAILABLE (failure mode) without hanging; the password shows nowhere",
            samples,
            during_fault=samples,
            breaker_open=probes.metric_value(body, "ratelimit_backend_circuit_open"),
        )
    )
    assert len(samples) >= 100
    assert {s.code for s in samples} == {"UNAVAILABLE"}
    assert not any(wrong in s.details for s in samples)
    assert wrong not in log and wrong not in body
    assert "Traceback" not in log


def test_clients_without_a_valid_certificate_are_refused_while_trusted_ones_are_served(
    tmp_path: Path, fault_table: FaultTable
) -> None:
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    pki = make_ca(tmp_path / "pki")
    cert, key = pki.issue(tmp_path / "pki", "server", server=True)
    client_cert, client_key = pki.issue(tmp_path / "pki", "client", server=False)
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-client-ca-file", str(pki.ca_cert)]
    trusted = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes())
    anonymous = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())  # TLS, but no client certificate
    with (
        running_redis() as server,
        running_replica(
            tmp_path,
            [limits],
            redis_url=server.url,
            extra_args=[*args, "--redis-timeout-ms", "1000"],
            tls_ca=pki.ca_cert,
            tls_client=(client_cert, client_key),
        ) as replica,
    ):
        served = Load(
            [replica.target], lambda _index: REQUEST, rate_per_s=100, max_requests=150, max_duration_s=1.5,
            credentials=trusted,
        )  # fmt: skip
        refused = Load(
            [replica.target], lambda _index: REQUEST, rate_per_s=20, max_requests=30, max_duration_s=1.5,
            credentials=anonymous, wait_for_channels=False,
        )  # fmt: skip
        served.start()
        refused.start()
        good, bad = served.join(), refused.join()
        log = replica.log()
    fault_table.add(
        fault_row(
            "mTLS: clients without a certificate beside trusted ones",
            "refused in the handshake (UNAVAILABLE); trusted clients all served",
            good + bad,
            during_fault=good,
            trusted_answered=sum(1 for s in good if s.answered),
            anonymous_refused=sum(1 for s in bad if s.code == "UNAVAILABLE"),
        )
    )
    assert len(good) >= 100 and len(bad) >= 20
    assert [s for s in good if not (s.decided and s.overall == "OK")] == []
    assert {s.code for s in bad} == {"UNAVAILABLE"}
    assert "Traceback" not in log
