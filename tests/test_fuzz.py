"""Fuzzing (hypothesis): handoff payloads whose header is well-formed container-wise (valid CRC)
but whose contents are not, and malformed Generate requests to a live edge server. Every input
gets a clear answer (CodecError / a gRPC status other than UNKNOWN or INTERNAL), nothing hangs
(every call has a deadline), and the server stays healthy."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_procs import edge_server
from test_handoff import make_handoff

from tandem.codec.container import CodecError, pack_container, unpack_container
from tandem.handoff import CodecSpec, decode_handoff, encode_handoff
from tandem.v1 import edge_pb2, edge_pb2_grpc

HANDOFF = make_handoff()
VALID = {
    "exact": encode_handoff(HANDOFF, CodecSpec("fp16")),
    "merged": encode_handoff(HANDOFF, CodecSpec("int8", 0.5, "latent")),
    "denoised": encode_handoff(HANDOFF, CodecSpec("fp16", 0.5, "denoised")),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(meta, prefix=()):
    """Every key path in the header (nested dicts), to pick a field to break."""
    for key, value in meta.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(sorted(VALID)), data=st.data())
def test_decoder_answers_every_well_framed_but_wrong_payload_with_a_codec_error(which, data):
    meta, blobs = unpack_container(VALID[which])
    paths = sorted(_paths(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = meta
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if data.draw(st.booleans()):
            node.pop(path[-1], None)
        else:
            node[path[-1]] = data.draw(JSON_VALUES)
    if blobs and data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(blobs)))
        blob = blobs[name]
        blobs[name] = blob[: data.draw(st.integers(0, len(blob)))] + data.draw(st.binary(max_size=8))
    try:
        payload = pack_container(meta, blobs)
    except CodecError:
        return  # the container itself refuses to write such a header: also a clear answer
    try:
        decode_handoff(payload, HANDOFF.request, HANDOFF.schedule)
    except CodecError as exc:
        assert str(exc)  # says what is wrong


REQUEST_FIELDS = {
    "prompt": st.text(max_size=600),
    "negative_prompt": st.text(max_size=40),
    # Valid values stay small so that accepted requests finish fast; the rest probe the limits.
    "steps": st.integers(0, 6) | st.sampled_from([1000, 2**32 - 1]),
    "split": st.integers(0, 7) | st.just(2**32 - 1),
    "sampler": st.sampled_from(["", "ddim", "euler", "dpmpp_2m", "plms", "\x00"]),
    "guidance_scale": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "seed": st.integers(0, 2**64 - 1),
    "height": st.sampled_from([0, 7, 31, 32, 33, 64, 100_000, 2**32 - 1]),
    "width": st.sampled_from([0, 7, 31, 32, 33, 64, 100_000, 2**32 - 1]),
    "user": st.text(max_size=10),
}
CODEC_FIELDS = {
    "encoding": st.sampled_from(["", "fp32", "fp16", "int8", "bf16"]),
    "merge_ratio": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "merge_strategy": st.sampled_from(["", "latent", "denoised", "both"]),
    "merge_window": st.sampled_from(["", "local", "global", "x"]),
}


@pytest.fixture(scope="module")
def edge(tiny_packs, tmp_path_factory):
    with edge_server(tiny_packs["large"], tmp_path_factory.mktemp("fuzz")) as server:
        yield server


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({}, optional=REQUEST_FIELDS),
       codec=st.fixed_dictionaries({}, optional=CODEC_FIELDS))
def test_malformed_generate_requests_get_a_clear_status_and_the_server_keeps_serving(edge, fields, codec):
    request = edge_pb2.GenerateRequest(**fields, codec=edge_pb2.Codec(**codec))
    with grpc.insecure_channel(edge.address) as channel:
        try:
            for _ in edge_pb2_grpc.EdgeServiceStub(channel).Generate(request, timeout=60):
                pass
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                exc.code(), exc.details())
            assert exc.details()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
