"""The scheduler across many edges: a draining edge says it is leaving and gets no new plan before
its TTL (the heartbeat sender in-process, then real processes on loopback), and the multi-edge
bench's simulation (bench/multi_edge.py) on tiny sizes."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from bench import multi_edge
from services.edge_server.engine import EngineLoad
from services.edge_server.heartbeat import Work, send_heartbeats
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc
from tests.service_procs import edge_server, free_port, scheduler_service, wait_edges_live


class Recorder(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self) -> None:
        self.beats: list[pb.ReportEdgeLoadRequest] = []

    async def ReportEdgeLoad(self, request, context):
        self.beats.append(request)
        return pb.ReportEdgeLoadResponse(live_edges=1, ttl_seconds=5.0)


def test_the_heartbeat_says_leaving_at_once_and_carries_the_measured_work():
    async def scenario() -> list[pb.ReportEdgeLoadRequest]:
        recorder = Recorder()
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            work, leaving = [Work(2, 5, 0.1)], asyncio.Event()
            task = asyncio.create_task(send_heartbeats(
                f"127.0.0.1:{port}", "127.0.0.1:50051", lambda: EngineLoad(3, 2, 100), interval_s=600.0,
                work=lambda: work[0], leaving=leaving))
            while not recorder.beats:
                await asyncio.sleep(0.01)
            work[0] = Work(6, 17, 0.5)  # 4 iterations advancing 12 request-steps in 0.4 s since
            leaving.set()  # the next beat is 10 minutes away: the leaving one must not wait for it
            await asyncio.wait_for(task, 60)
            return recorder.beats
        finally:
            await server.stop(None)

    beats = asyncio.run(scenario())
    assert [b.leaving for b in beats] == [False, True]
    first, last = beats
    assert first.interval_iterations == first.interval_steps == 0  # nothing ran since it started
    assert (last.interval_iterations, last.interval_steps) == (4, 12)
    assert last.interval_busy_seconds == pytest.approx(0.4)
    assert (last.address, last.queue_depth, last.running_requests) == ("127.0.0.1:50051", 3, 2)


def test_the_last_heartbeat_never_blocks_a_drain_when_the_scheduler_is_gone():
    async def scenario() -> None:
        leaving = asyncio.Event()
        leaving.set()
        await asyncio.wait_for(send_heartbeats(f"127.0.0.1:{free_port()}", "127.0.0.1:50051",
                                               lambda: EngineLoad(0, 0, 0), interval_s=0.1, leaving=leaving,
                                               leaving_timeout_s=0.5), 60)

    asyncio.run(scenario())  # returns (logged), raises nothing


@pytest.mark.slow
def test_a_draining_edge_gets_no_new_plan_before_its_ttl(tiny_packs, tmp_path):
    """A real edge heartbeats; SIGTERM makes it drain and say so: the scheduler stops routing to it
    at once, well before its 60 s TTL, and plans go to the other edge."""
    ttl = 60.0
    with scheduler_service(tmp_path, "--edge-ttl", str(ttl)) as sched, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address) as edge:
        s = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(sched.address))
        other = f"127.0.0.1:{free_port()}"  # an edge on this host, heard once (it lives for the TTL)
        s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=other, queue_depth=30, running_requests=16), timeout=10)
        wait_edges_live(sched, 2, 60, "the edge server never heartbeated")
        plan = pb.PlanRequest(user_id="u", device_class="cpu-demo", link=pb.LinkEstimate(bandwidth_bps=100e6))
        first = s.Plan(plan, timeout=30)
        assert first.split > 0 and first.edge_address == edge.address  # the idle one, while it serves

        edge.proc.send_signal(signal.SIGTERM)
        told = time.monotonic()
        wait_edges_live(sched, 1, ttl / 2, "the draining edge was still live half its TTL after SIGTERM")
        assert time.monotonic() - told < ttl  # dropped by its own word, not by the TTL
        after = [s.Plan(plan, timeout=30) for _ in range(3)]
        assert all(p.split > 0 and p.edge_address == other for p in after), [p.edge_address for p in after]
        assert edge.proc.wait(timeout=60) == 0
        assert "is leaving" in edge.log() and "is leaving (draining)" in sched.log()


def test_the_bench_simulation_runs_on_tiny_sizes_and_routes_by_speed(capsys):
    rows = multi_edge.simulation(sizes=(2,), duration=15.0, warmup=3.0, tolerance=0.1)
    assert [(r.edges, r.fleet) for r in rows] == [(2, "equal"), (2, "gpu+cpu"), (2, "two gpus")]
    for row in rows:
        assert set(row.results) == set(multi_edge.POLICIES)
    mixed = rows[1].results
    # Round robin sends half the requests to the CPU-like edge; finish-time routing sends it fewer.
    assert mixed["round-robin"].shares["gpu"] == pytest.approx(0.5, abs=0.05)
    assert mixed["finish"].shares["gpu"] > mixed["round-robin"].shares["gpu"]
    multi_edge.print_simulation(rows, 15.0)
    assert "| 2 | 1× gpu, 1× cpu |" in capsys.readouterr().out
    assert multi_edge.failures([multi_edge.Row(2, "gpu+cpu", {
        "finish": multi_edge.SimResult(1.0, 1.0, 1.0, {}), "least-load": multi_edge.SimResult(2.0, 1.0, 2.0, {}),
        "round-robin": multi_edge.SimResult(0.5, 1.0, 0.5, {})})]) == ["2 edges (gpu+cpu), finish vs least-load: 0.500x (should beat it)"]
