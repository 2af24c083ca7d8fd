"""Routing across edges of different speeds (services/scheduler/decide/routing.py) and the registry's
drain (an edge that says it is leaving): pure, no network, an injected clock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from services.scheduler.decide.costs import CostProfile, EdgeCoefficients
from services.scheduler.decide.routing import EdgeView, Speed, StepModel, finish_seconds, route
from services.scheduler.live.core import PlanInputError, SchedulerCore, check_heartbeat
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry

MODEL = StepModel(a_s=0.02, b_s=0.01, max_batch=8)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def measured(scale: float, iterations: int = 10, batch: int = 2, model: StepModel = MODEL) -> Speed:
    """The speed an edge running ``scale`` times the model's seconds reports."""
    return Speed().observe(iterations, iterations * batch, scale * iterations * model.iteration_seconds(batch))


def beat(address: str, scale: float | None = None, queue: int = 0, running: int = 0, leaving: bool = False,
         iterations: int = 10, batch: int = 2, model: StepModel = MODEL) -> EdgeLoad:
    """A heartbeat; ``scale``: the edge ran its interval at that multiple of the model's seconds."""
    if scale is None:
        return EdgeLoad(address, queue, running, leaving=leaving)
    busy = scale * iterations * model.iteration_seconds(batch)
    return EdgeLoad(address, queue, running, steps_per_second=iterations * batch / max(busy, 1e-9), leaving=leaving,
                    interval_iterations=iterations, interval_steps=iterations * batch, interval_busy_s=busy)


# --- the pure model --------------------------------------------------------------------------
def test_finish_time_is_k_iterations_within_the_batch_and_a_queue_beyond_it():
    assert finish_seconds(10, 0, MODEL) == pytest.approx(10 * (0.02 + 0.01))
    assert finish_seconds(10, 3, MODEL) == pytest.approx(10 * (0.02 + 0.01 * 4))
    assert finish_seconds(10, 3, MODEL, scale=2.5) == pytest.approx(2.5 * 10 * (0.02 + 0.01 * 4))
    # 16 requests ahead of a batch of 8: the 17th waits for about two batches' worth of work.
    assert finish_seconds(10, 16, MODEL) == pytest.approx(10 * (0.02 + 0.01 * 8) * 17 / 8)
    loads = [finish_seconds(5, n, MODEL) for n in range(40)]
    assert loads == sorted(loads)  # more load never finishes earlier


def test_a_measured_speed_is_relative_to_the_model_and_an_idle_interval_keeps_it():
    speed = measured(3.0)
    assert speed.scale(MODEL) == pytest.approx(3.0)
    assert speed.observe(0, 0, 0.0) == speed  # an idle interval changes nothing
    assert speed.observe(5, 5, math.nan) == speed
    assert Speed().scale(MODEL) == 1.0  # not measured: the model's own
    # Decayed: after a few intervals at a new speed, the new one dominates.
    for _ in range(10):
        speed = speed.observe(10, 20, 1.0 * 10 * MODEL.iteration_seconds(2))
    assert speed.scale(MODEL) == pytest.approx(1.0, rel=0.1)
    # A wild measurement is kept within bounds.
    assert Speed().observe(1, 1, 1e9).scale(MODEL) == 1000.0


def test_the_faster_edge_takes_plans_until_its_load_makes_the_slower_one_finish_first():
    fast, slow = EdgeView("fast:1", speed=measured(1.0)), EdgeView("slow:1", speed=measured(4.0))
    out = route([slow, fast], [10] * 12, MODEL)
    # slow at load 0 finishes at 4·10·0.03 = 1.2 s; fast at load L within its batch of 8 at
    # 10·(0.02 + 0.01(L+1)) <= 1.0 s, the 9th at 10·0.1·9/8 = 1.125 s, the 10th at 1.25 s.
    assert out[:10] == ["fast:1"] * 9 + ["slow:1"]
    assert out[10] == "fast:1"  # slow at load 1: 1.6 s
    # The plans routed earlier in a frame count: one edge never takes the whole frame by default.
    assert route([EdgeView("a:1"), EdgeView("b:1")], [10] * 6, MODEL) == ["a:1", "b:1"] * 3


def test_equal_edges_are_routed_as_least_load_would():
    edges = [EdgeView("a:1", load=3, speed=measured(2.0)), EdgeView("b:1", load=0, speed=measured(2.0)),
             EdgeView("c:1", load=1, speed=measured(2.0))]
    assert route(edges, [8] * 7, MODEL) == route(edges, [8] * 7, MODEL, policy="least-load")


def test_an_unmeasured_edge_runs_at_the_model_speed_and_ties_go_to_the_faster_rate():
    assert route([EdgeView("slow:1", steps_per_second=10.0), EdgeView("fast:1", steps_per_second=90.0)], [4],
                 MODEL) == ["fast:1"]
    # Measured 10x slower than the model: an unmeasured edge (priced at the model) goes first.
    assert route([EdgeView("old:1", speed=measured(10.0)), EdgeView("new:1")], [4], MODEL) == ["new:1"]


def test_the_baselines():
    edges = [EdgeView("b:1", load=5), EdgeView("a:1", load=0), EdgeView("c:1", load=1)]
    assert route(edges, [1] * 4, MODEL, policy="round-robin", turn=1) == ["b:1", "c:1", "a:1", "b:1"]
    assert route(edges, [1] * 3, MODEL, policy="least-load") == ["a:1", "a:1", "c:1"]
    assert route([], [3, 3], MODEL) == ["", ""]
    with pytest.raises(ValueError, match="routing policy"):
        route(edges, [1], MODEL, policy="random")
    with pytest.raises(ValueError, match="routing policy"):
        EdgeRegistry(policy="random")


# --- the registry ----------------------------------------------------------------------------
def test_the_registry_routes_by_the_speed_its_heartbeats_measured():
    edges = EdgeRegistry(clock=Clock())
    edges.heartbeat(beat("slow:1", scale=5.0))
    edges.heartbeat(beat("fast:1", scale=1.0))
    assert edges.speeds(MODEL) == pytest.approx({"slow:1": 5.0, "fast:1": 1.0})
    out = edges.route([10] * 10, MODEL)
    assert out.count("fast:1") > out.count("slow:1")
    # An idle heartbeat (nothing ran) keeps the speed measured before; the load it reports counts.
    edges.heartbeat(beat("fast:1", queue=40, running=8))
    assert edges.speeds(MODEL)["fast:1"] == pytest.approx(1.0)
    assert edges.route([10], MODEL) == ["slow:1"]


def test_a_leaving_edge_gets_no_new_plan_at_once_and_comes_back_when_it_beats_again():
    clock = Clock()
    edges = EdgeRegistry(ttl_s=60.0, clock=clock)
    edges.heartbeat(beat("a:1", scale=1.0))
    edges.heartbeat(beat("b:1", scale=3.0, queue=5))
    assert edges.route([10], MODEL) == ["a:1"]
    clock.now = 1.0  # far within its TTL
    edges.heartbeat(beat("a:1", leaving=True))
    assert [e.address for e in edges.live()] == ["b:1"]
    assert edges.route([10] * 5, MODEL) == ["b:1"] * 5
    assert edges.sole_address() == "b:1"
    clock.now = 20.0  # restarted: it beats again without leaving
    edges.heartbeat(beat("a:1"))
    assert {e.address for e in edges.live()} == {"a:1", "b:1"}
    assert edges.route([10], MODEL) == ["a:1"]


def test_a_leaving_configured_edge_is_skipped_until_it_beats_again_and_leaving_is_never_refused():
    edges = EdgeRegistry(static=("s1:1", "s2:1"), clock=Clock(), max_edges=1)
    edges.heartbeat(beat("s1:1", leaving=True))  # never heard before: nothing to drop, nothing refused
    assert edges.route(3) == ["s2:1"] * 3
    edges.heartbeat(beat("s2:1", leaving=True))
    assert edges.route(2) == ["", ""]
    edges.heartbeat(beat("s1:1"))
    edges.heartbeat(beat("x:1", leaving=True))  # max_edges reached: leaving still answers
    assert edges.route(1) == ["s1:1"]
    edges.heartbeat(beat("s1:1", leaving=True))
    assert edges.live() == [] and edges.route(1) == [""]  # both configured edges said they are leaving
    edges.heartbeat(beat("s2:1"))
    assert edges.route(1) == ["s2:1"]


def test_heartbeat_fields_are_checked():
    for bad, field in ((EdgeLoad("h:1", interval_busy_s=math.inf), "interval_busy_seconds"),
                       (EdgeLoad("h:1", interval_busy_s=-1.0), "interval_busy_seconds"),
                       (EdgeLoad("h:1", interval_iterations=3, interval_steps=2, interval_busy_s=1.0), "interval_steps")):
        with pytest.raises(PlanInputError) as exc:
            check_heartbeat(bad)
        assert exc.value.field == field
    check_heartbeat(EdgeLoad("h:1", leaving=True, interval_iterations=3, interval_steps=9, interval_busy_s=0.5))


# --- the core: a frame's plans across edges ------------------------------------------------------
def test_a_frame_spreads_over_edges_by_their_measured_speeds():
    from services.scheduler.decide.quality import synthetic_profile

    costs = CostProfile(edge={"large": EdgeCoefficients(a_s=0.02, b_s=0.01)}, max_batch=8)
    model = StepModel.of(costs)
    registry = EdgeRegistry(clock=Clock())
    registry.heartbeat(beat("10.0.0.1:1", scale=1.0, model=model))
    registry.heartbeat(beat("10.0.0.2:1", scale=2.0, model=model))
    core = SchedulerCore(synthetic_profile(), costs, "greedy_ls", registry)
    from services.scheduler.live.core import LinkInput, PlanInput

    requests = [PlanInput("phone", LinkInput(bandwidth_bps=50e6), user_id=f"u{i}") for i in range(12)]
    plans = core.decide(requests)
    remote = [p.edge_address for p in plans if p.plan.split > 0]
    assert remote, "the synthetic profile offloads phones"
    assert remote.count("10.0.0.1:1") > remote.count("10.0.0.2:1") > 0
    # Each plan predicts its edge steps at the speed of the edge it went to: the same frame planned
    # with unmeasured edges has the same plans (routing comes after planning), 2x slower steps there.
    unmeasured = EdgeRegistry(clock=Clock())
    for address in ("10.0.0.1:1", "10.0.0.2:1"):
        unmeasured.heartbeat(beat(address))
    as_profiled = {p.plan.user_id: p.plan for p in SchedulerCore(synthetic_profile(), costs, "greedy_ls",
                                                                   unmeasured).decide(requests)}
    for p in plans:
        if p.plan.split > 0:
            scale = 2.0 if p.edge_address == "10.0.0.2:1" else 1.0
            assert p.plan.edge_seconds == pytest.approx(as_profiled[p.plan.user_id].edge_seconds * scale)
    # The leaving edge is out of the next frame, long before its TTL.
    core.heartbeat(EdgeLoad("10.0.0.1:1", leaving=True))
    assert {p.edge_address for p in core.decide(requests[:4]) if p.plan.split > 0} == {"10.0.0.2:1"}


def test_a_plan_predicts_its_edge_steps_at_its_edges_speed():
    from services.scheduler.decide.planner import Plan
    from services.scheduler.live.core import at_edge_speed

    plan = Plan("u", 20, 10, 0.0, "fp16", 0, 1.0, 1.0, edge_seconds=0.4, transfer_seconds=0.05, device_seconds=0.3,
                latency_seconds=0.75, energy_j=1.0, quality=0.5, handoff_bytes=100, meets_budget=True)
    slow = at_edge_speed(plan, 2.0, budget_s=1.0)
    assert (slow.edge_seconds, slow.latency_seconds, slow.meets_budget) == (0.8, pytest.approx(1.15), False)
    assert at_edge_speed(plan, 2.0, budget_s=math.inf).meets_budget  # no budget: nothing to miss
    fast = at_edge_speed(plan, 0.5, budget_s=0.7)
    assert (fast.edge_seconds, fast.latency_seconds, fast.meets_budget) == (0.2, pytest.approx(0.55), True)
    assert at_edge_speed(plan, 1.0, budget_s=0.1) is plan  # as profiled: the plan as planned
    local = replace(plan, split=0, edge_seconds=0.0)
    assert at_edge_speed(local, 3.0, budget_s=0.1) is local
