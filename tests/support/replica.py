"""Run the service as a real process (`python -m ratelimit serve`) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ReplicaProcess:
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL to the replica and every process it started (its --workers), then reap it.
        The replica leads its own process group, so the workers go even when it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def wait_until_serving(
    target: str,
    timeout_s: float = 20.0,
    process: subprocess.Popen[bytes] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"replica exited with {process.returncode} before serving")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout_s} s")


@contextlib.contextmanager
def running_replica(
    tmp_dir: Path,
    config: Sequence[str | Path],
    *,
    redis_url: str | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
    tls_client: tuple[Path, Path] | None = None,
) -> Iterator[ReplicaProcess]:
    """A replica on free ports; `tls_ca` (and `tls_client` cert, key) when it serves TLS."""
    grpc_port, metrics_port = free_port(), free_port()
    args = [
        sys.executable,
        "-m",
        "ratelimit",
        "serve",
        "--grpc-host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
    ]
    for path in config:
        args += ["--config", str(path)]
    args += ["--redis-url", redis_url] if redis_url else ["--backend", "memory"]
    # The 15 ms default is for production; a shared 2-core test machine needs slack.
    # Tests of the timeout itself pass their own value (the last flag wins).
    args += ["--redis-timeout-ms", "500", *extra_args]
    log_path = tmp_dir / f"replica-{grpc_port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a process group of its own: kill() stops its workers too
        )
    replica = ReplicaProcess(grpc_port, metrics_port, process, log_path, args)
    try:
        credentials = None
        if tls_ca is not None:
            cert, key = tls_client if tls_client else (None, None)
            credentials = grpc.ssl_channel_credentials(
                tls_ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
            )
        wait_until_serving(replica.target, process=process, credentials=credentials)
        yield replica
    finally:
        replica.kill()
