"""Edge server + UE client as real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_procs import edge_server, metric_value

from services.common.wire import request_to_proto
from services.ue_client.device import generate_via_edge
from services.ue_client.transport import EdgeError, fetch_handoff, get_capabilities
from tandem.handoff import CodecSpec
from tandem.pipeline import HybridPipeline
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2, edge_pb2_grpc

PROMPT = "a red circle at the left on a blue background"


def req(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, steps=6, split=3, sampler="dpmpp_2m", guidance_scale=3.0, seed=5, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def edge(tiny_packs, tmp_path_factory):
    with edge_server(tiny_packs["large"], tmp_path_factory.mktemp("edge"), "--max-batch", "16") as service:
        yield service


def test_grpc_image_equals_in_process_hybrid_image(edge, large_pack, small_pack):
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        request = req(sampler=sampler)
        local = HybridPipeline(large_pack, small_pack).generate(request, CodecSpec("fp32"))
        remote = generate_via_edge(small_pack, request, CodecSpec("fp32"), edge.address, timeout=60)
        assert remote.fallback is None
        assert remote.edge_steps == 3 and remote.handoff_bytes == local.handoff_bytes
        # Another process may split CPU kernels differently (thread count): float rounding only,
        # which can move a pixel across a rounding boundary, never further.
        scale = max(1.0, local.latent.abs().max().item())
        assert (remote.latent - local.latent).abs().max().item() <= 1e-5 * scale
        assert np.abs(remote.image.astype(int) - local.image.astype(int)).max() <= 1


def test_sixteen_concurrent_clients_complete_in_shared_batches(edge):
    before = edge.metrics()

    async def run_all():
        # sixteen users: one user's requests would run four at a time (--max-running-per-user)
        requests = [req(seed=i, steps=12, split=10, user=f"client{i}") for i in range(16)]
        return await asyncio.gather(*(fetch_handoff(edge.address, r, CodecSpec(), timeout=120) for r in requests))

    results = asyncio.run(run_all())
    assert len(results) == 16 and all(len(r.payload) > 0 for r in results)
    after = edge.metrics()
    calls = metric_value(after, "tandem_edge_batch_size_count") - metric_value(before, "tandem_edge_batch_size_count")
    singles = metric_value(after, "tandem_edge_batch_size_bucket", 'le="1.5"') - metric_value(before, "tandem_edge_batch_size_bucket", 'le="1.5"')
    steps = metric_value(after, "tandem_edge_steps_total") - metric_value(before, "tandem_edge_steps_total")
    assert steps == 16 * 10
    assert calls < steps and singles < calls  # batch sizes > 1 observed
    assert metric_value(after, "tandem_edge_requests_total", 'code="OK"') >= 16


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(prompt=""), "prompt"),
        (dict(steps=500), "steps"),
        (dict(split=9), "split"),
        (dict(sampler="heun"), "sampler"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(height=30), "height"),
        (dict(width=4096), "width"),
        (dict(user="not a name"), "user"),
        (dict(codec=edge_pb2.Codec(encoding="bf8")), "codec"),
        (dict(codec=edge_pb2.Codec(merge_ratio=0.9)), "merge_ratio"),
        (dict(codec=edge_pb2.Codec(merge_strategy="zip")), "merge_strategy"),
    ],
)
def test_malformed_requests_get_invalid_argument_naming_the_field(edge, change, field):
    message = request_to_proto(req(), CodecSpec())
    for key, value in change.items():
        if key == "codec":
            message.codec.CopyFrom(value)
        else:
            setattr(message, key, value)
    with grpc.insecure_channel(edge.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Generate(message, timeout=30))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith(f"{field}:")
        # ...and the server keeps serving.
        good = list(stub.Generate(request_to_proto(req(steps=2, split=1), CodecSpec()), timeout=30))
        assert good[-1].WhichOneof("event") == "handoff"


def test_oversized_request_is_refused_and_server_survives(edge):
    message = request_to_proto(req(), CodecSpec())
    message.negative_prompt = "x" * 100_000  # above the server's deliberate 64 KiB receive limit
    with grpc.insecure_channel(edge.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.Generate(message, timeout=30))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert list(stub.Generate(request_to_proto(req(steps=2, split=1), CodecSpec()), timeout=30))


def test_capabilities_health_and_reflection(edge):
    caps = asyncio.run(get_capabilities(edge.address, timeout=10))
    assert caps.latent_channels == 4 and caps.default_image_size == 32 and caps.max_batch_size == 16
    assert set(caps.samplers) == {"ddim", "euler", "dpmpp_2m"} and "int8" in caps.encodings
    with grpc.insecure_channel(edge.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tandem.v1.EdgeService", "grpc.health.v1.Health"} <= names


def test_cancellation_frees_the_slot(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path, "--max-batch", "1", "--max-queue", "4") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            long_call = stub.Generate(request_to_proto(req(steps=200, split=200), CodecSpec()), timeout=120)
            for event in long_call:  # wait until it holds the only slot and is stepping
                if event.WhichOneof("event") == "progress":
                    break
            long_call.cancel()
            began = time.monotonic()
            short = list(stub.Generate(request_to_proto(req(steps=2, split=2), CodecSpec()), timeout=60))
            waited = time.monotonic() - began
        assert short[-1].WhichOneof("event") == "handoff"
        time.sleep(0.3)
        text = server.metrics()
        assert metric_value(text, "tandem_edge_requests_total", 'code="CANCELLED"') == 1
        # The cancelled request stopped stepping: far fewer than its 200 steps ran.
        assert metric_value(text, "tandem_edge_steps_total") < 100, waited


def test_full_queue_answers_resource_exhausted(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path, "--max-batch", "1", "--max-queue", "1",
                     "--max-image-side", "128", "--max-request-cost", "0") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            long = request_to_proto(req(steps=200, split=200, height=128, width=128), CodecSpec())
            running = stub.Generate(long, timeout=120)
            running_events = iter(running)
            # "queued" comes at submission, before the engine admits it: wait until it steps, so
            # it holds the only slot (for 200 steps of the largest image) and the queue is empty.
            while next(running_events).WhichOneof("event") != "progress":
                pass
            queued = stub.Generate(long, timeout=120)
            assert next(iter(queued)).queued.position == 0
            # Nothing else to say while it waits: a keepalive (no event) every 0.25 s, so the
            # device can tell a waiting edge from a frozen one (services/common/wire.py).
            assert next(iter(queued)).WhichOneof("event") is None
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(long, timeout=60))
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in exc.value.details()
            running.cancel()
            queued.cancel()


def test_one_user_cannot_take_more_than_its_streams(tiny_packs, tmp_path):
    """--max-streams-per-user 1: alice's second concurrent stream is refused at once, bob's runs,
    and alice's slot is hers again once her first stream ends."""
    with edge_server(tiny_packs["large"], tmp_path, "--max-streams-per-user", "1") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            alice_long = request_to_proto(req(steps=200, split=200, user="alice"), CodecSpec())
            running = stub.Generate(alice_long, timeout=120)
            next(iter(running))  # admitted: holds alice's only slot
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(request_to_proto(req(user="alice"), CodecSpec()), timeout=60))
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "user alice already has 1 streams in flight" in exc.value.details()
            bob = list(stub.Generate(request_to_proto(req(user="bob"), CodecSpec()), timeout=60))
            assert bob[-1].WhichOneof("event") == "handoff"
            running.cancel()
            deadline = time.monotonic() + 30
            while True:  # the cancelled stream's slot is released when its handler ends
                try:
                    again = list(stub.Generate(request_to_proto(req(user="alice"), CodecSpec()), timeout=60))
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.2)
            assert again[-1].WhichOneof("event") == "handoff"


def test_stream_limiter_bookkeeping():
    from services.edge_server.limits import StreamLimiter, user_key

    limiter = StreamLimiter(2)
    assert limiter.try_acquire("a") and limiter.try_acquire("a") and not limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    limiter.release("a")
    assert limiter.try_acquire("a") and limiter.active == {"a": 2, "b": 1}
    for _ in range(3):
        limiter.release("a")  # an extra release never goes negative
    assert "a" not in limiter.active
    assert StreamLimiter(0).try_acquire("x") and all(StreamLimiter(0).try_acquire("x") for _ in range(100))
    assert user_key("alice", "ipv4:10.0.0.7:5123") == "user alice"
    assert user_key("", "ipv4:10.0.0.7:5123") == "host 10.0.0.7"
    assert user_key("", "ipv6:[::1]:5123") == "host [::1]"


def test_sigterm_drains_in_flight_and_refuses_new(tiny_packs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            in_flight = stub.Generate(request_to_proto(req(steps=120, split=120), CodecSpec()), timeout=120)
            events = iter(in_flight)
            while next(events).WhichOneof("event") != "progress":
                pass
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.Generate(request_to_proto(req(), CodecSpec()), timeout=30))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(events)
            assert rest[-1].WhichOneof("event") == "handoff"  # the in-flight request finished
        assert server.proc.wait(timeout=30) == 0
        assert "edge server stopped" in server.log()


@pytest.mark.slow
def test_kill_9_mid_stream_every_client_finishes_locally(tiny_packs, tmp_path, small_pack):
    with edge_server(tiny_packs["large"], tmp_path) as server:
        results, errors = [None] * 4, []
        progressed = threading.Event()

        def on_step(phase, done, total):
            if phase == "edge_steps":
                progressed.set()

        def client(i: int) -> None:
            try:
                request = req(seed=i, steps=150, split=140)
                results[i] = generate_via_edge(small_pack, request, CodecSpec(), server.address, timeout=60, on_step=on_step)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert progressed.wait(60)
        server.proc.kill()
        for t in threads:
            t.join(120)
    assert not errors
    for result in results:
        assert result is not None and result.image.shape == (32, 32, 3)
        assert result.fallback and "edge failed" in result.fallback
        assert result.edge_steps == 0 and result.device_steps == 150


def test_unreachable_edge_is_an_edge_error():
    with pytest.raises(EdgeError) as exc:
        asyncio.run(fetch_handoff("127.0.0.1:1", req(), CodecSpec(), timeout=5))
    assert exc.value.code == "UNAVAILABLE"


def test_a_stream_closed_at_a_yield_is_cancelled_and_counted_so(large_pack):
    """gRPC closes a handler suspended at a `yield` with GeneratorExit, not CancelledError: that is
    still the client leaving (CANCELLED in the metrics, the engine's slot freed), never an OK."""
    import asyncio

    from services.edge_server.engine import EdgeEngine
    from services.edge_server.servicer import EdgeServicer

    class Context:
        def invocation_metadata(self):
            return ()

        def peer(self):
            return "ipv4:127.0.0.1:1"

        def time_remaining(self):
            return 60.0

        async def abort(self, code, details):
            raise AssertionError(f"aborted {code}: {details}")

    engine = EdgeEngine(large_pack, trace_unet=False)
    servicer = EdgeServicer(engine)
    engine.start()

    async def leave_at_the_first_progress():
        stream = servicer.Generate(request_to_proto(req(steps=200, split=200), CodecSpec()), Context())
        async for event in stream:
            if event.WhichOneof("event") == "progress":
                break
        await stream.aclose()

    try:
        asyncio.run(leave_at_the_first_progress())
        deadline = time.monotonic() + 30
        while engine.batcher.running_count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.batcher.running_count == 0  # the slot is free
    finally:
        engine.stop()
    counted = {s.labels["code"]: s.value for m in engine.metrics.registry.collect()
               if m.name == "tandem_edge_requests" for s in m.samples if s.name == "tandem_edge_requests_total"}
    assert counted == {"CANCELLED": 1.0}
