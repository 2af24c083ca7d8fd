"""Multi-tenant safety of the scheduler (issue 14), against real processes: no caller can register
a fake edge, poison the shared cost model, degrade its frame with an unmeetable budget, push out
another user's pending plans, or report on another user's plan."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from service_procs import edge_server, metric_value, scheduler_service, wait_edges_live

from services.common.security import SecurityError
from services.scheduler.server import edge_credentials, parse_args
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc

USER_TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
EDGE_TOKENS = {"edge-secret-1": "edge-a"}
FAKE_EDGE = "10.66.0.1:50051"


def stub(address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def plan_request(**kw) -> pb.PlanRequest:
    base = dict(device_class="phone", link=pb.LinkEstimate(bandwidth_bps=50e6, rtt_seconds=0.02))
    return pb.PlanRequest(**{**base, **kw})


def rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call(*args, **kw)
    return exc.value


def decision(reply: pb.PlanResponse) -> tuple:
    """Everything a plan decides and predicts (not its id, its edge or its frame); predictions to
    12 significant digits (the allocator's sums may differ in the last bit with the frame's order)."""
    p = reply.predicted
    predicted = (p.edge, p.transfer, p.device, reply.predicted_quality, reply.predicted_energy_joules)
    return (reply.steps, reply.split, reply.codec.encoding, reply.codec.merge_ratio, reply.meets_budget,
            *(float(f"{x:.12g}") for x in predicted))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "users.json").write_text(json.dumps(USER_TOKENS))
    (folder / "edges.json").write_text(json.dumps(EDGE_TOKENS))
    return folder / "users.json", folder / "edges.json"


# --- item 3: edge registration -------------------------------------------------------------------

def test_without_edge_auth_only_listed_or_own_address_edges_register(tmp_path):
    listed = "10.66.0.9:50051"
    with scheduler_service(tmp_path, "--edge", listed, "--max-edges", "3") as sched:
        s = stub(sched.address)
        error = rpc_error(s.ReportEdgeLoad, pb.ReportEdgeLoadRequest(address=FAKE_EDGE), timeout=10)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error.details().startswith("address: ")
        assert "10.66.0.1" in error.details() and "127.0.0.1" in error.details()
        assert s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=listed), timeout=10).live_edges == 1
        assert s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address="127.0.0.1:50999"), timeout=10).live_edges == 2
        assert s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address="localhost:50998"), timeout=10).live_edges == 3
        error = rpc_error(s.ReportEdgeLoad, pb.ReportEdgeLoadRequest(address="127.0.0.1:50997"), timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details().startswith("address: ")
        assert "--max-edges 3" in error.details()
        assert s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=listed), timeout=10).live_edges == 3  # known: beats
        chosen = {s.Plan(plan_request(), timeout=10).edge_address for _ in range(12)}
        assert FAKE_EDGE not in chosen and "127.0.0.1:50997" not in chosen
        assert metric_value(sched.metrics(), "tandem_scheduler_requests_total",
                            'code="PERMISSION_DENIED",method="ReportEdgeLoad"') == 1


def test_with_edge_tokens_a_user_token_cannot_register_an_edge(tmp_path, token_files, tiny_packs):
    users, edges = token_files
    with scheduler_service(tmp_path, "--tokens", str(users), "--edge-tokens", str(edges), "--edge-ttl", "2") as sched, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address,
                        "--scheduler-token", "edge-secret-1") as edge:
        s = stub(sched.address)
        fake = pb.ReportEdgeLoadRequest(address=FAKE_EDGE)
        error = rpc_error(s.ReportEdgeLoad, fake, timeout=10, metadata=bearer("tok-alice"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "edge credential" in error.details()
        error = rpc_error(s.ReportEdgeLoad, fake, timeout=10)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "edge credential" in error.details()
        error = rpc_error(s.ReportEdgeLoad, fake, timeout=10, metadata=bearer("edge-secret-1x"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        # The real edge server heartbeats with its credential and gets every plan that splits.
        wait_edges_live(sched, 1, 60, "the edge server with an edge credential never registered")
        chosen = {s.Plan(plan_request(user_id="alice"), timeout=10, metadata=bearer("tok-alice")).edge_address
                  for _ in range(12)}
        assert chosen <= {edge.address, ""} and edge.address in chosen
        # And an edge credential is not a user token.
        error = rpc_error(s.Plan, plan_request(), timeout=10, metadata=bearer("edge-secret-1"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_edge_tokens_must_not_be_user_tokens(tmp_path, token_files):
    users, edges = token_files
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"tok-alice": "edge-z"}))
    assert edge_credentials(parse_args(["--tokens", str(users), "--edge-tokens", str(edges)])) == EDGE_TOKENS
    with pytest.raises(SecurityError, match="^--edge-tokens: "):
        edge_credentials(parse_args(["--tokens", str(users), "--edge-tokens", str(shared)]))


# --- items 4 and 11: measurements ------------------------------------------------------------------

def test_hostile_measurements_leave_a_benign_users_plan_unchanged(tmp_path):
    with scheduler_service(tmp_path, "--edge", "127.0.0.1:50999") as sched:
        s = stub(sched.address)
        benign = plan_request(user_id="bob", latency_budget_seconds=30.0)
        before = decision(s.Plan(benign, timeout=10))
        rtt_before = metric_value(sched.metrics(), "tandem_scheduler_rtt_seconds")
        for hostile, field in ((plan_request(link=pb.LinkEstimate(bandwidth_bps=5e6, rtt_seconds=1e300)),
                                "link.rtt_seconds"),
                               (plan_request(link=pb.LinkEstimate(spectral_efficiency=1e300)), "link.spectral_efficiency"),
                               (plan_request(latency_budget_seconds=-1e-9), "latency_budget_seconds")):
            error = rpc_error(s.Plan, hostile, timeout=10)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}: ")
        # In bounds but extreme: a 9.9 s RTT shapes only its own plan.
        slow_link = s.Plan(plan_request(user_id="mallory", link=pb.LinkEstimate(bandwidth_bps=1e3, rtt_seconds=9.9)),
                           timeout=10)
        assert slow_link.split == 0 or slow_link.predicted.transfer >= 9.9
        mine = s.Plan(plan_request(user_id="mallory"), timeout=10)
        # A plan on the edge loads it until reported (tests/test_edge_occupancy.py): this one
        # reports nothing measured, so only the extreme report below could still move bob's plan.
        s.Report(pb.ReportRequest(plan_id=slow_link.plan_id), timeout=10)
        error = rpc_error(s.Report, pb.ReportRequest(plan_id=mine.plan_id, measured=pb.MeasuredPhases(edge_steps=1e308)),
                          timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("measured.edge_steps: ")
        # One report at the physical bounds is accepted, once, and moves nothing.
        extreme = pb.MeasuredPhases(queue=3000, edge_steps=3000, transfer=3000, device_steps=3000, decode=3000)
        s.Report(pb.ReportRequest(plan_id=mine.plan_id, measured=extreme, handoff_bytes=1 << 29), timeout=10)
        assert decision(s.Plan(benign, timeout=10)) == before
        assert metric_value(sched.metrics(), "tandem_scheduler_rtt_seconds") == rtt_before


# --- item 8: frame isolation -------------------------------------------------------------------------

NORMAL = [plan_request(user_id=f"u{i}", device_class=d, latency_budget_seconds=b)
          for i, (d, b) in enumerate((("phone", 30.0), ("laptop-gpu", 0.0), ("cpu", 60.0), ("phone", 0.0)))]


def plan_together(address: str, requests: list[pb.PlanRequest]) -> list[pb.PlanResponse]:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            aio_stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            return await asyncio.gather(*(aio_stub.Plan(r, timeout=120) for r in requests))

    return list(asyncio.run(run()))


@pytest.mark.parametrize("budget", [1e-300, 0.5])
def test_an_unmeetable_budget_does_not_worsen_the_others(tmp_path, budget):
    # Long windows: a frame closes exactly when it is full (4 without, 5 with the hostile request).
    with scheduler_service(tmp_path, "--frame-ms", "60000", "--max-frame", "4") as alone, \
            scheduler_service(tmp_path, "--frame-ms", "60000", "--max-frame", "5") as mixed:
        without = plan_together(alone.address, NORMAL)
        replies = plan_together(mixed.address, [*NORMAL, plan_request(user_id="x", latency_budget_seconds=budget)])
        infeasible_count = metric_value(mixed.metrics(), "tandem_scheduler_infeasible_plans_total")
    assert infeasible_count == 1
    assert [r.frame_size for r in without] == [4] * 4 and [r.frame_size for r in replies] == [4] * 4 + [1]
    # Each user the same plan (a frame is planned in a canonical order, whatever the arrival order).
    assert [decision(r) for r in replies[:4]] == [decision(r) for r in without]
    assert not any(r.budget_infeasible for r in replies[:4]) and all(r.infeasible_reason == "" for r in replies[:4])
    worst = replies[4]
    assert worst.budget_infeasible and not worst.meets_budget and worst.steps > 0
    assert worst.infeasible_reason.startswith("latency_budget_seconds ")


# --- items 9 and 10: per-user state and reports --------------------------------------------------------

def test_a_plan_flood_evicts_only_the_flooders_own_plans(tmp_path):
    with scheduler_service(tmp_path, "--max-pending-per-user", "5") as sched:
        s = stub(sched.address)
        bob = s.Plan(plan_request(user_id="bob"), timeout=10)
        error = rpc_error(s.Plan, plan_request(user_id="m" * 15000), timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("user_id: ")
        flood = [s.Plan(plan_request(user_id="mallory"), timeout=10).plan_id for _ in range(12)]
        s.Report(pb.ReportRequest(plan_id=bob.plan_id), timeout=10)  # still pending: answered OK
        error = rpc_error(s.Report, pb.ReportRequest(plan_id=flood[0]), timeout=10)
        assert error.code() == grpc.StatusCode.NOT_FOUND  # her own oldest went first
        assert metric_value(sched.metrics(), "tandem_scheduler_pending_plans") == 5  # hers; bob's reported
        for plan_id in flood[-5:]:
            s.Report(pb.ReportRequest(plan_id=plan_id), timeout=10)


def test_with_tokens_a_report_counts_only_for_the_users_own_plan_and_once(tmp_path, token_files):
    users, _ = token_files
    with scheduler_service(tmp_path, "--tokens", str(users), "--max-pending-per-user", "3") as sched:
        s = stub(sched.address)
        alice = s.Plan(plan_request(user_id="alice"), timeout=10, metadata=bearer("tok-alice"))
        report = pb.ReportRequest(plan_id=alice.plan_id, measured=pb.MeasuredPhases(decode=0.8))
        error = rpc_error(s.Report, report, timeout=10, metadata=bearer("tok-bob"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error.details().startswith("plan_id: ")
        # Bob leaving user_id empty is still bob: his flood evicts his own plans only.
        for _ in range(8):
            s.Plan(plan_request(), timeout=10, metadata=bearer("tok-bob"))
        s.Report(report, timeout=10, metadata=bearer("tok-alice"))
        error = rpc_error(s.Report, report, timeout=10, metadata=bearer("tok-alice"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error.details().startswith("plan_id: ")


def test_a_frames_plans_do_not_depend_on_arrival_order():
    """Who arrives first (or where an infeasible request lands) never changes anyone's plan."""
    from services.scheduler.live.core import LinkInput, PlanInput
    from services.scheduler.server import build_core

    core = build_core(parse_args([]))
    users = [PlanInput(r.device_class, LinkInput(r.link.bandwidth_bps, r.link.rtt_seconds), user_id=r.user_id,
                       latency_budget_s=r.latency_budget_seconds) for r in NORMAL]
    hopeless = PlanInput("phone", LinkInput(50e6, 0.02), user_id="x", latency_budget_s=0.5)

    def plans(requests):
        return {a.plan.user_id: a.plan for a in core.decide(requests) if a.plan.user_id != "x"}

    first = plans(users)
    for order in (users[::-1], users[1:] + users[:1], [users[2], hopeless, users[0], users[3], users[1]]):
        assert plans(order) == first


# --- the pure pieces ------------------------------------------------------------------------------

def test_pending_plans_evict_the_biggest_holder_never_a_waiting_user():
    from services.scheduler.live.pending import PendingPlans

    table: PendingPlans[int] = PendingPlans(max_total=6, max_per_owner=4)
    table.add("bob-1", "bob", 1)
    table.add("carol-1", "carol", 2)
    for i in range(10):  # over her quota: her own oldest go
        table.add(f"m-{i}", "mallory", i)
    assert table.count("mallory") == 4 and table.get("m-5") is None and table.get("m-9") == 9
    assert table.get("bob-1") == 1 and table.get("carol-1") == 2 and len(table) == 6
    for i in range(5):  # the table is full: the biggest holder's plans go, then the newest identity's
        table.add(f"x-{i}", f"fresh-{i}", i)
    assert table.get("bob-1") == 1 and table.get("carol-1") == 2 and len(table) == 6
    assert table.pop("bob-1") == 1 and table.pop("bob-1") is None and table.count("bob") == 0


def test_edge_admission_decisions():
    from services.scheduler.edge_auth import check_edge, peer_ip

    assert peer_ip("ipv4:127.0.0.1:5555") == "127.0.0.1" and peer_ip("ipv6:[::1]:5555") == "::1"
    assert peer_ip("ipv6:[::ffff:10.0.0.7]:1") == "10.0.0.7" and peer_ip("unix:/tmp/s") is None
    assert check_edge("10.0.0.7:1", None, None, (), "10.0.0.7", ["10.0.0.7"]) is None  # its own host
    assert check_edge("edge:1", None, None, (), "10.0.0.7", ["10.0.0.8"]).code == "PERMISSION_DENIED"
    assert check_edge("edge:1", None, None, ("edge:1",), None, []) is None  # listed with --edge
    assert check_edge("edge:1", None, "tok-alice", (), None, []).code == "PERMISSION_DENIED"
    assert check_edge("x:1", EDGE_TOKENS, None, ("x:1",), "10.0.0.7", []).code == "UNAUTHENTICATED"
    assert check_edge("x:1", EDGE_TOKENS, "tok-alice", (), "10.0.0.7", []).code == "PERMISSION_DENIED"
    assert check_edge("x:1", EDGE_TOKENS, "edge-secret-1", (), "10.0.0.7", []) is None
