"""Fuzzing (hypothesis): handoff payloads that are well-formed container-wise (valid CRC) but
whose contents are not, and malformed Generate requests to a live edge server. A wrong header is
refused cleanly (CodecError, or the device's HandoffRejected) unless it decodes to exactly the
original; other bytes in a tensor blob are refused cleanly or decode to the shapes the request
asks for; every request gets a gRPC status other than UNKNOWN or INTERNAL, nothing hangs (every
call has a deadline), and the server stays healthy."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_procs import edge_server
from test_handoff import make_handoff

from services.ue_client.integrity import HandoffLimits, HandoffRejected, check_header
from tandem.codec.container import CodecError, pack_container, unpack_container
from tandem.handoff import ENCODINGS, STRATEGIES, WINDOWS, CodecSpec, Handoff, decode_handoff, encode_handoff
from tandem.v1 import edge_pb2, edge_pb2_grpc

HANDOFF = make_handoff()
CODECS = {
    "exact": CodecSpec("fp16"),
    "merged": CodecSpec("int8", 0.5, "latent"),
    "denoised": CodecSpec("fp16", 0.5, "denoised"),
}
VALID = {which: encode_handoff(HANDOFF, codec) for which, codec in CODECS.items()}
HEADERS = {which: unpack_container(payload)[0] for which, payload in VALID.items()}
DECODED = {which: decode_handoff(payload, HANDOFF.request, HANDOFF.schedule) for which, payload in VALID.items()}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Values a handoff header holds: random JSON alone hardly ever makes a wrong header that decodes.
HEADER_VALUES = st.integers(0, HANDOFF.schedule.steps) | st.sampled_from(
    [*ENCODINGS, *STRATEGIES, *WINDOWS, "exact", 0.0, 0.25, 0.5, 0.5001, 0.75, [4, 16, 16], [4, 128], [4, 8, 8]])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(meta, prefix=()):
    """Every key path in the header (nested dicts), to pick a field to break."""
    for key, value in meta.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


def _at(meta, path):
    """The value at a key path, None where the path does not lead."""
    for key in path:
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def _device_checks(payload: bytes, codec: CodecSpec) -> None:
    """What the device checks of an edge's payload besides decoding it (services/ue_client/device.py):
    its size against the request's handoff, its header against the request."""
    channels, height, width = HANDOFF.latent.shape
    latent_shape = (channels, height, width)
    HandoffLimits.for_request(HANDOFF.request, latent_shape, codec).check_chunk(0, 1, len(payload), len(payload))
    check_header(unpack_container(payload)[0], HANDOFF.request, latent_shape)


def _same(a: Handoff, b: Handoff) -> bool:
    """Bit for bit the same handoff."""
    prev_a, prev_b = a.prev_denoised, b.prev_denoised
    same_prev = prev_a is prev_b is None or (prev_a is not None and prev_b is not None and torch.equal(prev_a, prev_b))
    return a.step == b.step and torch.equal(a.latent, b.latent) and same_prev


@FUZZ
@given(which=st.sampled_from(sorted(VALID)), data=st.data())
def test_a_wrong_header_is_refused_cleanly_unless_it_decodes_to_exactly_the_original(which, data):
    """Fields of the header dropped or replaced (and maybe a blob resized): decode_handoff raises
    CodecError with a message, or what it decodes is refused by the device's integrity checks
    (HandoffRejected), or it is bit for bit the original (e.g. a dropped codec field whose
    default is the value it had). Any other exception fails the test."""
    meta, blobs = unpack_container(VALID[which])
    paths = sorted(_paths(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = _at(meta, path[:-1])
        if not isinstance(node, dict):
            continue
        if data.draw(st.booleans()):
            node.pop(path[-1], None)
        else:  # random JSON, a value of the header's kind, or what another payload holds there
            others = st.sampled_from([_at(header, path) for header in HEADERS.values()])
            node[path[-1]] = copy.deepcopy(data.draw(JSON_VALUES | HEADER_VALUES | others))
    if data.draw(st.booleans()):  # any length but its own: other bytes of the same length are the next test's
        name = data.draw(st.sampled_from(sorted(blobs)))
        blob = blobs[name]
        cut = data.draw(st.integers(0, len(blob)))
        blobs[name] = blob[:cut] + data.draw(st.binary(max_size=8).filter(lambda tail: cut + len(tail) != len(blob)))
    try:
        payload = pack_container(meta, blobs)
    except CodecError:
        return  # the container itself refuses to write such a header: also a clear answer
    try:
        decoded = decode_handoff(payload, HANDOFF.request, HANDOFF.schedule)
    except CodecError as exc:
        assert str(exc)  # says what is wrong
        return
    if not _same(decoded, DECODED[which]):
        with pytest.raises(HandoffRejected):
            _device_checks(payload, CODECS[which])


@pytest.mark.parametrize("which", sorted(VALID))
@pytest.mark.parametrize("step", [s for s in range(HANDOFF.schedule.steps + 1) if s != HANDOFF.step])
def test_a_header_claiming_another_step_decodes_only_to_be_refused_by_the_device(which, step):
    """The header change that most often decodes to another handoff, which the fuzz above seldom
    draws: another step with the same tensor layout. decode_handoff takes it (its checks are the
    schedule's, not the request's split); the device's header check refuses it."""
    payload = pack_container({**HEADERS[which], "step": step}, unpack_container(VALID[which])[1])
    try:
        decoded = decode_handoff(payload, HANDOFF.request, HANDOFF.schedule)
    except CodecError as exc:  # another layout at this step (none before step 1, say)
        assert str(exc)
        return
    assert decoded.step == step
    with pytest.raises(HandoffRejected, match="step"):
        _device_checks(payload, CODECS[which])


@FUZZ
@given(which=st.sampled_from(sorted(VALID)), data=st.data())
def test_other_bytes_in_a_blob_are_refused_cleanly_or_decode_to_the_shapes_asked_for(which, data):
    """Bytes of a tensor or merge-plan blob overwritten, its length kept, the header intact: a
    CodecError with a message (an int8 -128 or bad scale, a plan code out of range), or a handoff
    at the request's step with the original's tensor shapes. Not more: the CRC is the sender's, so
    the values an edge computed are beyond the device's checks (it takes the edge's word for them)."""
    meta, blobs = unpack_container(VALID[which])
    name = data.draw(st.sampled_from(sorted(blobs)))
    blob = bytearray(blobs[name])
    for index, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                                           min_size=1, max_size=8)):
        blob[index] = value
    blobs[name] = bytes(blob)
    try:
        decoded = decode_handoff(pack_container(meta, blobs), HANDOFF.request, HANDOFF.schedule)
    except CodecError as exc:
        assert str(exc)
        return
    original = DECODED[which]
    assert decoded.step == original.step and decoded.latent.shape == original.latent.shape
    assert decoded.prev_denoised is not None and original.prev_denoised is not None
    assert decoded.prev_denoised.shape == original.prev_denoised.shape
    assert bool(torch.isfinite(decoded.latent).all() and torch.isfinite(decoded.prev_denoised).all())


@pytest.mark.parametrize("which", ["exact", "denoised"])
@pytest.mark.parametrize("half", [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"])  # fp16 NaN, +inf, -inf
def test_a_nan_or_an_infinity_in_a_tensor_is_refused_not_run(which, half):
    """Values no edge computes: the device fails over instead of denoising NaNs into a blank image."""
    meta, blobs = unpack_container(VALID[which])
    name = next(n for n in sorted(blobs) if n != "plan")
    blobs[name] = half + blobs[name][2:]
    with pytest.raises(CodecError, match="holds a NaN or an infinity"):
        decode_handoff(pack_container(meta, blobs), HANDOFF.request, HANDOFF.schedule)


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
