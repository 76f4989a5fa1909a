"""Process settings: flags and environment in, one immutable Settings out.

Every `serve` flag has an environment variable (`RATELIMIT_` + the flag's name in upper
case with `-` as `_`); a flag given on the command line wins over the environment.
Settings are not rules: the limits themselves live in the YAML config.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ratelimit.config.model import UNIT_NAMES, Unit
from ratelimit.guards import OverridePolicy, RequestCaps
from ratelimit.limiter.redis_url import parse_redis_url
from ratelimit.service import MAX_UINT32, FailureMode

ENV_PREFIX = "RATELIMIT_"


def _dest(option: Option) -> str:
    return option.flag.lstrip("-").replace("-", "_")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    """A number parser that refuses values outside [low, high] (and NaN)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not between {low:g} and {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_ratio = _bounded(float, 0.0, 1.0)

# A pipeline window past this is no longer a batching delay but an outage of its own.
MAX_PIPELINE_WINDOW_US = 10_000.0


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Option:
    flag: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    repeated: bool = False


# One table drives the parser, the environment and the README's settings table.
OPTIONS: tuple[Option, ...] = (
    Option(
        "--config",
        [],
        "limits config: a YAML file or a directory of them (repeatable; env: comma-separated)",
        repeated=True,
    ),
    Option("--backend", "redis", "counter store", choices=("redis", "memory")),
    Option(
        "--redis-url",
        "redis://127.0.0.1:6379/0",
        "Redis URL: redis://, rediss:// (TLS), unix://, redis+cluster://, redis+sentinel:// (user:password@ for AUTH)",
    ),
    Option("--redis-timeout-ms", 15.0, "per-call Redis timeout, below Envoy's 20 ms default RLS timeout", float),
    Option(
        "--redis-pool-size",
        64,
        "Cluster and Sentinel: redis-py connections per replica; one server (one pipelined connection): "
        "calls out at once with batching off",
        int,
    ),
    Option("--key-prefix", "ratelimit:", "prefix of every Redis key"),
    Option("--breaker-failures", 5, "consecutive Redis failures that open the circuit breaker (fail fast)", int),
    Option("--breaker-cooldown-ms", 500.0, "how long the open breaker fails fast before probing Redis again", float),
    Option(
        "--redis-batching",
        True,
        "while two writes to Redis await replies, send the script calls that queue meanwhile in one write",
        _bool,
    ),
    Option(
        "--redis-pipeline-window-us",
        5000.0,
        "with batching, hold a script call up to this long (microseconds) when the previous one came less "
        "than this long ago, so that calls close together share one write to Redis (less Redis and server "
        "CPU under load, up to this much latency); by default only while the replica is saturated "
        "(--redis-pipeline-min-busy); a call after a quiet spell goes at once; 0: off",
        _bounded(float, 0.0, MAX_PIPELINE_WINDOW_US),
    ),
    Option(
        "--redis-pipeline-limit",
        0,
        "with a pipeline window: send the calls held as soon as this many are (0: no limit)",
        _bounded(int, 0, 1_000_000),
    ),
    Option(
        "--redis-pipeline-min-rate",
        0.0,
        "with a pipeline window: hold calls only while they arrived faster than this many per second "
        "over the last tenth of a second, so a replica below that load never waits; "
        "0: whenever the previous call came within the window",
        _bounded(float, 0.0, 10_000_000.0),
    ),
    Option(
        "--redis-pipeline-min-busy",
        0.85,
        "with a pipeline window: hold calls only while the event loop's thread is saturated: it ran or "
        "waited for a CPU at least this share (0-1) of two tenths of a second in a row, until a tenth "
        "falls below 0.7 times it; 0: whenever the previous call came within the window",
        _ratio,
    ),
    Option("--over-limit-cache", True, "answer requests for counters known full locally, until Redis's reset", _bool),
    Option(
        "--over-limit-cache-entries",
        100_000,
        "most counters the over-limit cache remembers (about 270 bytes each); the oldest go first",
        int,
    ),
    Option("--workers", 1, "server processes sharing the gRPC port (SO_REUSEPORT); metrics report their sum", int),
    Option("--reuse-port", False, "let other processes bind the same gRPC port (set for --workers)", _bool),
    Option(
        "--event-loop",
        "asyncio",
        "event loop: asyncio (the one the bench and the pipeline window's gate are measured on), uvloop, "
        "or auto (uvloop when installed)",
        choices=("auto", "asyncio", "uvloop"),
    ),
    Option("--redis-ca-file", "", "CA bundle that signs Redis's certificate (rediss://)"),
    Option("--redis-cert-file", "", "client certificate for Redis TLS"),
    Option("--redis-key-file", "", "client key for Redis TLS"),
    Option("--grpc-host", "127.0.0.1", "gRPC bind address (0.0.0.0: every interface, as in the image)"),
    Option("--grpc-port", 8081, "gRPC port (RateLimitService, health, reflection)", int),
    Option("--tls-cert-file", "", "serve gRPC over TLS with this certificate chain (PEM); reloaded on change"),
    Option("--tls-key-file", "", "private key of --tls-cert-file (PEM)"),
    Option("--tls-client-ca-file", "", "require client certificates signed by this CA (mTLS)"),
    Option("--metrics-host", "127.0.0.1", "Prometheus exporter bind address (0.0.0.0: every interface)"),
    Option("--metrics-port", 9102, "Prometheus exporter port (HTTP /metrics); 0 disables the exporter", int),
    Option(
        "--otlp-endpoint",
        "",
        "send an OpenTelemetry span per ShouldRateLimit to this OTLP/gRPC collector: http://HOST:PORT "
        "(plaintext), https://HOST:PORT (TLS) or HOST:PORT; empty: tracing off (needs the tracing extra)",
    ),
    Option(
        "--trace-sampling-ratio",
        1.0,
        "share of calls traced among those that arrive without a trace; a caller's traceparent "
        "sampled flag (Envoy's decision) is followed",
        _ratio,
    ),
    Option(
        "--on-backend-error",
        "unavailable",
        "answer when Redis fails: unavailable (gRPC UNAVAILABLE, so Envoy's failure_mode_deny decides), "
        "allow (OK) or deny (OVER_LIMIT)",
        choices=tuple(mode.value for mode in FailureMode),
    ),
    Option("--shadow-mode", False, "global shadow mode: count and report, never answer OVER_LIMIT", _bool),
    Option("--merge-domains", False, "merge files that share a domain instead of rejecting them", _bool),
    Option("--max-descriptors", 64, "most descriptors accepted in one request", int),
    Option("--max-descriptor-entries", 32, "most entries accepted in one descriptor", int),
    Option("--max-entry-bytes", 4096, "longest descriptor key, value or domain accepted, in UTF-8 bytes", int),
    Option(
        "--limit-overrides",
        "allow",
        "limit overrides in requests (the caller picks counter, unit and limit): allow, within the caps "
        "below, or refuse (INVALID_ARGUMENT)",
        choices=tuple(policy.value for policy in OverridePolicy),
    ),
    Option(
        "--max-override-unit",
        "day",
        "longest unit a limit override may use (it bounds the TTL of the keys overrides create)",
        str.lower,
        choices=UNIT_NAMES,
    ),
    Option("--max-override-requests-per-unit", MAX_UINT32, "largest requests_per_unit a limit override may set", int),
    Option("--response-headers", False, "add RateLimit-Limit/-Remaining/-Reset response headers", _bool),
    Option("--header-limit", "RateLimit-Limit", "name of the limit header"),
    Option("--header-remaining", "RateLimit-Remaining", "name of the remaining header"),
    Option("--header-reset", "RateLimit-Reset", "name of the reset header"),
    Option("--config-poll-s", 1.0, "how often the config files are checked for changes; 0 disables reload", float),
    Option(
        "--shutdown-delay-s",
        0.0,
        "after SIGTERM, keep answering this long with health NOT_SERVING, so that load balancers "
        "(Envoy's health checks) move away before calls are refused; a second signal skips the rest",
        float,
    ),
    Option("--shutdown-grace-s", 10.0, "how long SIGTERM waits for in-flight calls (after the delay)", float),
    Option("--log-level", "INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
)


@dataclass(frozen=True)
class Settings:
    """Every serve setting; the defaults live in OPTIONS only."""

    config: tuple[str, ...]
    backend: str
    redis_url: str
    redis_timeout_ms: float
    redis_pool_size: int
    key_prefix: str
    breaker_failures: int
    breaker_cooldown_ms: float
    redis_batching: bool
    redis_pipeline_window_us: float
    redis_pipeline_limit: int
    redis_pipeline_min_rate: float
    redis_pipeline_min_busy: float
    over_limit_cache: bool
    over_limit_cache_entries: int
    workers: int
    reuse_port: bool
    event_loop: str
    redis_ca_file: str
    redis_cert_file: str
    redis_key_file: str
    grpc_host: str
    grpc_port: int
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    metrics_host: str
    metrics_port: int
    otlp_endpoint: str
    trace_sampling_ratio: float
    on_backend_error: FailureMode
    shadow_mode: bool
    merge_domains: bool
    max_descriptors: int
    max_descriptor_entries: int
    max_entry_bytes: int
    limit_overrides: str
    max_override_unit: str
    max_override_requests_per_unit: int
    response_headers: bool
    header_limit: str
    header_remaining: str
    header_reset: str
    config_poll_s: float
    shutdown_delay_s: float
    shutdown_grace_s: float
    log_level: str

    def request_caps(self) -> RequestCaps:
        return RequestCaps(
            max_descriptors=self.max_descriptors,
            max_descriptor_entries=self.max_descriptor_entries,
            max_entry_bytes=self.max_entry_bytes,
            limit_overrides=OverridePolicy(self.limit_overrides),
            max_override_unit=Unit[self.max_override_unit.upper()],
            max_override_requests_per_unit=self.max_override_requests_per_unit,
        )

    def redacted_redis_url(self) -> str:
        """The Redis URL without its password, for logs."""
        try:
            return parse_redis_url(self.redis_url).redacted()
        except ValueError:  # refused where the backend is built; never shown here
            return "(unparseable Redis URL)"


class _AppendOverDefault(argparse.Action):
    """Like "append", but values given on the command line replace the environment's."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        if current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, values])


class _BooleanFlag(argparse.BooleanOptionalAction):
    """`--shadow-mode` turns it on and `--no-shadow-mode` off, over the environment.

    An explicit value (`--redis-batching false`) is still accepted, as these flags took one
    before and scripts (the benchmark comparing revisions among them) pass it.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.nargs = "?"
        self.metavar = "true|false"

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        negated = bool(option_string and option_string.startswith("--no-"))
        if values is None:
            setattr(namespace, self.dest, not negated)
            return
        if negated:
            raise argparse.ArgumentError(self, f"{option_string} takes no value")
        try:
            setattr(namespace, self.dest, _bool(values))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None


class HelpFormatter(argparse.HelpFormatter):
    """Shows a boolean flag as `--shadow-mode [true|false], --no-shadow-mode`: the negative
    form takes no value, whatever argparse would print for it."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _BooleanFlag):
            positive, negative = action.option_strings
            return f"{positive} [{action.metavar}], {negative}"
        return super()._format_action_invocation(action)


def add_serve_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    for option in OPTIONS:
        add_option(parser, option, environ)


def option(flag: str) -> Option:
    """The OPTIONS entry of `flag` (for commands that share one of serve's settings)."""
    return next(entry for entry in OPTIONS if entry.flag == flag)


def add_option(
    parser: argparse.ArgumentParser, option: Option, environ: Mapping[str, str], *, positionals: bool = False
) -> None:
    """One setting as a flag whose default is its environment variable's value, if set.

    With `positionals` (the command takes operands), a boolean flag takes no value, so that
    `--merge-domains limits/` does not read `limits/` as the flag's value.
    """
    env = env_name(option.flag)
    default: Any = option.default
    if env in environ:
        raw = environ[env]
        if option.repeated:
            default = [part for part in raw.split(",") if part]
        else:
            try:
                default = option.parse(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={raw!r}: {exc}")
            if option.choices and default not in option.choices:
                parser.error(f"{env}={raw!r}: choose from {', '.join(option.choices)}")
    # The built-in default, so --help reads the same whatever the environment holds.
    kwargs: dict[str, Any] = {"default": default, "help": f"{option.help} [default {shown_default(option)}; env {env}]"}
    if option.repeated:
        kwargs["action"] = _AppendOverDefault
    elif option.parse is _bool:
        kwargs["action"] = argparse.BooleanOptionalAction if positionals else _BooleanFlag
    else:
        kwargs["type"] = option.parse
    if option.choices:
        kwargs["choices"] = option.choices
    parser.add_argument(option.flag, **kwargs)


def shown_default(option: Option) -> str:
    """The default as --help and the README show it."""
    if isinstance(option.default, bool):
        return "true" if option.default else "false"
    if option.default in ("", []):
        return "none"
    return str(option.default)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {_dest(option): getattr(args, _dest(option)) for option in OPTIONS}
    values["config"] = tuple(values["config"] or ())
    values["on_backend_error"] = FailureMode(values["on_backend_error"])
    return Settings(**values)


def check_settings(settings: Settings) -> None:
    """Refuse settings that contradict each other (ValueError naming the flags)."""
    if settings.redis_pipeline_window_us >= settings.redis_timeout_ms * 1000:
        raise ValueError(
            f"--redis-pipeline-window-us {settings.redis_pipeline_window_us:g} must be below "
            f"--redis-timeout-ms {settings.redis_timeout_ms:g} (in microseconds, "
            f"{settings.redis_timeout_ms * 1000:g}): a call held that long would time out unsent; "
            "set a shorter window, or 0 for none"
        )


def settings_from_environment(environ: Mapping[str, str] | None = None, argv: Sequence[str] = ()) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, os.environ if environ is None else environ)
    return settings_from_args(parser.parse_args(list(argv)))


def settings_to_environment(settings: Settings) -> dict[str, str]:
    """The environment that reproduces `settings` (for worker processes)."""
    environment = {}
    for option in OPTIONS:
        value = getattr(settings, _dest(option))
        if option.repeated:
            text = ",".join(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value.value if isinstance(value, FailureMode) else value)
        environment[env_name(option.flag)] = text
    return environment
