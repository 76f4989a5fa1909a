"""Our stubs must be wire-compatible with Envoy's (xds-protos) in both directions.

Envoy's classes live only in a subprocess (tests/xds_compat_helper.py): both
sets of stubs register identical proto names in protobuf's default pool.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from ratelimit.generated.envoy.config.core.v3 import base_pb2
from ratelimit.generated.envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from ratelimit.generated.envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from ratelimit.generated.envoy.type.v3 import ratelimit_unit_pb2, token_bucket_pb2
from tests import xds_compat_helper as helper  # module level imports no envoy

HELPER_PATH = Path(helper.__file__)
METHOD_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
OUR_MODULES = (base_pb2, ratelimit_unit_pb2, token_bucket_pb2, ratelimit_pb2, rls_pb2)


def run_helper(command: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HELPER_PATH), command],
        input=json.dumps(payload or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"helper {command} failed:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module", autouse=True)
def _require_xds_protos() -> None:
    proc = subprocess.run(
        [sys.executable, str(HELPER_PATH), "probe"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == helper.EXIT_NO_XDS:
        pytest.skip("xds-protos (Envoy's reference stubs) is not installed")
    assert proc.returncode == 0, proc.stderr


def _b64(data: str) -> bytes:
    return base64.b64decode(data)


def test_descriptors_match_envoy() -> None:
    envoy = run_helper("describe")
    ours = {m.DESCRIPTOR.name: helper.describe_file(m.DESCRIPTOR) for m in OUR_MODULES}
    assert set(ours) == set(helper.ENVOY_PROTO_FILES)

    for name, our_file in ours.items():
        envoy_file = envoy[name]
        if name == "envoy/config/core/v3/base.proto":
            # We carry only the part of Envoy's big base.proto that RLS uses.
            assert set(our_file["messages"]) == {"envoy.config.core.v3.HeaderValue"}
            for kind in ("messages", "enums", "services"):
                for full_name, structure in our_file[kind].items():
                    assert structure == envoy_file[kind][full_name], full_name
        else:
            assert our_file == envoy_file, name


def test_envoy_request_and_response_parse_with_ours() -> None:
    built = run_helper("build")

    req = rls_pb2.RateLimitRequest.FromString(_b64(built["request"]))
    resp = rls_pb2.RateLimitResponse.FromString(_b64(built["response"]))
    assert not helper.has_unknown_fields(req) and not helper.has_unknown_fields(resp)
    assert helper.to_dict(req) == built["request_dict"]
    assert helper.to_dict(resp) == built["response_dict"]
    # Same bytes back out: nothing was dropped or re-typed on the way through.
    assert req.SerializeToString(deterministic=True) == _b64(built["request"])
    assert resp.SerializeToString(deterministic=True) == _b64(built["response"])

    # Field-by-field spot checks through our accessors (not only dict equality).
    assert req.domain == "edge-proxy"
    assert req.hits_addend == helper.U32_MAX
    assert [[(e.key, e.value) for e in d.entries] for d in req.descriptors] == [
        [("remote_address", "10.0.0.1"), ("path", "/api/v1/ünïcode")],
        [("user", "")],
        [("generic_key", "g")],
    ]
    assert [d.HasField("hits_addend") for d in req.descriptors] == [True, True, False]
    assert [d.hits_addend.value for d in req.descriptors[:2]] == [0, helper.U64_MAX]
    assert req.descriptors[0].limit.requests_per_unit == 42
    assert req.descriptors[0].limit.unit == helper.WEEK
    assert not req.descriptors[1].HasField("limit")
    assert req.descriptors[2].limit.unit == ratelimit_unit_pb2.YEAR

    code = rls_pb2.RateLimitResponse
    assert resp.overall_code == code.OVER_LIMIT
    assert [s.code for s in resp.statuses] == [code.OK, code.OVER_LIMIT, code.UNKNOWN]
    first = resp.statuses[0]
    assert first.current_limit.name == "per-week"
    assert first.current_limit.unit == code.RateLimit.WEEK == 7
    assert first.current_limit.requests_per_unit == 1000
    assert first.limit_remaining == helper.U32_MAX
    assert first.duration_until_reset.ToTimedelta().total_seconds() == 3 * 86400 + 0.5
    assert first.quota.WhichOneof("expiration_specifier") == "valid_until"
    assert (first.quota.requests, first.quota.id) == (7, "q-1")
    assert first.quota.valid_until.seconds == 1_700_000_000
    assert resp.response_headers_to_add[1].raw_value == b"\xfe\x00binary"
    assert [h.key for h in resp.request_headers_to_add] == ["x-rl-checked"]
    assert resp.raw_body == b"\x00\xffslow down"
    assert resp.dynamic_metadata["ratelimit"]["tags"][1] == "b"
    assert resp.quota.id == "overall" and not resp.quota.HasField("valid_until")


def test_our_request_and_response_parse_with_envoy() -> None:
    req, resp = helper.build_request(rls_pb2), helper.build_response(rls_pb2)
    parsed = run_helper("parse", {"request": helper.encode(req), "response": helper.encode(resp)})

    assert parsed["unknown_fields"] == [False, False]
    assert parsed["request_dict"] == helper.to_dict(req)
    assert parsed["response_dict"] == helper.to_dict(resp)
    assert _b64(parsed["request"]) == req.SerializeToString(deterministic=True)
    assert _b64(parsed["response"]) == resp.SerializeToString(deterministic=True)
    assert parsed["checks"] == {
        "descriptor_hits_addend_set": [True, True, False],
        "descriptor_hits_addend": [0, helper.U64_MAX, 0],
        "override_unit": [helper.WEEK, 0, 6],
        "status_units": [7, 1, 0],
        "week_name": "WEEK",
        "raw_header": base64.b64encode(b"\xfe\x00binary").decode(),
        "quota_oneof": "valid_until",
    }


def test_service_and_method_names() -> None:
    service = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"]
    assert service.full_name == "envoy.service.ratelimit.v3.RateLimitService"
    method = service.methods_by_name["ShouldRateLimit"]
    assert method.input_type is rls_pb2.RateLimitRequest.DESCRIPTOR
    assert method.output_type is rls_pb2.RateLimitResponse.DESCRIPTOR

    class RecordingChannel:
        def __init__(self) -> None:
            self.paths: list[str] = []

        def unary_unary(self, path: str, *args: Any, **kwargs: Any) -> None:
            self.paths.append(path)

    channel = RecordingChannel()
    rls_pb2_grpc.RateLimitServiceStub(channel)
    assert channel.paths == [METHOD_PATH]


class _RecordingServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self) -> None:
        self.requests: list[rls_pb2.RateLimitRequest] = []
        self.lock = threading.Lock()

    def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        with self.lock:
            self.requests.append(request)
        return cast(rls_pb2.RateLimitResponse, helper.build_response(rls_pb2))


def test_envoy_grpc_client_calls_our_server() -> None:
    """Envoy's own generated client stub reaches our servicer over real gRPC."""
    servicer = _RecordingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = run_helper("call", {"target": f"127.0.0.1:{port}"})
    finally:
        server.stop(None)

    expected_req = helper.build_request(rls_pb2)
    assert servicer.requests == [expected_req]
    assert result["response_dict"] == helper.to_dict(helper.build_response(rls_pb2))
