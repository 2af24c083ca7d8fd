"""Persistent gRPC channels (issue 31): one connection per target for a long-lived client, counted
by a TCP forwarder in front of the server (tests/link_proxy.py); the per-request handoff cap in
the stream reader; gRPC's reconnect after a server restart; the fallback when the edge goes away
mid-request. Fake servers in this process, except the device service test (real processes)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent import futures

import grpc
import pytest
from service_procs import device_service, edge_server, free_port

from services.cli import generate as cli
from services.common import scheduler_client
from services.common.channels import CLIENT_OPTIONS, SERVER_KEEPALIVE_OPTIONS, ChannelPool, SyncChannelPool
from services.common.lifecycle import NO_REUSEPORT
from services.common.security import ClientSecurity
from services.ue_client import client as ue_client
from services.ue_client.device import generate_via_edge
from services.ue_client.integrity import HandoffLimits
from services.ue_client.transport import MESSAGE_OVERHEAD, EdgeError, fetch_handoff, get_capabilities
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest
from tandem.v1 import (
    device_pb2,
    device_pb2_grpc,
    edge_pb2,
    edge_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tools.testbed.delay_proxy import DelayProxy

PROMPT = "a red circle at the left on a blue background"
CHUNK = 256 * 1024  # as the edge sends


def req(prompt: str = PROMPT) -> GenerationRequest:
    return GenerationRequest(prompt, steps=4, split=2, sampler="ddim", guidance_scale=3.0, seed=1, height=32, width=32)


class FakeEdge(edge_pb2_grpc.EdgeServiceServicer):
    """Answers a prompt "<size>" with a well-formed stream of that many bytes (not a real handoff:
    the transport does not decode it), "flood" with endless 1 MiB chunks, "stall" with nothing,
    "slow" with 1 s of keepalives (empty responses, every 0.1 s) before a well-formed stream,
    "late" with its last step's progress, then 1 s of silence (a chunk crossing a slow link), then
    the stream's chunks."""

    def __init__(self) -> None:
        self.stalled = asyncio.Event()
        self.ended: list[str] = []  # how each flood stream ended at the edge

    async def Generate(self, request, context):
        if request.prompt == "stall":
            self.stalled.set()
            await asyncio.Event().wait()
        if request.prompt == "slow":
            for _ in range(10):
                await asyncio.sleep(0.1)
                yield edge_pb2.GenerateResponse()
        if request.prompt == "flood":
            sent = 0
            try:
                for index in range(1 << 20):
                    yield edge_pb2.GenerateResponse(handoff=edge_pb2.HandoffChunk(
                        data=bytes(1 << 20), index=index, count=1 << 20, total_bytes=1 << 40))
                    sent += 1
            finally:
                self.ended.append("ran out" if sent == 1 << 20 else "stopped")
            return
        size = int(request.prompt) if request.prompt.isdigit() else 1000
        yield edge_pb2.GenerateResponse(progress=edge_pb2.Progress(step=request.split, total=request.split))
        if request.prompt == "late":
            await asyncio.sleep(1.0)
        count = max(1, -(-size // CHUNK))
        for index in range(count):
            data = bytes(min(CHUNK, size - index * CHUNK))
            yield edge_pb2.GenerateResponse(handoff=edge_pb2.HandoffChunk(data=data, index=index, count=count,
                                                                          total_bytes=size))

    async def GetCapabilities(self, request, context):
        return edge_pb2.GetCapabilitiesResponse()


async def start_edge(servicer: FakeEdge, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[NO_REUSEPORT])
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


# --- the pool itself ---------------------------------------------------------------------------

def test_one_channel_per_target_and_tls_identity_and_only_on_its_loop():
    ca, other_ca = b"-----BEGIN CERTIFICATE----- a", b"-----BEGIN CERTIFICATE----- b"

    async def scenario() -> None:
        pool = ChannelPool()
        plain = pool.get("127.0.0.1:1")
        assert pool.get("127.0.0.1:1") is plain
        assert pool.get("127.0.0.1:1", ClientSecurity(token="alice")) is plain  # a token is per call
        assert pool.get("127.0.0.1:1", ClientSecurity(ca=ca)) is not plain
        assert pool.get("127.0.0.1:1", ClientSecurity(ca=ca, token="x")) is pool.get("127.0.0.1:1", ClientSecurity(ca=ca))
        assert pool.get("127.0.0.1:1", ClientSecurity(ca=other_ca)) is not pool.get("127.0.0.1:1", ClientSecurity(ca=ca))
        assert pool.get("127.0.0.1:2") is not plain
        assert len(pool) == 4

        async def elsewhere() -> None:
            pool.get("127.0.0.1:1")

        with pytest.raises(RuntimeError, match="event loop"):  # grpc.aio channels work only on their loop
            await asyncio.to_thread(asyncio.run, elsewhere())
        await pool.close()
        assert len(pool) == 0
        with pytest.raises(RuntimeError, match="closed"):
            pool.get("127.0.0.1:1")

    asyncio.run(scenario())
    assert dict(CLIENT_OPTIONS)["grpc.keepalive_permit_without_calls"] == 1


def test_idle_keepalive_pings_are_allowed_by_the_servers_so_the_connection_stays():
    """By default a server answers pings on a connection without calls with GOAWAY
    "too_many_pings" (the connection drops, and the next call pays a handshake again); with
    SERVER_KEEPALIVE_OPTIONS it takes them. Timings scaled down: 1 s pings, 5 s idle."""
    server_options = dict(SERVER_KEEPALIVE_OPTIONS)
    assert dict(CLIENT_OPTIONS)["grpc.keepalive_time_ms"] >= server_options["grpc.http2.min_ping_interval_without_data_ms"]
    server_options["grpc.http2.min_ping_interval_without_data_ms"] = 500
    port = free_port()

    async def scenario(link: DelayProxy) -> None:
        server = grpc.aio.server(options=[NO_REUSEPORT, *server_options.items()])
        edge_pb2_grpc.add_EdgeServiceServicer_to_server(FakeEdge(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with ChannelPool([("grpc.keepalive_time_ms", 1000)]) as pool:
                await get_capabilities(link.address, timeout=10, channels=pool)
                await asyncio.sleep(5)
                await get_capabilities(link.address, timeout=10, channels=pool)
        finally:
            await server.stop(None)

    with DelayProxy(f"127.0.0.1:{port}") as link:
        asyncio.run(scenario(link))
        assert link.connections == 1


# --- the device's transport --------------------------------------------------------------------

def test_handoffs_over_a_pool_share_one_connection():
    """Fails on the code before issue 31: every fetch_handoff opened (and closed) its own channel."""
    port = free_port()

    async def scenario(link: DelayProxy) -> None:
        server, _ = await start_edge(FakeEdge(), port)
        try:
            async with ChannelPool() as pool:
                for size in (1000, 600_000, 10, 5000):
                    edge = await fetch_handoff(link.address, req(str(size)), CodecSpec(), timeout=10, channels=pool)
                    assert len(edge.payload) == size
                    await asyncio.sleep(0.2)  # calls apart, as requests come: nothing left over to share
                await get_capabilities(link.address, timeout=10, channels=pool)
            assert link.connections == 1
        finally:
            await server.stop(None)

    with DelayProxy(f"127.0.0.1:{port}") as link:
        asyncio.run(scenario(link))


def test_the_handoff_cap_is_the_readers_per_request_and_a_refused_stream_is_cancelled():
    """One channel serves requests of every size: a message over this request's cap is refused
    with RESOURCE_EXHAUSTED (as gRPC's per-request channel option did), the edge's stream is
    cancelled, and a larger request on the same channel still gets its bigger chunks."""
    async def scenario() -> None:
        edge = FakeEdge()
        server, port = await start_edge(edge)
        address = f"127.0.0.1:{port}"
        try:
            async with ChannelPool() as pool:
                small = HandoffLimits(max_bytes=4096)
                with pytest.raises(EdgeError) as info:
                    await fetch_handoff(address, req("flood"), CodecSpec(), timeout=10, limits=small, channels=pool)
                assert info.value.code == "RESOURCE_EXHAUSTED"
                assert f"vs. {4096 + MESSAGE_OVERHEAD})" in info.value.message
                for _ in range(100):
                    if edge.ended:
                        break
                    await asyncio.sleep(0.05)
                assert edge.ended == ["stopped"]  # the call was cancelled: not an endless stream
                big = await fetch_handoff(address, req("300000"), CodecSpec(), timeout=10,
                                          limits=HandoffLimits(max_bytes=300_000), channels=pool)
                assert len(big.payload) == 300_000  # a 256 KiB chunk, after a request capped at 4 KiB
                with pytest.raises(EdgeError, match="RESOURCE_EXHAUSTED"):  # the same chunk, over 100 KB + framing
                    await fetch_handoff(address, req("300000"), CodecSpec(), timeout=10,
                                        limits=HandoffLimits(max_bytes=100_000), channels=pool)
                assert len(pool) == 1
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_a_pooled_channel_serves_the_next_call_after_the_edge_restarts():
    """gRPC's own reconnect: restarted between calls, the next call goes through; a call while
    the edge is down fails at once (the device falls back), and the channel is back within its
    reconnect backoff (at most 5 s) once the edge is."""
    async def scenario() -> None:
        server, port = await start_edge(FakeEdge())
        address = f"127.0.0.1:{port}"
        async with ChannelPool() as pool:
            assert (await fetch_handoff(address, req(), CodecSpec(), timeout=10, channels=pool)).payload
            await server.stop(None)
            server, _ = await start_edge(FakeEdge(), port)
            assert (await fetch_handoff(address, req(), CodecSpec(), timeout=10, channels=pool)).payload
            await server.stop(None)
            began = time.monotonic()
            with pytest.raises(EdgeError, match="UNAVAILABLE"):
                await fetch_handoff(address, req(), CodecSpec(), timeout=10, channels=pool)
            assert time.monotonic() - began < 5  # not the deadline: the device falls back now
            server, _ = await start_edge(FakeEdge(), port)
            try:
                back = time.monotonic()
                while True:
                    try:
                        await fetch_handoff(address, req(), CodecSpec(), timeout=10, channels=pool)
                        break
                    except EdgeError:
                        assert time.monotonic() - back < 5 + 2, "the pooled channel did not reconnect"
                        await asyncio.sleep(0.1)
                assert len(pool) == 1
            finally:
                await server.stop(None)

    asyncio.run(scenario())


def test_an_edge_silent_past_the_stall_limit_is_given_up_and_keepalives_keep_one_waiting():
    """A frozen or cut-off edge (nothing sent, not even a keepalive) costs the device `stall_s`,
    not the request's whole deadline; an edge that sends keepalives while it works is waited for,
    and its keepalives time nothing (the queue phase starts at the first real event)."""
    async def scenario() -> None:
        server, port = await start_edge(FakeEdge())
        try:  # each call on a channel of its own (a one-shot caller's)
            with pytest.raises(EdgeError) as info:
                await fetch_handoff(f"127.0.0.1:{port}", req("stall"), CodecSpec(), timeout=600, stall_s=0.5)
            assert info.value.code == "UNAVAILABLE" and "sent nothing for 0.5 s" in info.value.message
            handoff = await fetch_handoff(f"127.0.0.1:{port}", req("slow"), CodecSpec(), timeout=600, stall_s=0.5)
            assert len(handoff.payload) == 1000
            assert handoff.link is not None and handoff.link.rtt_s >= 0.9  # to the first real event
            # After the last step, only the deadline bounds the bytes (no keepalive passes a chunk).
            handoff = await fetch_handoff(f"127.0.0.1:{port}", req("late"), CodecSpec(), timeout=600, stall_s=0.5)
            assert len(handoff.payload) == 1000
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_an_edge_restart_mid_request_ends_in_the_device_fallback(small_pack):
    """The device's path with a pool (the service's: the edge call runs on the pool's loop, the
    steps on a worker thread): the edge stops mid-request, the image is finished on the device
    and says why; the restarted edge then serves the same pooled channel."""
    async def scenario() -> None:
        edge = FakeEdge()
        server, port = await start_edge(edge)
        address = f"127.0.0.1:{port}"
        async with ChannelPool() as pool:
            job = asyncio.ensure_future(asyncio.to_thread(
                generate_via_edge, small_pack, req("stall"), CodecSpec(), address, 30, channels=pool))
            await asyncio.wait_for(edge.stalled.wait(), 30)
            await server.stop(None)  # the edge goes away while the device waits on it
            result = await asyncio.wait_for(job, 60)
            assert result.fallback and result.fallback.startswith("edge failed")
            assert result.edge_steps == 0 and result.device_steps == 4 and result.image.shape == (32, 32, 3)
            server, _ = await start_edge(FakeEdge(), port)
            try:
                assert (await fetch_handoff(address, req(), CodecSpec(), timeout=10, channels=pool)).payload
            finally:
                await server.stop(None)

    asyncio.run(scenario())


# --- the device service, as a process -----------------------------------------------------------

@pytest.mark.slow
def test_the_device_service_keeps_one_connection_to_its_edge(tiny_packs, tmp_path, capsys):
    """Fails on the code before issue 31 (a connection per handoff): three images through the
    device service, one TCP connection to the edge."""
    argv = ["generate", PROMPT, "--steps", "4", "--split", "2", "--json", "--quiet"]
    with edge_server(tiny_packs["large"], tmp_path) as edge, DelayProxy(edge.address) as link, \
            device_service(tiny_packs["small"], tmp_path, "--edge", link.address) as ue:
        for i in range(3):
            assert cli.main(argv + ["--ue", ue.address, "--out", str(tmp_path / f"{i}.png")]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["fallback"] is None and report["edge_steps"] == 2
        assert link.connections == 1


# --- the scheduler client and the CLI's device-service client ------------------------------------

class FakeScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def Plan(self, request, context):
        return scheduler_pb2.PlanResponse(plan_id="p1", steps=4, split=2)

    def Report(self, request, context):
        return scheduler_pb2.ReportResponse()


class FakeDevice(device_pb2_grpc.DeviceServiceServicer):
    def Generate(self, request, context):
        yield device_pb2.DeviceServiceGenerateResponse(progress=device_pb2.PhaseProgress(phase="device_steps", done=1,
                                                                                        total=1))
        yield device_pb2.DeviceServiceGenerateResponse(result=device_pb2.DeviceResult(device_steps=1))

    def GetLinkEstimate(self, request, context):
        return device_pb2.GetLinkEstimateResponse(rtt_seconds=0.05)


def sync_server(add) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[NO_REUSEPORT])
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_the_scheduler_and_device_clients_keep_one_channel_per_target():
    """A CLI run asks for a plan, reads the device's link, generates and reports: one connection
    to the scheduler and one to the device service (the code before issue 31: one per call, four each)."""
    scheduler, scheduler_address = sync_server(
        lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(FakeScheduler(), s))
    device, device_address = sync_server(lambda s: device_pb2_grpc.add_DeviceServiceServicer_to_server(FakeDevice(), s))
    try:
        with DelayProxy(scheduler_address) as to_scheduler, \
                DelayProxy(device_address) as to_device:
            for _ in range(2):
                assert ue_client.get_link_estimate(to_device.address, None, 5).rtt_s == 0.05
                plan = scheduler_client.request_plan(to_scheduler.address, "phone", timeout=5)
                assert plan is not None and plan.plan_id == "p1"
                result = ue_client.generate_on_device_service(to_device.address, edge_pb2.GenerateRequest(prompt="x"),
                                                              None, 5)
                assert result.device_steps == 1
                assert scheduler_client.report(to_scheduler.address, "p1", {}, 2, 2, 100, timeout=5)
            assert (to_scheduler.connections, to_device.connections) == (1, 1)
    finally:
        scheduler.stop(None)
        device.stop(None)


def test_a_sync_pool_reconnects_after_its_server_restarts_and_closes():
    servicer = FakeScheduler()
    server, address = sync_server(lambda s: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, s))
    pool = SyncChannelPool()
    stub = lambda: scheduler_pb2_grpc.SchedulerServiceStub(pool.get(address))  # noqa: E731
    assert stub().Plan(scheduler_pb2.PlanRequest(), timeout=5).plan_id == "p1"
    server.stop(None).wait()
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[NO_REUSEPORT])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    try:
        assert stub().Plan(scheduler_pb2.PlanRequest(), timeout=5).plan_id == "p1"
        assert len(pool) == 1
        pool.close()
        assert len(pool) == 0
    finally:
        server.stop(None)
