"""The test helpers' own promises, where a broken helper would make other tests flaky."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.faults.probes import wait_until
from tests.support.processes import free_port, running_redis
from tests.support.redis_topologies import running_sentinel_group
from tests.support.replica import running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"


def test_free_ports_are_never_handed_out_twice() -> None:
    # The kernel reuses released ports for bind(0); a topology of many ports picked one after
    # another must still get distinct ones (a cluster once got the same port for two services).
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname() == ("127.0.0.1", port)


def test_running_redis_fails_at_once_when_its_server_dies() -> None:
    with pytest.raises(RuntimeError, match="exited with"), running_redis(extra_args=["--no-such-option", "x"]):
        pass


def test_running_redis_is_not_fooled_by_another_process_on_its_port() -> None:
    """Something else answers on the port and our redis-server cannot bind it: an error, not a
    test talking to the wrong server."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with"), running_redis(port=port):
            pass


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_killing_a_replica_stops_its_workers_too(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML], extra_args=["--workers", "2"]) as replica:
        workers = [
            int(pid)
            for pid in subprocess.run(
                ["pgrep", "-P", str(replica.process.pid)], capture_output=True, text=True, timeout=10
            ).stdout.split()
        ]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        replica.kill()
        assert not alive(replica.process.pid)
        # SIGKILL is delivered at once, but a process takes a moment to be gone.
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 5.0) is not None, workers


def test_the_sentinel_groups_primary_is_never_a_killed_node() -> None:
    """Right after the primary dies every sentinel still names it, and the one that did not lead
    the failover names it a little longer: asked then, the helper waits for a running primary
    that a majority names (a test once read its counters from the killed node)."""
    with running_sentinel_group() as group:
        old = group.current_primary()
        old.kill()
        new = group.current_primary()
        assert new.port != old.port
        assert new.process.poll() is None
        assert new.client().ping()
