"""The `ratelimit` command as an operator meets it: each test runs it and reads its output."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

from ratelimit.cli import _event_loop_runner
from ratelimit.client import RateLimitClient
from ratelimit.settings import OPTIONS, env_name, settings_from_environment
from tests.support.processes import free_port
from tests.support.replica import PROJECT_ROOT, running_replica

SERVICE_YAML = Path(__file__).parent / "data" / "service.yaml"
UNITS = "second, minute, hour, day, week, month, year"


def ratelimit(
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    """`ratelimit ARGS...` as a shell would run it, with a wide terminal so help lines do not wrap."""
    return subprocess.run(
        [sys.executable, "-m", "ratelimit", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=PROJECT_ROOT,
        env={**os.environ, "COLUMNS": "400", **(env or {})},
    )


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


# --- serve: start-up ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one process", "workers"])
def test_a_taken_metrics_port_is_one_clear_line_naming_port_and_flag(listening_port: int, workers: list[str]) -> None:
    done = ratelimit(
        "serve", "--config", str(SERVICE_YAML), "--backend", "memory", "--grpc-port", "0",
        "--metrics-port", str(listening_port), *workers,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"ratelimit: cannot bind the metrics port 127.0.0.1:{listening_port} (Address already in use): "
        "choose another with --metrics-port (RATELIMIT_METRICS_PORT), or 0 to turn the exporter off"
    ]


def test_the_start_line_says_what_was_loaded(tmp_path: Path) -> None:
    other = write(tmp_path, "other.yaml", "domain: other\ndescriptors:\n  - {key: k, rate_limit: {unlimited: true}}\n")
    with running_replica(tmp_path, [SERVICE_YAML, other]) as replica:
        log = replica.log()
    started = [line for line in log.splitlines() if "serving RateLimitService" in line]
    assert len(started) == 1
    assert started[0].endswith("limits: 2 domains (svc, other), 11 rules from 2 files")


def test_serve_reports_every_error_of_every_bad_file_and_does_not_start(tmp_path: Path) -> None:
    first = write(tmp_path, "limits/a.yaml", "domain: a\nbogus: 1\n")
    second = write(tmp_path, "limits/b.yaml", "domain: b\ndescriptors:\n  - {key: k, rate_limit: {unit: fortnight}}\n")
    done = ratelimit("serve", "--config", str(tmp_path / "limits"), "--backend", "memory", "--grpc-port", "0")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "ratelimit: invalid limits config (--config, RATELIMIT_CONFIG), not starting (2 errors):",
        f"{first}: line 2: config error, unknown key 'bogus'",
        f"{second}: line 3: invalid rate limit unit 'fortnight' for key 'unit' (valid units: {UNITS})",
    ]


def test_serve_refuses_an_empty_config_folder(tmp_path: Path) -> None:
    done = ratelimit("serve", "--config", str(tmp_path), "--backend", "memory", "--grpc-port", "0")
    assert done.returncode == 2
    assert (
        f"{tmp_path}: no config files (*.yaml, *.yml) in this folder, so it holds no domain" in done.stderr.splitlines()
    )
    assert "Traceback" not in done.stderr


# --- flags, environment and --help ------------------------------------------------------


def _answers_after_the_limit(tmp_path: Path, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Overall codes of two calls on a 1-a-minute rule, on a replica started with `args`."""
    with (
        running_replica(tmp_path, [SERVICE_YAML], extra_args=args, env=dict(env)) as replica,
        RateLimitClient(replica.target) as client,
    ):
        return [client.should_rate_limit("svc", [[("tight", "t")]]).overall_code for _ in range(2)]


def test_a_bare_boolean_flag_turns_it_on(tmp_path: Path) -> None:
    assert _answers_after_the_limit(tmp_path, ["--shadow-mode"], {}) == ["OK", "OK"]


def test_the_no_form_turns_it_off_over_the_environment(tmp_path: Path) -> None:
    env = {"RATELIMIT_SHADOW_MODE": "true"}
    assert _answers_after_the_limit(tmp_path, [], env) == ["OK", "OK"]
    assert _answers_after_the_limit(tmp_path, ["--no-shadow-mode"], env) == ["OK", "OVER_LIMIT"]


def test_boolean_flags_refuse_a_value_on_the_no_form_and_a_non_boolean() -> None:
    refused = ratelimit("serve", "--no-shadow-mode", "false")
    assert refused.returncode == 2
    assert "--no-shadow-mode takes no value" in refused.stderr
    bad_env = ratelimit("serve", env={"RATELIMIT_SHADOW_MODE": "maybe"})
    assert bad_env.returncode == 2
    assert "RATELIMIT_SHADOW_MODE='maybe': not a boolean" in bad_env.stderr


def test_an_explicit_value_still_works_as_before() -> None:
    # Scripts written for the flags that took a value (the benchmark among them) keep working.
    settings = settings_from_environment(
        {"RATELIMIT_RESPONSE_HEADERS": "true"},
        ["--redis-batching", "false", "--over-limit-cache=no", "--shadow-mode", "--no-response-headers"],
    )
    assert (settings.redis_batching, settings.over_limit_cache) == (False, False)
    assert (settings.shadow_mode, settings.response_headers) == (True, False)


def test_serve_help_shows_every_default_and_environment_variable() -> None:
    done = ratelimit("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for option in OPTIONS:
        env = env_name(option.flag)
        assert f"; env {env}]" in text, option.flag
        if isinstance(option.default, bool):
            assert f"{option.flag} [true|false], --no-{option.flag[2:]}" in text
            assert f"[default {str(option.default).lower()}; env {env}]" in text
    assert "[default 9102; env RATELIMIT_METRICS_PORT]" in text
    assert "[default none; env RATELIMIT_CONFIG]" in text


def test_check_and_validate_config_help_show_their_defaults() -> None:
    check = " ".join(ratelimit("check", "--help").stdout.split())
    assert "[default 127.0.0.1:8081]" in check and "[default 2.0]" in check
    assert "0 when the answer is OK, 1 when it is OVER_LIMIT, 2 on an error" in check
    validate = " ".join(ratelimit("validate-config", "--help").stdout.split())
    assert "--merge-domains, --no-merge-domains" in validate
    assert "[default false; env RATELIMIT_MERGE_DOMAINS]" in validate


# --- validate-config ---------------------------------------------------------------------


def test_validate_config_prints_every_error_with_file_line_and_key(tmp_path: Path) -> None:
    limits = tmp_path / "limits"
    api = write(
        limits,
        "api.yaml",
        """\
        domain: api
        descriptors:
          - key: user
            rate_limit:
              unit: minute
              requests_per_unit: 5
            rate_limit:
              unit: hour
          - key: ip
            rate_limit: {requests_per_unit: 3}
        """,
    )
    web = write(
        limits,
        "web.yaml",
        """\
        domain: web
        descriptors:
          - key: path
            rate_limit: {unit: fortnight, requests_per_unit: 1}
          - key: path
            ratelimit: {unit: second}
        """,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    done = ratelimit("validate-config", str(limits), str(empty))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{api}: line 7: config error, duplicate key 'rate_limit' (first on line 4; YAML would keep only the last one)",
        f"{api}: line 10: missing rate limit unit for 'api.ip': set key 'unit' to one of {UNITS} (or unlimited: true)",
        f"{web}: line 4: invalid rate limit unit 'fortnight' for key 'unit' (valid units: {UNITS})",
        f"{web}: line 5: duplicate descriptor composite key 'web.path'",
        f"{web}: line 6: config error, unknown key 'ratelimit'",
        f"{empty}: no config files (*.yaml, *.yml) in this folder, so it holds no domain",
    ]


def test_validate_config_says_what_a_valid_config_holds() -> None:
    done = ratelimit("validate-config", str(SERVICE_YAML))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ok: {SERVICE_YAML}: 1 domain (svc), 10 rules from 1 file\n"


def test_validate_config_merge_domains_is_a_bare_flag_with_a_no_form(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "domain: d\ndescriptors:\n  - {key: a, rate_limit: {unit: day}}\n")
    second = write(tmp_path, "b.yaml", "domain: d\ndescriptors:\n  - {key: b, rate_limit: {unit: day}}\n")
    assert ratelimit("validate-config", "--merge-domains", str(first), str(second)).returncode == 0
    refused = ratelimit(
        "validate-config", "--no-merge-domains", str(first), str(second), env={"RATELIMIT_MERGE_DOMAINS": "true"}
    )
    assert refused.returncode == 1
    assert f"{second}: line 1: duplicate domain 'd' in config file" in refused.stderr


# --- check -------------------------------------------------------------------------------


def test_check_exits_0_on_ok_1_on_over_limit_2_on_error(tmp_path: Path) -> None:
    with running_replica(tmp_path, [SERVICE_YAML]) as replica:
        ask = ("check", "--target", replica.target, "--domain", "svc", "--descriptor", "tight=exit-codes")
        ok, over = ratelimit(*ask), ratelimit(*ask)
    unreachable = ratelimit(
        "check", "--target", f"127.0.0.1:{free_port()}", "--timeout", "0.5", "--domain", "svc",
        "--descriptor", "tight=x",
    )  # fmt: skip
    assert (ok.returncode, ok.stdout.splitlines()[-1]) == (0, "overall: OK")
    assert (over.returncode, over.stdout.splitlines()[-1]) == (1, "overall: OVER_LIMIT")
    assert unreachable.returncode == 2
    assert unreachable.stderr.startswith("ratelimit check: UNAVAILABLE: ")
    assert "Traceback" not in unreachable.stderr


def test_an_unknown_redis_url_scheme_lists_every_scheme_there_is() -> None:
    done = ratelimit("serve", "--config", str(SERVICE_YAML), "--redis-url", "http://redis:6379", "--grpc-port", "0")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ratelimit: unsupported Redis URL scheme 'http': use redis:// or rediss:// (TLS) or unix:// for one server, "
        "redis+cluster:// (rediss+cluster://) for a Redis Cluster, redis+sentinel:// (rediss+sentinel://) for Sentinel"
    ]


def test_serve_runs_on_asyncios_own_event_loop_unless_told_otherwise() -> None:
    # The bench's project rows and the pipeline window's saturation gate are measured on it.
    loops: list[str] = []

    async def main() -> None:
        loops.append(type(asyncio.get_running_loop()).__module__)

    for choice in (settings_from_environment({}).event_loop, "uvloop"):
        _event_loop_runner(choice)(main())
    assert loops[0].startswith("asyncio") and loops[1].startswith("uvloop"), loops
