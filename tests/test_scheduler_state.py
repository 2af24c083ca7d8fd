"""A scheduler that survives its restart (issue 29, item 4), and its per-user Plan rate limit
(item 2): the calibration, each user's link estimate and margin, edge occupancy and the plans
awaiting a report go to --state-file atomically and come back at start, each user's its own; a
corrupt file, one of another format version or one saved with another cost profile is ignored
with one warning. In process (the core, the file) and through real processes (SIGTERM, restart)."""

from __future__ import annotations

import json
import logging
import math

import grpc
import pytest
from service_procs import metric_value, scheduler_service

from services.scheduler import state
from services.scheduler.decide.calibration import UserLinks, UserMargins
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.live.core import AlreadyReported, LinkInput, Measured, PlanInput, PlanReport, SchedulerCore
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry
from services.scheduler.ratelimit import RateLimiter
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc


class Clock:
    """A monotonic clock that the test moves (the core's), and a wall clock at a fixed offset."""

    def __init__(self, now: float = 1000.0, wall_offset: float = 1.7e9):
        self.now, self.wall_offset = now, wall_offset

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset


def make_core(clock: Clock | None = None, costs: CostProfile | None = None, edges=("edge:1",),
              ttl_s: float = 1e9) -> SchedulerCore:
    clock = clock or Clock()
    registry = EdgeRegistry(ttl_s=ttl_s, clock=clock)
    for address in edges:
        registry.heartbeat(EdgeLoad(address))
    return SchedulerCore(synthetic_profile(), costs or CostProfile(), "greedy_ls", registry, clock=clock,
                         wall=clock.wall)


def ask(core: SchedulerCore, user: str, budget: float = 0.0):
    (assigned,) = core.decide([PlanInput("phone", LinkInput(), user_id=user, latency_budget_s=budget)],
                              [f"id:{user}"])
    return assigned


def run_and_report(core: SchedulerCore, clock: Clock, user: str, rate_bps: float, rtt_s: float, slowdown: float,
                   decode_s: float = 0.0) -> None:
    """One plan of ``user`` run over a link of ``rate_bps`` / ``rtt_s``, its device ``slowdown``
    times slower than predicted; ``decode_s``: the decode measured (0: as predicted)."""
    assigned = ask(core, user)
    plan = assigned.plan
    clock.now += 100.0  # the plan's edge round is long over: no plan loads the next one
    device = plan.device_seconds * slowdown
    measured = Measured(queue=plan.edge_seconds / plan.split + rtt_s, edge_steps=plan.edge_seconds,
                        transfer=plan.handoff_bytes * 8 / rate_bps, device_steps=device - (decode_s or 0.0),
                        decode=decode_s)
    core.report(PlanReport(assigned.plan_id, measured, handoff_bytes=plan.handoff_bytes))


def decision(assigned) -> tuple:
    p = assigned.plan
    return (p.steps, p.split, p.codec, p.merge_ratio, p.edge_seconds, p.transfer_seconds, p.device_seconds,
            p.latency_seconds, p.quality, assigned.link)


@pytest.fixture
def learned():
    """A core that has learned: alice on a slow link with a slow device, bob on a fast link."""
    clock = Clock()
    core = make_core(clock)
    for _ in range(4):
        run_and_report(core, clock, "alice", rate_bps=5e6, rtt_s=0.08, slowdown=1.4, decode_s=0.9)
        run_and_report(core, clock, "bob", rate_bps=80e6, rtt_s=0.01, slowdown=1.0)
    return core, clock


# --- the core's state, in process ------------------------------------------------------------------

def test_a_restored_core_plans_and_predicts_as_the_one_saved(learned, tmp_path):
    core, clock = learned
    path = tmp_path / "state.json"
    state.save(core, path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left

    fresh = make_core(Clock(clock.now + 5000.0, wall_offset=clock.wall_offset - 5000.0))  # another process's clock
    assert fresh.costs != core.costs and fresh.margin_of("id:alice") == 0.0
    assert state.restore(fresh, path)
    assert fresh.costs == core.costs  # the calibration
    for user in ("id:alice", "id:bob"):
        assert fresh.link_of(user) == core.link_of(user) and fresh.link_of(user).known
        assert fresh.margin_of(user) == core.margin_of(user)
    assert core.margin_of("id:alice") > 0.2 > 0.1 > core.margin_of("id:bob")  # each its own, not mixed
    assert core.link_of("id:alice").bandwidth_bps == pytest.approx(5e6)
    assert core.link_of("id:bob").bandwidth_bps == pytest.approx(80e6)
    assert not fresh.link_of("id:carol").known and fresh.margin_of("id:carol") == 0.0  # nobody's data lent
    for user, budget in (("alice", 30.0), ("bob", 30.0), ("carol", 0.0)):
        assert decision(ask(fresh, user, budget)) == decision(ask(core, user, budget))


def test_a_plan_awaiting_its_report_counts_after_a_restart_once(learned, tmp_path):
    core, clock = learned
    pending = ask(core, "alice")
    state.save(core, tmp_path / "state.json")
    fresh = make_core(Clock(clock.now))
    assert state.restore(fresh, tmp_path / "state.json")
    assert fresh.pending_reports == 1
    fresh.report(PlanReport(pending.plan_id, Measured(device_steps=1.0)))
    with pytest.raises(AlreadyReported):
        fresh.report(PlanReport(pending.plan_id, Measured(device_steps=1.0)))


def test_edge_occupancy_comes_back_on_the_new_clock(tmp_path):
    clock = Clock()
    core = make_core(clock)
    for user in ("alice", "bob"):
        assigned = ask(core, user)
        core.report(PlanReport(assigned.plan_id, Measured(queue=0.01, edge_steps=1.0, device_steps=0.5),
                               handoff_bytes=assigned.plan.handoff_bytes))
    saved = core.export_state()
    assert len(saved["occupancy"]) == 2
    state.save(core, tmp_path / "state.json")
    fresh = make_core(Clock(now=7.0, wall_offset=clock.wall() - 7.0))  # the same instant, another clock
    assert state.restore(fresh, tmp_path / "state.json")
    spans = fresh._occupancy.spans()
    assert [s.owner for s in spans] == [s.owner for s in core._occupancy.spans()] == ["id:alice", "id:bob"]
    assert [s.end - s.start for s in spans] == pytest.approx([s.end - s.start for s in core._occupancy.spans()], abs=1e-6)
    assert all(s.end <= 7.0 for s in spans)  # placed in the new clock's past, where they happened


def test_edges_live_at_the_save_route_plans_after_a_restart_within_their_ttl(tmp_path):
    clock = Clock()
    core = make_core(clock, edges=("10.0.0.1:50051", "10.0.0.2:50051"), ttl_s=5.0)
    clock.now += 3.0
    core.heartbeat(EdgeLoad("10.0.0.2:50051", queue_depth=2))  # heard 3 s after the other
    state.save(core, tmp_path / "state.json")
    restarted = Clock(now=50.0, wall_offset=clock.wall() + 1.0 - 50.0)  # back up 1 s later, on a new clock
    fresh = make_core(restarted, edges=(), ttl_s=5.0)
    assert state.restore(fresh, tmp_path / "state.json")
    assert {e.address for e in fresh.edges.live()} == {"10.0.0.1:50051", "10.0.0.2:50051"}
    assert ask(fresh, "alice").edge_address == "10.0.0.1:50051"  # the least loaded, before any heartbeat
    restarted.now += 1.5  # the first edge's TTL is over (4.5 s since it beat), the second's is not
    assert [e.address for e in fresh.edges.live()] == ["10.0.0.2:50051"]


def one_warning(caplog) -> str:
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    return warnings[0].getMessage()


def corrupt(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change,says", [
    (None, "is not JSON"),
    (lambda d: d.update(cost_profile="sha256:0123456789abcdef"), "was saved with another cost profile"),
    (lambda d: d.update(version=99), "is version 99; this scheduler reads version 1"),
    (lambda d: d.update(format="something else"), "is not a tandem-scheduler-state file"),
    (lambda d: d["state"]["margins"][0]["ratios"].append(1e9), "margins[0].ratios[4]: expected a number in [0, 2]"),
    (lambda d: d["state"]["links"][1].update(user=d["state"]["links"][0]["user"]), "links[1].user"),
    (lambda d: d["state"]["calibration"]["estimates"][0].update(samples=[-1.0]), "calibration.estimates[0].samples"),
    (lambda d: d["state"]["pending"].append({"plan_id": "x"}), "pending[0]: expected an object"),
    (lambda d: d["state"].pop("links"), "state: expected an object"),
    (lambda d: d["state"]["edges"].append({"address": "no-port", "queue_depth": 0, "running_requests": 0,
                                           "steps_per_second": 0.0, "seen_at": 0.0}), "edges[1]: address"),
])
def test_a_bad_state_file_is_ignored_with_one_warning(learned, tmp_path, caplog, change, says):
    """A file that cannot be restored, whole: nothing of it is taken, not even its good parts."""
    core, _ = learned
    path = tmp_path / "state.json"
    state.save(core, path)
    if change is None:
        path.write_bytes(path.read_bytes()[:-40])  # cut short: a crash mid-write of a non-atomic writer
    else:
        corrupt(path, change)
    fresh = make_core()
    before = fresh.export_state()
    with caplog.at_level(logging.INFO, logger="tandem.scheduler"):
        assert not state.restore(fresh, path)
    message = one_warning(caplog)
    assert says in message and "starting fresh" in message and str(path) in message
    assert fresh.export_state() == before


def test_a_state_from_another_cost_profile_is_ignored(learned, tmp_path, caplog):
    core, _ = learned
    state.save(core, tmp_path / "state.json")
    other = CostProfile(rtt_s=CostProfile().rtt_s * 2)
    assert state.profile_digest(other) != state.profile_digest(core.prior_costs)
    fresh = make_core(costs=other)
    with caplog.at_level(logging.INFO, logger="tandem.scheduler"):
        assert not state.restore(fresh, tmp_path / "state.json")
    assert "another cost profile" in one_warning(caplog) and fresh.costs == other


def test_no_file_is_a_first_start_without_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tandem.scheduler"):
        assert not state.restore(make_core(), tmp_path / "none.json")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_failed_save_keeps_the_last_good_file(learned, tmp_path, monkeypatch):
    core, _ = learned
    path = tmp_path / "state.json"
    state.save(core, path)
    good = path.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.os, "replace", fail)
    with pytest.raises(OSError):
        state.save(core, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_per_user_tables_keep_their_bounds_on_restore():
    links, margins = UserLinks(), UserMargins()
    for i in range(5):
        for _ in range(3):
            links.observe(f"u{i}", 1 << 20, 0.1 * (i + 1), 0.02)
            margins.observe(f"u{i}", 1.2, 1.0)
    small = UserLinks.restored(links.export(), max_users=2)
    assert [e["user"] for e in small.export()] == ["u3", "u4"]  # the most recent kept
    assert small.get("u4") == links.get("u4") and not small.get("u0").known
    assert [e["user"] for e in UserMargins.restored(margins.export(), max_users=3).export()] == ["u2", "u3", "u4"]


def test_the_state_file_is_json_without_code(learned, tmp_path):
    core, _ = learned
    state.save(core, tmp_path / "state.json")
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["format"] == "tandem-scheduler-state" and data["version"] == 1
    assert data["cost_profile"] == state.profile_digest(CostProfile())
    assert {e["user"] for e in data["state"]["links"]} == {"id:alice", "id:bob"}
    assert {e["user"] for e in data["state"]["margins"]} == {"id:alice", "id:bob"}


# --- the Plan rate limit, pure -------------------------------------------------------------------------

def test_the_rate_limit_gives_each_identity_its_burst_then_its_rate():
    now = [0.0]
    limit = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limit.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("alice") == pytest.approx(0.5)  # refused: a token in 0.5 s
    assert limit.take("bob") == 0.0  # everyone else is unaffected
    now[0] = 0.5
    assert limit.take("alice") == 0.0 and limit.take("alice") > 0
    now[0] = 100.0  # a pause refills up to the burst, no more
    assert [limit.take("alice") for _ in range(4)][-1] > 0


def test_the_rate_limit_is_off_at_rate_0_and_bounded_in_identities():
    off = RateLimiter(rate=0)
    assert all(off.take("alice") == 0.0 for _ in range(1000)) and len(off) == 0
    bounded = RateLimiter(rate=1.0, burst=1, max_identities=10)
    for i in range(100):
        bounded.take(f"u{i}")
    assert len(bounded) == 10
    with pytest.raises(ValueError):
        RateLimiter(rate=math.nan)


# --- real processes ----------------------------------------------------------------------------------

def stub(address: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    return scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(address))


def plan_request(user: str, **kw) -> pb.PlanRequest:
    return pb.PlanRequest(user_id=user, device_class="phone", latency_budget_seconds=30.0, **kw)


def served(s, user: str) -> tuple:
    reply = s.Plan(plan_request(user), timeout=10)
    s.Report(pb.ReportRequest(plan_id=reply.plan_id), timeout=10)  # nothing measured: moves nothing
    p = reply.predicted
    return (reply.steps, reply.split, reply.codec.encoding, p.edge, p.transfer, p.device, p.total,
            reply.planned_link.bandwidth_bps, reply.planned_link.rtt_seconds, reply.rate_source, reply.rtt_source)


def test_a_restarted_scheduler_keeps_what_it_learned_each_users_its_own(tmp_path):
    """SIGTERM, then a new process on the same --state-file: the calibrated decode time, and alice's
    and bob's own links (planned from their reports) and plans, as before; carol has none of theirs."""
    path = tmp_path / "state.json"
    with scheduler_service(tmp_path, "--state-file", str(path)) as sched:
        s = stub(sched.address)
        for user, rate, rtt in (("alice", 5e6, 0.08), ("bob", 80e6, 0.01)):
            for _ in range(4):
                reply = s.Plan(plan_request(user), timeout=10)
                assert reply.split > 0
                measured = pb.MeasuredPhases(queue=reply.predicted.edge / reply.split + rtt,
                                             edge_steps=reply.predicted.edge,
                                             transfer=reply.predicted_handoff_bytes * 8 / rate,
                                             device_steps=reply.predicted.device * 1.3, decode=2.0)
                s.Report(pb.ReportRequest(plan_id=reply.plan_id, measured=measured,
                                          handoff_bytes=reply.predicted_handoff_bytes), timeout=10)
        before = {user: served(s, user) for user in ("alice", "bob", "carol")}
        decode = metric_value(sched.metrics(), "tandem_scheduler_device_decode_seconds", 'device_class="phone"')
    assert sched.proc.returncode == 0  # stopped by SIGTERM, gracefully
    # the round trip each user's own reports measured (the demo pack's handoffs are too small to time a rate)
    assert before["alice"][-1] == before["bob"][-1] == "reports" and before["carol"][-1] == "profile"
    assert before["alice"][8] == pytest.approx(0.08, rel=0.2) and before["bob"][8] == pytest.approx(0.01, rel=0.5)

    with scheduler_service(tmp_path, "--state-file", str(path)) as again:
        s = stub(again.address)
        after = {user: served(s, user) for user in ("alice", "bob", "carol")}
        assert metric_value(again.metrics(), "tandem_scheduler_device_decode_seconds", 'device_class="phone"') == decode
    assert after == before
    assert "restored" in again.log() and "WARNING" not in again.log()


def test_a_corrupt_state_file_is_ignored_with_one_warning_and_replaced(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"format": "tandem-scheduler-state", "version": 1, "cost_pro')
    with scheduler_service(tmp_path, "--state-file", str(path), "--state-interval", "0.2") as sched:
        s = stub(sched.address)
        s.Plan(plan_request("alice"), timeout=10)
        warnings = [line for line in sched.log().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "is not JSON" in warnings[0] and "starting fresh" in warnings[0]
    assert json.loads(path.read_text())["format"] == "tandem-scheduler-state"  # replaced by a good one


def test_an_unwritable_state_file_fails_the_start_in_one_line(tmp_path):
    import subprocess
    import sys

    from service_procs import ROOT, free_port

    missing = tmp_path / "no" / "such" / "state.json"
    done = subprocess.run([sys.executable, "-m", "services.scheduler", "--port", str(free_port()), "--metrics-port",
                           "0", "--state-file", str(missing)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines()[-1].startswith("tandem-scheduler: error: --state-file: cannot write ")


def test_plans_beyond_a_users_rate_are_resource_exhausted_and_others_unaffected(tmp_path):
    with scheduler_service(tmp_path, "--plan-rate", "0.2", "--plan-burst", "3") as sched:
        s = stub(sched.address)
        for _ in range(3):
            s.Plan(plan_request("mallory"), timeout=10)
        with pytest.raises(grpc.RpcError) as exc:
            s.Plan(plan_request("mallory"), timeout=10)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = exc.value.details()
        assert details.startswith("rate limit: 'id:mallory' asked for more than 0.2 plans/s (burst 3")
        assert "--plan-rate" in details and "retry in " in details
        assert s.Plan(plan_request("bob"), timeout=10).plan_id  # everyone else is unaffected
        assert metric_value(sched.metrics(), "tandem_scheduler_requests_total",
                            'code="RESOURCE_EXHAUSTED",method="Plan"') == 1


def test_the_plan_rate_is_on_by_default_and_reads_its_variables(monkeypatch):
    from services.scheduler.server import parse_args

    args = parse_args([])
    assert (args.plan_rate, args.plan_burst, args.state_file) == (20.0, 40, None)
    monkeypatch.setenv("TANDEM_SCHEDULER_PLAN_RATE", "0")
    monkeypatch.setenv("TANDEM_SCHEDULER_STATE_FILE", "/var/lib/tandem/scheduler-state.json")
    args = parse_args([])
    assert args.plan_rate == 0 and args.state_file == "/var/lib/tandem/scheduler-state.json"
