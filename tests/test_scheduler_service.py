"""The scheduler service as a real process on 127.0.0.1: plans, frames, reports, edge routing,
bad input, and the CLI and the edge server talking to it."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_procs import edge_server, free_port, metric_value, scheduler_service, wait_edges_live

from services.cli import generate as cli
from tandem.codec.spec import DEFAULT_STRATEGY
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc

OPTION_STEPS = {10, 15, 20, 25}


def stub(address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))


def plan_request(**kw) -> pb.PlanRequest:
    base = dict(device_class="cpu", link=pb.LinkEstimate(bandwidth_bps=50e6, rtt_seconds=0.02))
    return pb.PlanRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    with scheduler_service(tmp_path_factory.mktemp("scheduler"), "--frame-ms", "20") as service:
        yield service


def test_plan_returns_a_valid_plan(scheduler):
    reply = stub(scheduler.address).Plan(plan_request(personalized_user="alice", latency_budget_seconds=30.0,
                                                      prompt_chars=40), timeout=10)
    assert reply.plan_id and reply.steps in OPTION_STEPS and 0 <= reply.split <= reply.steps
    assert reply.codec.encoding in ("fp32", "fp16", "int8") and 0 <= reply.codec.merge_ratio <= 0.75
    assert reply.codec.merge_strategy == DEFAULT_STRATEGY and reply.frame_size >= 1
    p = reply.predicted
    assert p.total == pytest.approx(p.edge + p.transfer + p.device) and p.total > 0
    assert 0 < reply.predicted_quality <= 1 and reply.predicted_handoff_bytes >= 0
    assert reply.edge_address == ""  # no edge known yet
    text = scheduler.metrics()
    assert metric_value(text, "tandem_scheduler_decision_seconds_count") >= 1
    assert sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("tandem_scheduler_plans_total{")) >= 1


def test_reflection_lists_the_service(scheduler):
    with grpc.insecure_channel(scheduler.address) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "tandem.v1.SchedulerService" in names and "grpc.health.v1.Health" in names


def test_concurrent_plans_are_decided_in_one_frame(tmp_path):
    # A long window and a max frame of 8: the frame closes exactly when the 8th request arrives.
    with scheduler_service(tmp_path, "--frame-ms", "10000", "--max-frame", "8") as service:
        async def plan_all():
            async with grpc.aio.insecure_channel(service.address) as channel:
                aio_stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                devices = ["cpu", "phone", "laptop-gpu", "phone"] * 2
                return await asyncio.gather(*(aio_stub.Plan(plan_request(device_class=d), timeout=60) for d in devices))

        replies = asyncio.run(plan_all())
        assert [r.frame_size for r in replies] == [8] * 8 and len({r.plan_id for r in replies}) == 8
        text = service.metrics()
        assert metric_value(text, "tandem_scheduler_frame_size_count") == 1
        assert metric_value(text, "tandem_scheduler_frame_size_sum") == 8
    assert service.proc.returncode == 0 and "scheduler stopped" in service.log()  # SIGTERM: clean stop


def test_report_recalibrates_and_records_the_prediction_error(scheduler):
    s = stub(scheduler.address)
    before = scheduler.metrics()
    decode_before = metric_value(before, "tandem_scheduler_device_decode_seconds", 'device_class="phone"')
    for _ in range(3):  # robust calibration: what three reports agree on moves the model
        reply = s.Plan(plan_request(device_class="phone", latency_budget_seconds=2.0), timeout=10)
        measured = pb.MeasuredPhases(edge_steps=reply.predicted.edge, transfer=reply.predicted.transfer,
                                     device_steps=1.0, decode=5.0)
        answer = s.Report(pb.ReportRequest(plan_id=reply.plan_id, measured=measured,
                                           handoff_bytes=reply.predicted_handoff_bytes), timeout=10)
        assert answer.total_relative_error > 0 and answer.budget_violated  # 6+ s measured against 2 s
    after = scheduler.metrics()
    assert metric_value(after, "tandem_scheduler_reports_total") == metric_value(before, "tandem_scheduler_reports_total") + 3
    for phase in ("total", "device"):
        key = f'phase="{phase}"'
        assert metric_value(after, "tandem_scheduler_latency_relative_error_count", key) == \
            metric_value(before, "tandem_scheduler_latency_relative_error_count", key, default=0) + 3
    assert metric_value(after, "tandem_scheduler_budget_violations_total") == \
        metric_value(before, "tandem_scheduler_budget_violations_total") + 3
    assert metric_value(after, "tandem_scheduler_device_decode_seconds", 'device_class="phone"') > decode_before
    with pytest.raises(grpc.RpcError) as exc:  # reported once
        s.Report(pb.ReportRequest(plan_id=reply.plan_id, measured=measured), timeout=10)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and exc.value.details().startswith("plan_id: ")
    with pytest.raises(grpc.RpcError) as exc:
        s.Report(pb.ReportRequest(plan_id="f" * 32, measured=measured), timeout=10)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and exc.value.details().startswith("plan_id: ")


@pytest.mark.parametrize(
    "method,message,field",
    [
        ("Plan", plan_request(device_class="toaster"), "device_class"),
        ("Plan", plan_request(device_class=""), "device_class"),
        ("Plan", plan_request(link=pb.LinkEstimate(bandwidth_bps=-5)), "link.bandwidth_bps"),
        ("Plan", plan_request(link=pb.LinkEstimate(spectral_efficiency=float("nan"))), "link.spectral_efficiency"),
        ("Plan", plan_request(personalized_user="no such name!"), "personalized_user"),
        ("Plan", plan_request(latency_budget_seconds=-1), "latency_budget_seconds"),
        ("Plan", plan_request(prompt_chars=100000), "prompt_chars"),
        ("Plan", plan_request(link=pb.LinkEstimate(bandwidth_bps=5e6, rtt_seconds=1e300)), "link.rtt_seconds"),
        ("Plan", plan_request(link=pb.LinkEstimate(bandwidth_bps=1e300)), "link.bandwidth_bps"),
        ("Plan", plan_request(latency_budget_seconds=float("inf")), "latency_budget_seconds"),
        ("Plan", plan_request(energy_budget_joules=float("nan")), "energy_budget_joules"),
        ("Plan", plan_request(user_id="u" * 15000), "user_id"),
        ("Report", pb.ReportRequest(plan_id="x", measured=pb.MeasuredPhases(decode=-1)), "measured.decode"),
        ("Report", pb.ReportRequest(plan_id="x", measured=pb.MeasuredPhases(edge_steps=1e308)), "measured.edge_steps"),
        ("Report", pb.ReportRequest(plan_id="x", measured=pb.MeasuredPhases(queue=float("nan"))), "measured.queue"),
        ("Report", pb.ReportRequest(plan_id="x", edge_steps=4_000_000_000), "edge_steps"),
        ("Report", pb.ReportRequest(plan_id="x", handoff_bytes=1 << 62), "handoff_bytes"),
        ("Report", pb.ReportRequest(plan_id="p" * 15000), "plan_id"),
        ("ReportEdgeLoad", pb.ReportEdgeLoadRequest(address="no-port"), "address"),
        ("ReportEdgeLoad", pb.ReportEdgeLoadRequest(address="h" * 8000 + ":1"), "address"),
        ("ReportEdgeLoad", pb.ReportEdgeLoadRequest(address="h:1", steps_per_second=float("inf")), "steps_per_second"),
        ("ReportEdgeLoad", pb.ReportEdgeLoadRequest(address="h:1", steps_per_second=-1.0), "steps_per_second"),
    ],
)
def test_malformed_requests_get_invalid_argument_naming_the_field(scheduler, method, message, field):
    s = stub(scheduler.address)
    with pytest.raises(grpc.RpcError) as exc:
        getattr(s, method)(message, timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field}: ")
    assert s.Plan(plan_request(), timeout=10).plan_id  # still serving
    assert metric_value(scheduler.metrics(), "tandem_scheduler_requests_total",
                        f'code="INVALID_ARGUMENT",method="{method}"') >= 1


def test_plans_go_to_the_least_loaded_live_edge_and_silent_edges_are_dropped(tmp_path):
    busy, idle = "10.9.0.1:50051", "10.9.0.2:50051"  # listed: another host may report for them
    with scheduler_service(tmp_path, "--edge-ttl", "1", "--edge", busy, "--edge", idle) as service:
        s = stub(service.address)
        s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=busy, queue_depth=40, running_requests=16), timeout=10)
        answer = s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=idle, steps_per_second=50.0), timeout=10)
        assert answer.live_edges == 2 and answer.ttl_seconds == 1.0
        for _ in range(3):
            reply = s.Plan(plan_request(), timeout=10)
            assert reply.split > 0 and reply.edge_address == idle
        # Only the busy edge keeps beating: the idle one expires and is no longer chosen.
        deadline = time.monotonic() + 30
        while s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=busy, queue_depth=40), timeout=10).live_edges != 1:
            assert time.monotonic() < deadline, "the silent edge was never dropped"
            time.sleep(0.2)
        assert s.Plan(plan_request(), timeout=10).edge_address == busy
        assert metric_value(service.metrics(), "tandem_scheduler_edges_live") == 1


@pytest.mark.slow
def test_cli_takes_the_plan_and_the_edge_that_heartbeats_and_reports(tiny_packs, tmp_path, capsys):
    with scheduler_service(tmp_path) as sched, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address) as edge:
        wait_edges_live(sched, 1, 60, "the edge server never heartbeated")  # first heartbeat
        base = ["generate", "a red circle at the left on a blue background", "--small", str(tiny_packs["small"]),
                "--device", "cpu", "--scheduler", sched.address, "--device-class", "phone", "--json", "--quiet"]
        assert cli.main(base + ["--out", str(tmp_path / "a.png")]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (tmp_path / "a.png").stat().st_size > 0
        assert report["mode"] == "grpc" and report["fallback"] is None  # the edge came from the plan
        assert report["total_steps"] in OPTION_STEPS and report["edge_steps"] == report["split"] > 0
        assert report["plan"]["reported"] and report["plan"]["scheduler"] == sched.address

        # Options set on the command line win over the plan.
        argv = base + ["--out", str(tmp_path / "b.png"), "--steps", "6", "--codec", "fp32", "--edge", edge.address]
        assert cli.main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["total_steps"] == 6 and report["codec"]["encoding"] == "fp32" and 0 <= report["split"] <= 6

        text = sched.metrics()
        assert metric_value(text, "tandem_scheduler_reports_total") == 2
        assert metric_value(text, "tandem_scheduler_latency_relative_error_count", 'phase="total"') == 1  # as planned


def test_cli_without_a_scheduler_keeps_its_defaults_and_says_so(tiny_packs, tmp_path, capsys):
    argv = ["generate", "a red circle", "--out", str(tmp_path / "c.png"), "--large", str(tiny_packs["large"]),
            "--small", str(tiny_packs["small"]), "--device", "cpu", "--scheduler", f"127.0.0.1:{free_port()}",
            "--json", "--quiet"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    notes = [line for line in captured.err.splitlines() if "NOTE" in line]
    assert len(notes) == 1 and "scheduler" in notes[0] and "using the default options" in notes[0]
    assert "Traceback" not in captured.err
    assert report["plan"] is None and report["codec"]["encoding"] == "fp16" and report["codec"]["merge_ratio"] == 0
    assert report["split"] == report["total_steps"] // 2


@pytest.mark.slow
def test_two_real_edges_share_the_load_and_a_killed_one_is_routed_around(tiny_packs, tmp_path, capsys):
    """Scale-out on loopback: two edge servers heartbeat; plans spread over both; after one is
    killed (-9) new requests go to the other, and an image still comes from an edge."""
    with scheduler_service(tmp_path, "--edge-ttl", "1") as sched, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address) as edge_a, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address) as edge_b:
        s = stub(sched.address)
        wait_edges_live(sched, 2, 60, "the edge servers never both heartbeated")
        chosen = [s.Plan(plan_request(device_class="phone"), timeout=10).edge_address for _ in range(8)]
        assert set(chosen) == {edge_a.address, edge_b.address}, chosen

        edge_a.proc.kill()
        edge_a.proc.wait()
        wait_edges_live(sched, 1, 30, "the killed edge was never dropped")
        chosen = {s.Plan(plan_request(device_class="phone"), timeout=10).edge_address for _ in range(4)}
        assert chosen == {edge_b.address}

        out = tmp_path / "after.png"
        argv = ["generate", "a red circle at the left on a blue background", "--small", str(tiny_packs["small"]),
                "--device", "cpu", "--scheduler", sched.address, "--device-class", "phone", "--out", str(out),
                "--json", "--quiet"]
        assert cli.main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["fallback"] is None and report["edge_steps"] > 0 and out.stat().st_size > 0
