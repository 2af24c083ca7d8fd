"""Multi-tenant safety of the edge server (issue 14, edge side): one caller's odd, large, expired,
malformed or anonymous requests never fail or stall another user's. Real processes, as in
test_edge_service.py, except the failure-isolation test, which needs a UNet that fails on cue."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import grpc
import pytest
from service_procs import ROOT, device_service, edge_server, free_port, metric_value, scheduler_service

from services.common.wire import request_to_proto
from services.ue_client.transport import fetch_handoff, get_capabilities
from tandem.handoff import CodecSpec, decode_handoff
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2, edge_pb2_grpc

PROMPT = "a red circle at the left on a blue background"


def req(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, steps=6, split=3, sampler="dpmpp_2m", guidance_scale=3.0, seed=5, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


def decode(payload: bytes, request: GenerationRequest, pack):
    from tandem.sampling.schedule import make_schedule

    return decode_handoff(payload, request, make_schedule(request.sampler, request.steps, pack.sampler_config))


def refusal(address: str, request: edge_pb2.GenerateRequest, metadata=()) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as exc:
            list(edge_pb2_grpc.EdgeServiceStub(channel).Generate(request, timeout=30, metadata=metadata))
    return exc.value


@pytest.fixture(scope="module")
def edge(tiny_packs, tmp_path_factory):
    with edge_server(tiny_packs["large"], tmp_path_factory.mktemp("edge")) as service:
        yield service


# --- 1. odd sizes never fail a batch; a failing call fails only its culprit --------------------

def test_odd_size_requests_run_beside_others_and_nobody_fails(edge, large_pack):
    """Before: a 40x40 request joining 32x32 ones made the stacked UNet call raise, and every
    request in the batch got INTERNAL."""
    sizes = [(32, 32)] * 6 + [(40, 40), (48, 24), (40, 40)]
    before = edge.metrics()

    requests = [req(seed=i, steps=12, split=10, height=h, width=w) for i, (h, w) in enumerate(sizes)]

    async def run_all():
        return await asyncio.gather(*(fetch_handoff(edge.address, r, CodecSpec("fp32"), timeout=120) for r in requests))

    results = asyncio.run(run_all())
    for (h, w), request, result in zip(sizes, requests, results):
        handoff = decode(result.payload, request, large_pack)
        assert tuple(handoff.latent.shape[1:]) == (h // 4, w // 4) and handoff.step == 10
    after = edge.metrics()
    calls = metric_value(after, "tandem_edge_batch_size_count") - metric_value(before, "tandem_edge_batch_size_count")
    steps = metric_value(after, "tandem_edge_steps_total") - metric_value(before, "tandem_edge_steps_total")
    assert steps == len(sizes) * 10 and calls < steps  # same-size requests still shared calls
    assert metric_value(after, "tandem_edge_requests_total", 'code="INTERNAL"', default=0) == 0


class FailingUNet:
    """The pack's UNet, except that a call including timestep `poison` raises."""

    def __init__(self, unet, poison: float):
        self.unet, self.poison = unet, poison
        self.device, self.dtype = next(unet.parameters()).device, next(unet.parameters()).dtype

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False):
        if (timestep == self.poison).any():
            raise RuntimeError("poisoned sample")
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict)


def test_a_failing_batched_call_fails_only_the_culprit(tiny_packs):
    """The batched call raises; each member is retried alone, the one that fails again gets
    INTERNAL, the others finish with the same latent as when they run without the culprit."""
    from services.edge_server.engine import EdgeEngine, Failed, Finished
    from tandem.packs import load_pack
    from tandem.sampling.schedule import make_schedule

    pack = load_pack(tiny_packs["large"], device="cpu")
    good = [req(sampler="ddim", steps=10, split=4, seed=s) for s in (1, 2)]
    culprit = req(sampler="ddim", steps=7, split=4, seed=3)
    good_steps = set(make_schedule("ddim", 10, pack.sampler_config).timesteps[:4])
    # A timestep only the culprit reaches, after its first step (so the three share calls first).
    poison = next(t for t in make_schedule("ddim", 7, pack.sampler_config).timesteps[1:4] if t not in good_steps)

    def run(requests, unet):
        engine, events = EdgeEngine(pack), {}
        pack.unet = unet
        for i, request in enumerate(requests):
            engine.submit(request, CodecSpec("fp32"), lambda e, i=i: events.__setitem__(i, e))
        while not engine.batcher.idle:
            engine.step()
        return events, engine.stats

    original = pack.unet
    try:
        events, stats = run(good + [culprit], FailingUNet(original, float(poison)))
        alone, _ = run(good, original)
    finally:
        pack.unet = original
    assert isinstance(events[2], Failed) and events[2].code == "INTERNAL" and "poisoned" in events[2].message
    for i in (0, 1):
        assert isinstance(events[i], Finished)
        ours, reference = decode(events[i].payload, good[i], pack), decode(alone[i].payload, good[i], pack)
        assert (ours.latent - reference.latent).abs().max().item() <= 1e-5
    assert stats.max_batch == 3  # they did share calls until the culprit's poisoned step


# --- 2. bounded cost per request ------------------------------------------------------------

def test_a_large_request_steps_at_a_usual_requests_share():
    """Pacing (pure): a request 4x the usual pixels steps once per 4 iterations beside usual ones,
    1.5x twice per 3; alone, heavy requests step every iteration (no idle engine)."""
    from dataclasses import dataclass

    from services.edge_server.batching import due

    @dataclass(eq=False)
    class Item:
        weight: float
        credit: float = 0.0

        def __post_init__(self):
            self.credit = self.weight - 1.0  # as the engine admits it: first step at once

    usual, large, odd = Item(1.0), Item(4.0), Item(1.5)
    counts = {id(usual): 0, id(large): 0, id(odd): 0}
    for _ in range(12):
        for item in due([usual, large, odd]):
            counts[id(item)] += 1
    assert (counts[id(usual)], counts[id(large)], counts[id(odd)]) == (12, 3, 8)
    alone = [Item(4.0), Item(3.0)]
    assert all(due(alone) == alone for _ in range(5))


def test_capabilities_declare_the_sizes_and_cost_served(edge):
    caps = asyncio.run(get_capabilities(edge.address, timeout=10))
    # The tiny pack's image is 32 px at 8 default steps: sides 8..64, cost max(64²·8, 32²·200).
    assert (caps.min_image_side, caps.max_image_side) == (8, 64)
    assert caps.max_request_cost == 32 * 32 * 200


@pytest.mark.parametrize("change,field", [
    (dict(height=256), "height"),  # legal for the wire (<= 2048), not served by this edge
    (dict(width=1024), "width"),
    (dict(height=64, width=64, steps=200, split=100), "split"),  # over the pixel-steps cap
])
def test_sizes_and_costs_beyond_the_edge_are_refused_naming_the_field(edge, change, field):
    error = refusal(edge.address, request_to_proto(req(**change), CodecSpec()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")
    if field == "split":
        assert "--max-request-cost" in error.details()


def test_limit_flags_set_what_is_served(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path, "--min-image-side", "16", "--max-image-side", "64",
                     "--max-request-cost", str(32 * 32 * 5)) as server:
        caps = asyncio.run(get_capabilities(server.address, timeout=10))
        assert (caps.min_image_side, caps.max_image_side, caps.max_request_cost) == (16, 64, 5120)
        assert refusal(server.address, request_to_proto(req(width=8), CodecSpec())).details().startswith("width:")
        assert refusal(server.address, request_to_proto(req(height=72), CodecSpec())).details().startswith("height:")
        assert refusal(server.address, request_to_proto(req(steps=6, split=6), CodecSpec())).details().startswith("split:")
        ok = asyncio.run(fetch_handoff(server.address, req(steps=6, split=5), CodecSpec(), timeout=60))
        assert ok.payload


def test_inconsistent_limit_flags_are_one_line(tiny_packs):
    command = [sys.executable, "-m", "services.edge_server", "--pack", str(tiny_packs["large"]), "--device", "cpu",
               "--port", str(free_port()), "--metrics-port", "0", "--min-image-side", "64", "--max-image-side", "32"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tandem-edge: error: --max-image-side: must be in 64 (the minimum)..2048, got 32" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_an_expired_request_is_dropped_at_the_next_step(tiny_packs, tmp_path):
    """A long request whose deadline passes stops stepping at once; another user's request
    behind it (one slot) then runs."""
    with edge_server(tiny_packs["large"], tmp_path, "--max-batch", "1", "--max-image-side", "128",
                     "--max-request-cost", "0") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            long = request_to_proto(req(steps=200, split=200, height=128, width=128), CodecSpec())
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(long, timeout=1.0))
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            bob = request_to_proto(req(user="bob"), CodecSpec())  # 3 edge steps
            assert list(stub.Generate(bob, timeout=60))[-1].WhichOneof("event") == "handoff"
            steps = metric_value(server.metrics(), "tandem_edge_steps_total")
            assert steps < 200 + 3  # the long one was dropped, not run out
            assert list(stub.Generate(bob, timeout=60))[-1].WhichOneof("event") == "handoff"
            # bob's 3 steps only: the expired request no longer steps.
            assert metric_value(server.metrics(), "tandem_edge_steps_total") == steps + 3


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_memory_returns_to_its_level_after_large_requests(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path, "--max-image-side", "512", "--max-request-cost", "0") as server:
        small = [req(seed=i) for i in range(4)]

        async def run(requests):
            return await asyncio.gather(*(fetch_handoff(server.address, r, CodecSpec(), timeout=120) for r in requests))

        for _ in range(2):  # warm up: allocator pools at their steady size for ordinary requests
            asyncio.run(run(small))
        before = _rss_bytes(server.proc.pid)
        asyncio.run(run([req(seed=i, height=512, width=512, steps=2, split=2) for i in range(4)]))
        asyncio.run(run(small))
        after = _rss_bytes(server.proc.pid)
    assert after <= before * 1.10, (before, after)


# --- 3. anonymous streams count against someone ---------------------------------------------

def _hold_one_stream(stub, metadata=()):
    call = stub.Generate(request_to_proto(req(steps=200, split=200), CodecSpec()), timeout=120, metadata=metadata)
    events = iter(call)
    next(events)  # submitted: the handler holds its stream slot
    return call


def test_empty_user_counts_against_the_caller_host(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path, "--max-streams-per-user", "1") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            held = _hold_one_stream(stub)
            error = refusal(server.address, request_to_proto(req(), CodecSpec()))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "host 127.0.0.1 already has 1 streams" in error.details()
            held.cancel()


def test_with_tokens_an_empty_user_counts_against_the_token_user(tiny_packs, tmp_path):
    """Before: alice's token with `user` empty was keyed by host, with `user=alice` by alice, so
    alternating the two gave her twice the cap (and every host's users shared one)."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": "alice", "tok-bob": "bob"}))
    alice, bob = [("authorization", "Bearer tok-alice")], [("authorization", "Bearer tok-bob")]
    with edge_server(tiny_packs["large"], tmp_path, "--max-streams-per-user", "1", "--tokens", str(tokens)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            held = _hold_one_stream(stub, alice)  # user left empty
            for user in ("", "alice"):
                error = refusal(server.address, request_to_proto(req(user=user or None), CodecSpec()), alice)
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "user alice already has 1 streams" in error.details()
            # bob, from the same host and also without `user`, is not alice.
            done = list(stub.Generate(request_to_proto(req(), CodecSpec()), timeout=60, metadata=bob))
            assert done[-1].WhichOneof("event") == "handoff"
            held.cancel()


# --- 4. undecodable messages, on all three servers ------------------------------------------

GARBAGE = {
    "truncated": b"\x0a\x05abc",           # field 1 claims 5 bytes, 3 follow
    "garbage": b"\xff\xff\xff\xff\xff\xff",
}


def bad_utf8(field: int) -> bytes:
    """String field number `field` holding invalid UTF-8."""
    return bytes([field << 3 | 2, 2, 0xFF, 0xFE])


def _raw_call(address: str, method: str, data: bytes, streaming: bool) -> grpc.RpcError:
    identity = lambda b: b  # noqa: E731 - the bytes go out as they are
    with grpc.insecure_channel(address) as channel:
        factory = channel.unary_stream if streaming else channel.unary_unary
        call = factory(method, request_serializer=identity, response_deserializer=identity)
        with pytest.raises(grpc.RpcError) as exc:
            result = call(data, timeout=30)
            if streaming:
                list(result)
    return exc.value


def _assert_undecodable_refused(address: str, method: str, streaming: bool, string_field: int) -> None:
    for name, data in {**GARBAGE, "bad_utf8": bad_utf8(string_field)}.items():
        error = _raw_call(address, method, data, streaming)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert error.details().startswith("request: the message could not be decoded"), (name, error.details())


def test_undecodable_messages_are_invalid_argument_on_the_edge(edge):
    _assert_undecodable_refused(edge.address, "/tandem.v1.EdgeService/Generate", streaming=True,
                                string_field=2)  # negative_prompt
    ok = asyncio.run(fetch_handoff(edge.address, req(steps=2, split=1), CodecSpec(), timeout=60))
    assert ok.payload  # and it goes on serving


def test_undecodable_messages_are_invalid_argument_on_the_device_service(tiny_packs, tmp_path):
    with device_service(tiny_packs["small"], tmp_path) as ue:
        _assert_undecodable_refused(ue.address, "/tandem.v1.DeviceService/Generate", streaming=True,
                                    string_field=2)  # edge_address


def test_undecodable_messages_are_invalid_argument_on_the_scheduler(tmp_path):
    with scheduler_service(tmp_path) as scheduler:
        for method in ("Plan", "Report", "ReportEdgeLoad"):
            _assert_undecodable_refused(scheduler.address, f"/tandem.v1.SchedulerService/{method}", streaming=False,
                                        string_field=1)  # user_id, plan_id, address


def test_undecodable_messages_still_need_a_token_first(tiny_packs, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": "alice"}))
    with edge_server(tiny_packs["large"], tmp_path, "--tokens", str(tokens)) as server:
        error = _raw_call(server.address, "/tandem.v1.EdgeService/Generate", GARBAGE["garbage"], streaming=True)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# --- 5. numeric fields ----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("guidance_scale", math.nan), ("guidance_scale", math.inf), ("guidance_scale", -math.inf),
    ("guidance_scale", -2.0), ("merge_ratio", math.nan), ("merge_ratio", math.inf), ("merge_ratio", -0.25),
])
def test_non_finite_and_negative_numbers_are_refused_naming_the_field(edge, field, value):
    message = request_to_proto(req(), CodecSpec())
    if field == "merge_ratio":
        message.codec.merge_ratio = value
    else:
        setattr(message, field, value)
    error = refusal(edge.address, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:")
