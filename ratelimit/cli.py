"""The `ratelimit` command: serve, validate-config, check."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Callable, Coroutine, Sequence

import grpc

from ratelimit import __version__
from ratelimit.client import parse_descriptor
from ratelimit.config import ConfigError, InvalidConfig, check_config
from ratelimit.settings import (
    HelpFormatter,
    Settings,
    add_option,
    add_serve_arguments,
    check_settings,
    option,
    settings_from_args,
)
from ratelimit.tracing import check_tracing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratelimit", description="Envoy rate limit service (RLS v3) over Redis.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one replica", formatter_class=HelpFormatter)
    add_serve_arguments(serve, os.environ)

    validate = commands.add_parser(
        "validate-config",
        help="check limits config files as serve loads them; print every error; exit 1 on errors",
        formatter_class=HelpFormatter,
    )
    validate.add_argument("paths", nargs="+", help="YAML files or directories")
    add_option(validate, option("--merge-domains"), os.environ, positionals=True)

    check = commands.add_parser(
        "check",
        help="ask a running service, print each descriptor's status; exit 0 OK, 1 OVER_LIMIT, 2 error",
        description="Ask a running service once and print each descriptor's status. "
        "Exit status: 0 when the answer is OK, 1 when it is OVER_LIMIT, 2 on an error (no answer).",
    )
    check.add_argument("--target", default="127.0.0.1:8081", help="host:port of the service [default 127.0.0.1:8081]")
    check.add_argument("--domain", required=True, help="rate limit domain (required)")
    check.add_argument(
        "--descriptor",
        action="append",
        required=True,
        type=parse_descriptor,
        help="k=v[,k=v...] (required; repeatable: one per descriptor)",
    )
    check.add_argument("--hits", type=int, default=0, help="hits_addend, 0 means 1 [default 0]")
    check.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds [default 2.0]")
    return parser


def run_serve(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.config:
        print(
            "ratelimit: no limits config: pass --config PATH (a YAML file or a folder of them; repeatable)"
            " or set RATELIMIT_CONFIG",
            file=sys.stderr,
        )
        return 2
    try:
        check_settings(settings)
    except ValueError as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        # The workers load the config themselves; checking it here stops a bad one, with
        # all its errors, before any worker starts.
        _, errors = check_config(settings.config, merge_domains=settings.merge_domains)
        if errors:
            _print_invalid_config(errors)
            return 2
        try:
            check_tracing(settings.otlp_endpoint)  # likewise: one line, not one per worker
        except ValueError as exc:
            print(f"ratelimit: {exc}", file=sys.stderr)
            return 1
        from ratelimit.workers import run_workers

        try:
            return run_workers(settings)
        except OSError as exc:
            print(f"ratelimit: {exc}", file=sys.stderr)
            return 1

    from ratelimit.app import Replica

    async def main() -> None:
        replica = Replica(settings)
        await replica.run()

    try:
        _event_loop_runner(settings.event_loop)(main())
    except InvalidConfig as exc:
        _print_invalid_config(exc.errors)
        return 2
    except (OSError, ValueError) as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_invalid_config(errors: Sequence[ConfigError]) -> None:
    """Every error on a line of its own (`file: line N: message`), under one saying what happened."""
    count = f"{len(errors)} {'error' if len(errors) == 1 else 'errors'}"
    print(f"ratelimit: invalid limits config (--config, RATELIMIT_CONFIG), not starting ({count}):", file=sys.stderr)
    for error in errors:
        print(error, file=sys.stderr)


def _event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("ratelimit: --event-loop uvloop, but uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run


def run_validate(paths: Sequence[str], merge_domains: bool) -> int:
    config, errors = check_config(paths, merge_domains=merge_domains)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        return 1
    print(f"ok: {', '.join(paths)}: {config.summary()}")
    return 0


# `check`'s exit status, so that a script can branch on the answer.
CHECK_OK, CHECK_OVER_LIMIT, CHECK_ERROR = 0, 1, 2


def run_check(args: argparse.Namespace) -> int:
    from ratelimit.client import RateLimitClient

    with RateLimitClient(args.target, timeout_s=args.timeout) as client:
        try:
            result = client.should_rate_limit(args.domain, args.descriptor, hits_addend=args.hits)
        except grpc.RpcError as exc:
            print(f"ratelimit check: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return CHECK_ERROR
    rows = [("descriptor", "code", "limit", "remaining", "reset_s")]
    for descriptor, status in zip(args.descriptor, result.statuses):
        limit = f"{status.requests_per_unit}/{status.unit}" if status.unit else "-"
        reset = f"{status.duration_until_reset_s:g}" if status.duration_until_reset_s is not None else "-"
        rows.append(
            (",".join(f"{k}={v}" for k, v in descriptor), status.code, limit, str(status.limit_remaining), reset)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"overall: {result.overall_code}")
    return CHECK_OVER_LIMIT if result.over_limit else CHECK_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(settings_from_args(args))
    if args.command == "validate-config":
        return run_validate(args.paths, args.merge_domains)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
