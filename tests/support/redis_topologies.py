"""Real Redis topologies on loopback: a 3-primary/3-replica Cluster, and a Sentinel group."""

from __future__ import annotations

import collections
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import redis

from tests.support.processes import free_port, redis_server_binary, wait_for_port


@dataclass
class Node:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    args: list[str] = field(default_factory=list)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


def _start(binary: str, args: list[str], port: int, directory: Path) -> Node:
    command = [binary, *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory)
    node = Node(port, process, directory, command)
    wait_for_port(port, process=process)  # this node, not whatever else may hold the port
    return node


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, and below 65536."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_bindable(candidate) for candidate in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _node_args(port: int, directory: Path) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(directory), "--protected-mode", "yes",
    ]  # fmt: skip


@dataclass
class RedisClusterTopology:
    nodes: list[Node]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])

    def primaries(self) -> list[Node]:
        return [node for node in self.nodes if node.process.poll() is None and _role(node) == "master"]

    def primary_for_slot(self, slot: int) -> Node:
        """The node that serves `slot` now (asked of any live node)."""
        for node in self.nodes:
            if node.process.poll() is not None:
                continue
            with contextlib.suppress(redis.RedisError):
                for start, end, primary, *_replicas in node.client().execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(f"no live node serves slot {slot}")


def _role(node: Node) -> str:
    with contextlib.suppress(redis.RedisError):
        return str(node.client().info("replication")["role"])
    return "down"


@contextlib.contextmanager
def running_redis_cluster(primaries: int = 3, replicas_per_primary: int = 1) -> Iterator[RedisClusterTopology]:
    """`redis-cli --cluster create` over fresh nodes; every node is stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ratelimit-cluster-"))
    nodes: list[Node] = []
    try:
        for index in range(primaries * (1 + replicas_per_primary)):
            port = free_cluster_port()
            directory = root / str(index)
            directory.mkdir()
            args = [
                *_node_args(port, directory),
                "--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            nodes.append(_start(redis_server_binary(), args, port, directory))
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", str(replicas_per_primary), "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [n.client().cluster("info").get("cluster_state") for n in nodes]
            if all(state == "ok" for state in states):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("the cluster did not reach cluster_state:ok")
        yield RedisClusterTopology(nodes)
    finally:
        for node in nodes:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SentinelTopology:
    primary_name: str
    data_nodes: list[Node]
    sentinels: list[Node]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.primary_name}"

    def current_primary(self, timeout_s: float = 15.0) -> Node:
        """The data node a majority of the sentinels name as primary, once it is running. Right
        after a failover, a sentinel that did not lead it names the old primary a little longer
        (0.06-0.11 s here), until word of the new one reaches it: asking one sentinel alone then
        can return a node that was killed."""
        deadline = time.monotonic() + timeout_s
        while True:
            named = collections.Counter(self._named_primary_port(sentinel) for sentinel in self.sentinels)
            port, votes = named.most_common(1)[0]
            node = next((node for node in self.data_nodes if node.port == port), None)
            if node is not None and votes > len(self.sentinels) // 2 and node.process.poll() is None:
                return node
            if time.monotonic() > deadline:
                raise TimeoutError(f"no running primary named by a majority of the sentinels: {dict(named)}")
            time.sleep(0.1)

    def _named_primary_port(self, sentinel: Node) -> int | None:
        try:
            _host, port = sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.primary_name)
        except (redis.RedisError, TypeError, ValueError):  # down, or no answer for the name yet
            return None
        return int(port)


@contextlib.contextmanager
def running_sentinel_group(replicas: int = 2, sentinels: int = 3) -> Iterator[SentinelTopology]:
    """A primary, its replicas and a quorum of sentinels that fail over within seconds."""
    root = Path(tempfile.mkdtemp(prefix="ratelimit-sentinel-"))
    data_nodes: list[Node] = []
    sentinel_nodes: list[Node] = []
    name = "ratelimit-primary"
    try:
        for index in range(1 + replicas):
            port = free_port()
            directory = root / f"data{index}"
            directory.mkdir()
            args = _node_args(port, directory)
            if index:
                args += ["--replicaof", "127.0.0.1", str(data_nodes[0].port)]
            data_nodes.append(_start(redis_server_binary(), args, port, directory))
        _wait_for_replicas(data_nodes[0], replicas)
        sentinel_binary = shutil.which("redis-sentinel") or redis_server_binary()
        for index in range(sentinels):
            port = free_port()
            directory = root / f"sentinel{index}"
            directory.mkdir()
            config = directory / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {name} 127.0.0.1 {data_nodes[0].port} {sentinels // 2 + 1}\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 5000\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
            arguments = [str(config)] if sentinel_binary.endswith("sentinel") else [str(config), "--sentinel"]
            sentinel_nodes.append(_start(sentinel_binary, arguments, port, directory))
        yield SentinelTopology(name, data_nodes, sentinel_nodes)
    finally:
        for node in sentinel_nodes + data_nodes:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_replicas(primary: Node, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = primary.client().info("replication")
        online = [value for key, value in info.items() if key.startswith("slave") and value.get("state") == "online"]
        if len(online) >= count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{count} replicas did not come online")
