"""What a request may carry: the caps on its size and the operator's policy on limit overrides.

Checked where a request enters (the servicer), before anything looks it up, hashes it or
counts it, so every layer below sees bounded input: descriptors, entries per descriptor and
the bytes of each key, value and domain are capped, and a limit override in the request
(which lets the caller choose the counter, its unit and its limit) is refused, or capped in
unit and size, as the operator says. Every refusal names the cap and the flag that sets it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from ratelimit.config.model import Unit
from ratelimit.service import KNOWN_UNITS, MAX_UINT32, DescriptorRequest, InvalidRequest


class OverridePolicy(enum.StrEnum):
    ALLOW = "allow"  # as envoyproxy/ratelimit, within the unit and size caps
    REFUSE = "refuse"  # INVALID_ARGUMENT for any request that carries one


@dataclass(frozen=True)
class RequestCaps:
    max_descriptors: int = 64
    max_descriptor_entries: int = 32
    max_entry_bytes: int = 4096  # each entry key and value, and the domain (UTF-8)
    limit_overrides: OverridePolicy = OverridePolicy.ALLOW
    max_override_unit: Unit = Unit.DAY
    max_override_requests_per_unit: int = MAX_UINT32

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-descriptors", self.max_descriptors),
            ("--max-descriptor-entries", self.max_descriptor_entries),
            ("--max-entry-bytes", self.max_entry_bytes),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.max_override_requests_per_unit <= MAX_UINT32:
            raise ValueError(f"--max-override-requests-per-unit must be within 0..{MAX_UINT32}")


DEFAULT_CAPS = RequestCaps()


def _too_long(text: str, cap: int) -> int:
    """The UTF-8 length of `text` when it exceeds `cap`, else 0 (cheap for short text)."""
    if len(text) * 4 <= cap:  # at most 4 bytes a character: no need to encode
        return 0
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > cap else 0


def check_request(domain: str, descriptors: Sequence[DescriptorRequest], caps: RequestCaps) -> None:
    """Raise InvalidRequest, naming what is wrong and the flag of any cap, or return."""
    if not domain:
        raise InvalidRequest("rate limit domain must not be empty")
    if size := _too_long(domain, caps.max_entry_bytes):
        raise InvalidRequest(f"the domain is {size} bytes; at most {caps.max_entry_bytes} (--max-entry-bytes)")
    if not descriptors:
        raise InvalidRequest("rate limit descriptor list must not be empty")
    if len(descriptors) > caps.max_descriptors:
        raise InvalidRequest(
            f"{len(descriptors)} descriptors in one request; at most {caps.max_descriptors} are accepted"
            " (--max-descriptors)"
        )
    for position, descriptor in enumerate(descriptors):
        _check_entries(position, descriptor, caps)
        if descriptor.override is not None:
            _check_override(position, descriptor.override, caps)


def _check_entries(position: int, descriptor: DescriptorRequest, caps: RequestCaps) -> None:
    if not descriptor.entries:
        raise InvalidRequest(f"descriptor {position} has no entries")
    if len(descriptor.entries) > caps.max_descriptor_entries:
        raise InvalidRequest(
            f"descriptor {position} has {len(descriptor.entries)} entries; at most {caps.max_descriptor_entries}"
            " (--max-descriptor-entries)"
        )
    for entry_position, (key, value) in enumerate(descriptor.entries):
        if not key:
            raise InvalidRequest(f"descriptor {position} entry {entry_position} has an empty key")
        for part, text in (("key", key), ("value", value)):
            if size := _too_long(text, caps.max_entry_bytes):
                raise InvalidRequest(
                    f"descriptor {position} entry {entry_position} {part} is {size} bytes;"
                    f" at most {caps.max_entry_bytes} (--max-entry-bytes)"
                )


def _check_override(position: int, override: tuple[int, int], caps: RequestCaps) -> None:
    requests_per_unit, unit_number = override
    if caps.limit_overrides is OverridePolicy.REFUSE:
        raise InvalidRequest(
            f"descriptor {position} carries a limit override; this service refuses them (--limit-overrides refuse)"
        )
    if unit_number not in KNOWN_UNITS:
        raise InvalidRequest(f"descriptor {position} limit override has an unknown unit ({unit_number})")
    unit = Unit(unit_number)
    if unit.seconds > caps.max_override_unit.seconds:
        raise InvalidRequest(
            f"descriptor {position} limit override unit {unit.name} is longer than"
            f" {caps.max_override_unit.name} (--max-override-unit)"
        )
    if requests_per_unit > caps.max_override_requests_per_unit:
        raise InvalidRequest(
            f"descriptor {position} limit override of {requests_per_unit} requests per unit is above"
            f" {caps.max_override_requests_per_unit} (--max-override-requests-per-unit)"
        )
