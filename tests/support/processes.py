"""Start real servers for the tests on free loopback ports, and stop them."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Ports this process has handed out. The kernel may give a just-released port again to the
# next bind(0), so without this two ports picked for one topology can be equal.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, never one this process has handed out before."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no fresh loopback port after 1000 tries ({len(_handed_out)} handed out)")


def wait_for_port(
    port: int,
    timeout_s: float = 10.0,
    host: str = "127.0.0.1",
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Until something listens on the port; with `process`, until that process does: one that
    exits first (a bad flag, a port someone else holds) fails at once, saying why."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                said = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
                exited = f"{process.args!r} exited with {process.returncode} before listening on {port}"
                raise RuntimeError(f"{exited}\n{said}")
            if listens_on(process.pid, port):
                return
        else:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux /proc): another
    process answering on the port does not count."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{inode}]")
    with contextlib.suppress(OSError):
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(descriptor) in inodes:
                    return True
    return False


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server); .ci/run installs it")
    return binary


@contextlib.contextmanager
def running_redis(
    port: int | None = None,
    extra_args: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    start_timeout_s: float = 10.0,
) -> Iterator[RedisServer]:
    """A throwaway redis-server on loopback, no persistence; `wrapper` runs it (valgrind ...)."""
    port = port or free_port()
    directory = Path(tempfile.mkdtemp(prefix="ratelimit-redis-"))
    # extra_args may move the port ("--port 0 --tls-port N"); give --port only once.
    port_args = () if "--port" in extra_args else ("--port", str(port))
    log = directory / "redis.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *wrapper,
                redis_server_binary(),
                *port_args,
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--dir", str(directory), "--protected-mode", "yes"),
                *extra_args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = RedisServer(port=port, process=process, directory=directory)
    try:
        wait_for_port(port, start_timeout_s, process=process, log=log)
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
