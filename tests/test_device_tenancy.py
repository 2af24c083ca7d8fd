"""Multi-tenant safety on the device side (issue 14), against real processes: the device service
is no open relay, user tokens go only to verified edges, hostile handoffs fall back locally with
the reason (memory bounded), cancelled calls stop at the next step, bad numbers are named."""

from __future__ import annotations

import asyncio
import io
import json
import math
import socket
import time

import grpc
import pytest
from PIL import Image
from service_procs import device_service, fake_edge, metric_value, rss_bytes, scheduler_service

from services.cli import generate as cli
from services.ue_client.client import generate_on_device_service
from services.ue_client.device import events_until_done
from tandem.v1 import device_pb2, device_pb2_grpc, edge_pb2

PROMPT = "a red circle at the left on a blue background"
DEVICE_TOKEN = "device-secret"


@pytest.fixture(scope="module")
def hostile(tiny_packs, tmp_path_factory):
    """A hostile edge, and a device service configured with it (and its own edge token)."""
    tmp = tmp_path_factory.mktemp("tenancy")
    with fake_edge(tiny_packs["large"], tmp) as edge, \
            device_service(tiny_packs["small"], tmp, "--edge", edge.address, "--edge-token", DEVICE_TOKEN) as ue:
        yield edge, ue


def generate(ue, prompt: str, **fields) -> device_pb2.DeviceResult:
    message = edge_pb2.GenerateRequest(prompt=prompt, steps=fields.pop("steps", 4), split=fields.pop("split", 2),
                                       **fields)
    return generate_on_device_service(ue.address, message, None, timeout=30)


def raw_call(ue, edge_address: str = "", timeout: float = 0.0, **fields):
    message = device_pb2.DeviceServiceGenerateRequest(
        request=edge_pb2.GenerateRequest(prompt=PROMPT, steps=4, split=2, **fields),
        edge_address=edge_address, edge_timeout_seconds=timeout)
    with grpc.insecure_channel(ue.address) as channel:
        return list(device_pb2_grpc.DeviceServiceStub(channel).Generate(message, timeout=60))


def test_a_caller_cannot_point_the_device_at_another_edge(hostile):
    """Item 5: edge_address must be one of the service's own --edge; its token never leaves."""
    edge, ue = hostile
    with socket.socket() as trap:  # an "attacker" that would see any connection the device makes
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.setblocking(False)
        host, port = trap.getsockname()
        for address in (f"{host}:{port}", f"dns:///{host}:{port}", "unix:/tmp/tandem-attacker.sock"):
            with pytest.raises(grpc.RpcError) as info:
                raw_call(ue, edge_address=address)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("edge_address: ")
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody connected
    before = metric_value(edge.metrics(), "fake_edge_generate_total", 'token="yes"', default=0)
    result = generate(ue, PROMPT)  # empty edge_address: the configured edge, with the device's token
    assert metric_value(edge.metrics(), "fake_edge_generate_total", 'token="yes"') == before + 1
    assert result.fallback  # and what that (hostile) edge sent was not believed


@pytest.mark.parametrize("timeout", [math.nan, -1.0, math.inf, -math.inf, 1e9, 3e38, 3.4028234663852886e38])
def test_bad_edge_timeouts_are_named(hostile, timeout):
    """Item 11: NaN / negative / infinite / absurd deadlines are refused, naming the field."""
    with pytest.raises(grpc.RpcError) as info:
        raw_call(hostile[1], timeout=timeout)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("edge_timeout_seconds: ")


@pytest.mark.parametrize("attack, reason", [
    ("other", "answers another request"),
    ("big", "can be at most"),  # refused on the first chunk's declared size, before buffering
    ("fewer", "answers another request"),  # its request (and schedule) had fewer steps
    ("flood", "RESOURCE_EXHAUSTED"),  # a 4 MiB chunk is over the request's whole byte cap
])
def test_a_hostile_handoff_falls_back_with_the_reason(hostile, attack, reason):
    """Item 6: the image still arrives, made locally, and says why; memory stays where it was."""
    edge, ue = hostile
    generate(ue, f"warm: {PROMPT}")  # allocator warmed by a legitimate-size fallback first
    before = rss_bytes(ue.proc)
    for _ in range(3):
        result = generate(ue, f"{attack}: {PROMPT}", seed=5)
        assert reason in result.fallback and "finished locally" in result.fallback
        assert result.edge_steps == 0 and result.device_steps == 4 and result.handoff_bytes == 0
        assert Image.open(io.BytesIO(result.png)).size == (32, 32)
    assert rss_bytes(ue.proc) <= before * 1.10


def test_cancelled_calls_stop_at_the_next_step(hostile):
    """Item 7: 12 calls of 200 device steps, each cancelled once its first step is reported, run
    at most one more step each; the valid request after them gets the device at once."""
    edge, ue = hostile
    metrics = ue.metrics()
    cancelled_before = metric_value(metrics, "tandem_ue_requests_total", 'code="CANCELLED"', default=0)
    after_before = metric_value(metrics, "tandem_ue_steps_after_cancel_total")
    message = device_pb2.DeviceServiceGenerateRequest(
        request=edge_pb2.GenerateRequest(prompt=PROMPT, steps=200, split=0))
    with grpc.insecure_channel(ue.address) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        for _ in range(12):
            call = stub.Generate(message, timeout=120)
            for response in call:
                if response.WhichOneof("event") == "progress" and response.progress.phase == "device_steps":
                    call.cancel()
                    break
            else:
                pytest.fail("the call ended before its first device step was reported")
    result = generate(ue, PROMPT, split=0)  # takes its turn only after every cancelled worker stopped
    assert result.device_steps == 4 and not result.fallback
    metrics = ue.metrics()
    assert metric_value(metrics, "tandem_ue_requests_total", 'code="CANCELLED"') == cancelled_before + 12
    steps_after_cancel = metric_value(metrics, "tandem_ue_steps_after_cancel_total") - after_before
    assert steps_after_cancel <= 12  # ≤ one step each (they would have run ~199 more each)


def test_the_progress_loop_loses_no_event_and_leaves_no_getter_behind():
    """events_until_done, the loop of the gRPC and the HTTP streams: every event queued before the
    job ends is yielded, in order; a consumer that closes it at a yield, or is cancelled while it
    waits, gets its CancelledError and leaves no getter behind to swallow a later event."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[int] = asyncio.Queue()

        def work() -> None:  # the worker thread, as on_step does
            for i in range(50):
                loop.call_soon_threadsafe(events.put_nowait, i)
                if i % 10 == 0:
                    time.sleep(0.002)

        job = asyncio.ensure_future(asyncio.to_thread(work))
        assert [event async for event in events_until_done(job, events)] == list(range(50))

        never: asyncio.Future = loop.create_future()  # a job still running
        events.put_nowait(1)
        events.put_nowait(2)
        stream = events_until_done(never, events)
        assert await stream.__anext__() == 1
        await stream.aclose()  # the consumer left at a yield
        assert events.get_nowait() == 2

        async def consume() -> list[int]:
            return [event async for event in events_until_done(never, events)]

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)  # waiting on the empty queue
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        events.put_nowait(3)
        await asyncio.sleep(0.01)  # a getter left behind would take it now
        assert events.qsize() == 1
        never.cancel()

    asyncio.run(scenario())


def test_a_call_cancelled_while_the_edge_stalls_frees_the_device(hostile):
    """Cancelled while its (stalling) edge says nothing: the device does not wait out the edge's
    600 s deadline; the next request is served (its own deadline is 2 minutes)."""
    edge, ue = hostile
    calls_before = sum(metric_value(edge.metrics(), "fake_edge_generate_total", f'token="{t}"', default=0)
                       for t in ("yes", "no"))
    message = device_pb2.DeviceServiceGenerateRequest(
        request=edge_pb2.GenerateRequest(prompt=f"stall: {PROMPT}", steps=4, split=2), edge_timeout_seconds=600)
    with grpc.insecure_channel(ue.address) as channel:
        call = device_pb2_grpc.DeviceServiceStub(channel).Generate(message, timeout=900)
        while sum(metric_value(edge.metrics(), "fake_edge_generate_total", f'token="{t}"', default=0)
                  for t in ("yes", "no")) == calls_before:
            time.sleep(0.05)  # until the device is waiting on the edge
        call.cancel()
    result = generate(ue, PROMPT, split=0)
    assert result.device_steps == 4 and not result.fallback


def test_the_cli_sends_its_token_only_to_trusted_edges(hostile, tmp_path, capsys, monkeypatch, tiny_packs):
    """A plaintext edge known only from the scheduler's plan gets no token (the CLI says so); the
    edge the user named with --edge, or listed in TANDEM_TRUSTED_EDGES, gets it."""
    edge, _ = hostile
    monkeypatch.delenv("TANDEM_TRUSTED_EDGES", raising=False)

    def tokens() -> tuple[float, float]:
        text = edge.metrics()
        return (metric_value(text, "fake_edge_generate_total", 'token="yes"', default=0),
                metric_value(text, "fake_edge_generate_total", 'token="no"', default=0))

    def run(name: str, *args: str) -> tuple[dict, str]:
        argv = ["generate", f"other: {PROMPT}", "--small", str(tiny_packs["small"]), "--device", "cpu",
                "--steps", "4", "--token", "user-secret", "--out", str(tmp_path / name), "--json", "--quiet", *args]
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out), captured.err

    with scheduler_service(tmp_path, "--edge", edge.address) as sched:
        yes, no = tokens()
        report, err = run("planned.png", "--scheduler", sched.address, "--device-class", "phone")
        assert report["plan"] is not None and report["fallback"]  # the plan's edge was used (and not believed)
        assert tokens() == (yes, no + 1)
        assert "your token was not sent" in err and edge.address in err

        monkeypatch.setenv("TANDEM_TRUSTED_EDGES", f"10.0.0.1:1, {edge.address}")
        run("listed.png", "--scheduler", sched.address, "--device-class", "phone")
        assert tokens() == (yes + 1, no + 1)
    monkeypatch.delenv("TANDEM_TRUSTED_EDGES")
    _, err = run("named.png", "--edge", edge.address, "--split", "2")
    assert tokens() == (yes + 2, no + 1) and "token was not sent" not in err



@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_honest_handoffs_pass_the_checks_and_fit_the_cap(large_pack, small_pack, sampler):
    """No false alarms: a real edge's handoff for every sampler and codec, at the largest split
    with history, passes the device's checks within its byte cap; each attack's does not."""
    from services.ue_client.integrity import HandoffLimits, HandoffRejected, check_header, wire_codec
    from tandem.codec.container import CodecError, unpack_container
    from tandem.handoff import CodecSpec, decode_handoff, encode_handoff
    from tandem.pipeline import make_handoff, run_steps, start
    from tandem.request import GenerationRequest
    from tandem.sampling.schedule import make_schedule
    from tools.testbed.fake_edge import hostile_payload, tampered

    request = GenerationRequest(PROMPT, steps=5, split=4, sampler=sampler, guidance_scale=3.3, seed=7,
                                height=32, width=32, negative_prompt="blurry").validate()
    shape = small_pack.latent_shape(32, 32)
    device_schedule = make_schedule(sampler, 5, small_pack.sampler_config)
    state = start(large_pack, request)
    run_steps(large_pack, state, request.split)
    for codec in (CodecSpec("fp32"), CodecSpec("int8", 0.5), CodecSpec("fp16", 0.3, "denoised", "global")):
        payload = encode_handoff(make_handoff(state, request), wire_codec(codec))  # as the edge gets it
        assert len(payload) == HandoffLimits.for_request(request, shape, codec).max_bytes  # the exact size
        check_header(unpack_container(payload)[0], request, shape)
        decode_handoff(payload, request, device_schedule)
    other_noise = make_schedule(sampler, 5, {**small_pack.sampler_config, "beta_end": 0.02})
    with pytest.raises(CodecError, match="another schedule"):  # made with another noise process
        decode_handoff(encode_handoff(make_handoff(state, request), CodecSpec()), request, other_noise)
    for attack in ("other", "big", "fewer"):
        payload = hostile_payload(large_pack, tampered(request, attack), CodecSpec())
        with pytest.raises(HandoffRejected):
            check_header(unpack_container(payload)[0], request, shape)


def test_a_named_edge_stands_for_each_replica_it_resolves_to_and_nothing_else():
    """--edge edge:50051 (a scaled compose service) lets a caller name a replica by the address the
    scheduler planned to (one that name resolves to now, at its port); any other address, another
    port, or a name nobody configured is still refused naming edge_address."""
    from services.ue_client.call import choose_edge
    from tandem.request import RequestError

    replicas = {"edge": {"172.18.0.3", "172.18.0.5"}}

    def resolve(name: str) -> set[str]:
        return replicas.get(name, set())

    edges = ("edge:50051", "10.0.0.9:50051")
    assert choose_edge("", edges, resolve) == "edge:50051"
    assert choose_edge("172.18.0.5:50051", edges, resolve) == "172.18.0.5:50051"
    assert choose_edge("10.0.0.9:50051", edges, resolve) == "10.0.0.9:50051"
    for bad in ("172.18.0.7:50051", "172.18.0.5:50052", "evil.example:50051", "edge:50052", "172.18.0.5"):
        with pytest.raises(RequestError) as refused:
            choose_edge(bad, edges, resolve)
        assert refused.value.field == "edge_address"


def test_a_full_wait_is_answered_resource_exhausted_at_once(tiny_packs, tmp_path):
    """--max-waiting 1: with one call running and one waiting for the device's turn, a third is
    refused at once with a status naming the bound, not queued past its caller's deadline; the
    waiting one still runs when the turn comes."""
    long_message = device_pb2.DeviceServiceGenerateRequest(
        request=edge_pb2.GenerateRequest(prompt=PROMPT, steps=200, split=0))
    with device_service(tiny_packs["small"], tmp_path, "--max-waiting", "1") as ue, \
            grpc.insecure_channel(ue.address) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        running = stub.Generate(long_message, timeout=120)
        next(iter(running))  # it holds the turn
        waiting = stub.Generate(device_pb2.DeviceServiceGenerateRequest(
            request=edge_pb2.GenerateRequest(prompt=PROMPT, steps=4, split=0)), timeout=120)
        deadline = time.monotonic() + 30
        while metric_value(ue.metrics(), "tandem_ue_waiting_requests") < 1:
            assert time.monotonic() < deadline, "the second call never waited"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(long_message, timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-waiting 1" in info.value.details()
        running.cancel()
        results = [r.result for r in waiting if r.WhichOneof("event") == "result"]
        assert len(results) == 1 and results[0].device_steps == 4
        assert metric_value(ue.metrics(), "tandem_ue_waiting_requests") == 0
        assert metric_value(ue.metrics(), "tandem_ue_requests_total", 'code="RESOURCE_EXHAUSTED"') == 1
