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
from ratelimit.config import ConfigError, validate_paths
from ratelimit.settings import Settings, add_serve_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratelimit", description="Envoy rate limit service (RLS v3) over Redis.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one replica")
    add_serve_arguments(serve, os.environ)

    validate = commands.add_parser("validate-config", help="check limits config files; exit 1 on errors")
    validate.add_argument("paths", nargs="+", help="YAML files or directories")
    validate.add_argument("--merge-domains", action="store_true", help="allow several files per domain")

    check = commands.add_parser("check", help="ask a running service, print each descriptor's status")
    check.add_argument("--target", default="127.0.0.1:8081", help="host:port of the gRPC service")
    check.add_argument("--domain", required=True)
    check.add_argument(
        "--descriptor",
        action="append",
        required=True,
        type=parse_descriptor,
        help="k=v[,k=v...] (repeatable: one per descriptor)",
    )
    check.add_argument("--hits", type=int, default=0, help="hits_addend (0 means 1)")
    check.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
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
    if settings.workers > 1:
        errors = validate_paths(settings.config, merge_domains=settings.merge_domains)
        if errors:
            print(f"ratelimit: invalid config: {errors[0]}", file=sys.stderr)
            return 2
        from ratelimit.config import load_config
        from ratelimit.reload import require_domains

        try:
            require_domains(load_config(settings.config, merge_domains=settings.merge_domains), settings.config)
        except ConfigError as exc:
            print(f"ratelimit: invalid config: {exc}", file=sys.stderr)
            return 2
        from ratelimit.workers import run_workers

        return run_workers(settings)

    from ratelimit.app import Replica

    async def main() -> None:
        replica = Replica(settings)
        await replica.run()

    try:
        _event_loop_runner(settings.event_loop)(main())
    except ConfigError as exc:
        print(f"ratelimit: invalid config: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"ratelimit: {exc}", file=sys.stderr)
        return 1
    return 0


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
    errors = validate_paths(paths, merge_domains=merge_domains)
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        print(f"ok: {', '.join(paths)}")
    return 1 if errors else 0


def run_check(args: argparse.Namespace) -> int:
    from ratelimit.client import RateLimitClient

    with RateLimitClient(args.target, timeout_s=args.timeout) as client:
        try:
            result = client.should_rate_limit(args.domain, args.descriptor, hits_addend=args.hits)
        except grpc.RpcError as exc:
            print(f"ratelimit check: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(settings_from_args(args))
    if args.command == "validate-config":
        return run_validate(args.paths, args.merge_domains)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
