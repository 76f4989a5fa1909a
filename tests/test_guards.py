"""What a request may carry: every refusal is INVALID_ARGUMENT naming the cap and its flag."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ratelimit.config.model import Unit
from ratelimit.guards import OverridePolicy, RequestCaps, check_request
from ratelimit.service import DescriptorRequest, InvalidRequest
from ratelimit.settings import settings_from_environment

USER = (("user", "x"),)


def one(entries: tuple[tuple[str, str], ...] = USER, override: tuple[int, int] | None = None) -> DescriptorRequest:
    return DescriptorRequest(entries=entries, override=override)


@pytest.mark.parametrize(
    ("domain", "descriptors", "message"),
    [
        ("", [one()], "domain must not be empty"),
        ("svc", [], "descriptor list must not be empty"),
        ("svc", [one(entries=())], "descriptor 0 has no entries"),
        ("svc", [one(entries=(("", "x"),))], "descriptor 0 entry 0 has an empty key"),
        ("svc", [one(override=(5, 0))], "unknown unit (0)"),
        ("svc", [one(override=(5, 99))], "unknown unit (99)"),
        ("svc", [one()] * 65, "65 descriptors in one request; at most 64 are accepted (--max-descriptors)"),
        ("svc", [one(entries=(("k", "v"),) * 33)], "has 33 entries; at most 32 (--max-descriptor-entries)"),
        ("svc", [one(), one(entries=(("k", "v" * 4097),))], "descriptor 1 entry 0 value is 4097 bytes; at most 4096"),
        ("svc", [one(entries=(("k" * 4097, "v"),))], "descriptor 0 entry 0 key is 4097 bytes; at most 4096"),
        ("svc", [one(entries=(("k", "é" * 2049),))], "value is 4098 bytes; at most 4096 (--max-entry-bytes)"),
        ("d" * 4097, [one()], "the domain is 4097 bytes; at most 4096 (--max-entry-bytes)"),
        ("svc", [one(override=(5, Unit.YEAR))], "unit YEAR is longer than DAY (--max-override-unit)"),
        ("svc", [one(override=(5, Unit.WEEK))], "unit WEEK is longer than DAY (--max-override-unit)"),
    ],
)
def test_requests_beyond_the_caps_are_refused_with_the_cap_and_its_flag(
    domain: str, descriptors: list[DescriptorRequest], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        check_request(domain, descriptors, RequestCaps())


def test_requests_at_the_caps_pass() -> None:
    widest = one(entries=(("k" * 4096, "é" * 2048),) * 32, override=(7, Unit.DAY))
    check_request("d" * 4096, [widest] * 64, RequestCaps())


def test_the_operator_can_refuse_overrides_entirely() -> None:
    caps = RequestCaps(limit_overrides=OverridePolicy.REFUSE)
    check_request("svc", [one()], caps)
    with pytest.raises(InvalidRequest, match=re.escape("refuses them (--limit-overrides refuse)")):
        check_request("svc", [one(), one(override=(5, Unit.SECOND))], caps)


def test_the_operator_caps_override_units_and_sizes() -> None:
    caps = RequestCaps(max_override_unit=Unit.MINUTE, max_override_requests_per_unit=100)
    check_request("svc", [one(override=(100, Unit.MINUTE))], caps)
    with pytest.raises(InvalidRequest, match=re.escape("unit HOUR is longer than MINUTE")):
        check_request("svc", [one(override=(5, Unit.HOUR))], caps)
    with pytest.raises(InvalidRequest, match=re.escape("101 requests per unit is above 100")):
        check_request("svc", [one(override=(101, Unit.SECOND))], caps)


def test_the_caps_come_from_flags_and_environment() -> None:
    settings = settings_from_environment(
        {"RATELIMIT_MAX_ENTRY_BYTES": "100", "RATELIMIT_LIMIT_OVERRIDES": "refuse"},
        ["--max-override-unit", "HOUR", "--max-descriptor-entries", "4"],
    )
    caps = settings.request_caps()
    assert caps == RequestCaps(
        max_entry_bytes=100,
        max_descriptor_entries=4,
        limit_overrides=OverridePolicy.REFUSE,
        max_override_unit=Unit.HOUR,
    )


@pytest.mark.parametrize("flag", ["--max-descriptors", "--max-descriptor-entries", "--max-entry-bytes"])
def test_a_cap_below_one_is_a_settings_error(flag: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{flag} must be at least 1")):
        settings_from_environment({}, [flag, "0"]).request_caps()


def test_serve_listens_on_loopback_unless_told_otherwise() -> None:
    settings = settings_from_environment({})
    assert (settings.grpc_host, settings.metrics_host) == ("127.0.0.1", "127.0.0.1")


@pytest.mark.parametrize("config", [None, "empty-folder"])
def test_serve_without_a_limits_config_refuses_to_start_naming_the_flag(tmp_path: Path, config: str | None) -> None:
    """Attack 10: `serve` with no --config, or an empty folder, answered OK to everything."""
    args = [sys.executable, "-m", "ratelimit", "serve", "--backend", "memory", "--grpc-port", "0"]
    if config is not None:
        (tmp_path / config).mkdir()
        args += ["--config", str(tmp_path / config)]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RATELIMIT_")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=environment)
    assert done.returncode == 2, done.stderr
    assert "--config" in done.stderr and "Traceback" not in done.stderr
    if config is not None:
        assert "holds no domain" in done.stderr
