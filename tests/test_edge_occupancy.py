"""The edge batches every request on it at once, whatever frame planned it: a report's edge steps
are calibrated at the batch they ran in (from the spans reports measured), not at its frame's size,
and a plan made while other users' plans are on the edge is predicted in the batch it joins."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.live.core import LinkInput, Measured, PlanInput, PlanReport, SchedulerCore
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry
from services.scheduler.live.occupancy import EdgeOccupancy, EdgeSpan

LINK = LinkInput(bandwidth_bps=50e6, rtt_s=0.03)
STEPS, SPLIT = 20, 10
EDGE_OPTION = next(i for i, o in enumerate(DEFAULT_OPTIONS) if (o.steps, o.split, o.merge_ratio) == (STEPS, SPLIT, 0))
LOCAL_OPTION = next(i for i, o in enumerate(DEFAULT_OPTIONS) if (o.steps, o.split) == (STEPS, 0))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_core(clock: Clock, configured_edge: bool = False) -> SchedulerCore:
    """Every user's plan runs k = 10 of 20 steps on the edge, but user "local"'s: all on the device.
    The edge heartbeats, or with ``configured_edge`` is only configured (--edge) and never does."""
    edges = EdgeRegistry(static=["edge:1"]) if configured_edge else EdgeRegistry()
    if not configured_edge:
        edges.heartbeat(EdgeLoad("edge:1"))

    def decider(problem):
        return np.array([LOCAL_OPTION if u.user_id == "local" else EDGE_OPTION for u in problem.users])

    return SchedulerCore(synthetic_profile(), CostProfile(), decider, edges, clock=clock)


def plan(core: SchedulerCore, user: str):
    return core.decide([PlanInput("phone", LINK, user_id=user)])[0]


def run_at(core: SchedulerCore, assigned, batch: float, edge_steps: int = 0) -> PlanReport:
    """A report of ``assigned`` as the device times it, its k edge steps at ``batch`` requests a step."""
    k = edge_steps or assigned.plan.split
    step = float(CostProfile().edge_coefficients().step_seconds(batch))
    measured = Measured(queue=step, edge_steps=(k - 1) * step, transfer=0.01, device_steps=0.5, decode=0.2)
    return PlanReport(assigned.plan_id, measured, edge_steps=k, device_steps=STEPS - k,
                      handoff_bytes=assigned.plan.handoff_bytes or 60_000)


def test_the_batch_of_a_span_is_one_plus_the_time_others_shared_it():
    occupancy = EdgeOccupancy()
    a, b = EdgeSpan("e", 0.0, 1.0, "a"), EdgeSpan("e", 0.5, 2.0, "b")
    for span in (a, b, EdgeSpan("other edge", 0.0, 1.0, "c"), EdgeSpan("e", 1.0, 3.0, "d")):
        occupancy.add(span)
    assert occupancy.batch(a) == pytest.approx(1.5)  # b shared half of it; the other edge and a later span none
    assert occupancy.batch(b) == pytest.approx(1 + 0.5 / 1.5 + 1.0 / 1.5)
    assert occupancy.batch(EdgeSpan("e", 10.0, 11.0, "a")) == 1.0


def test_one_user_makes_anothers_batch_at_most_one_larger():
    occupancy = EdgeOccupancy()
    honest = EdgeSpan("e", 0.0, 1.0, "honest")
    occupancy.add(honest)
    for i in range(10):  # ten made-up spans over it, from one user
        occupancy.add(EdgeSpan("e", -1.0 - i, 5.0 + i, "flood"))
    assert occupancy.batch(honest) == 2.0


def test_two_requests_batched_on_the_edge_leave_its_step_time_where_the_profile_has_it():
    """Two devices planned in two frames (one user each) run their steps in one batch of 2: each
    step takes a + 2b. Calibrated as batch 1 (the frame's size) this read as an edge 1.23x slower
    than it is, and a request then running alone was predicted that much too slow."""
    clock = Clock()
    core = make_core(clock)
    before = core.costs.edge_coefficients()
    for _ in range(3):
        first, second = plan(core, "a"), plan(core, "b")
        clock.t += 1.0
        core.report(run_at(core, first, batch=2))
        core.report(run_at(core, second, batch=2))
        clock.t += 10.0
    after = core.costs.edge_coefficients()
    assert after.step_seconds(1) == pytest.approx(before.step_seconds(1), rel=1e-9)
    alone = plan(core, "a").plan
    assert alone.edge_seconds == pytest.approx(SPLIT * float(before.step_seconds(1)), rel=1e-9)


def test_a_report_waits_until_the_plans_that_could_share_its_steps_report():
    clock = Clock()
    core = make_core(clock)
    before = core.costs.edge_coefficients()
    for _ in range(2):  # two reports at batch 2 would move the estimate (a lone sample is trimmed)
        first = plan(core, "a")
        plan(core, "b")  # on the edge beside "a"; its report never comes
        clock.t += 1.0
        core.report(run_at(core, first, batch=2))
        clock.t += 10.0
    assert core.costs.edge_coefficients() == before  # "b" has not reported: the batch is not known
    clock.t += 60.0  # ... and never will: after SETTLE_S they count as they are (batch 1)
    core.report(run_at(core, plan(core, "c"), batch=1))
    assert core.costs.edge_coefficients().step_seconds(1) > before.step_seconds(1)


@pytest.mark.parametrize("configured_edge", [False, True])
def test_an_override_on_the_edge_counts_in_the_batch(configured_edge):
    """A k = 0 plan the device runs on the edge anyway (a fixed split, `--split`) shares the batch
    of the plan it overlaps: the report says so, and the edge is its plan's only known one, live
    or only configured (bench/links.py's edge never heartbeats: the override's span was on edge ""
    and the other's on the configured address, so each counted batch 1 and the edge read 1.8x
    slower than it was)."""
    clock = Clock()
    core = make_core(clock, configured_edge)
    before = core.costs.edge_coefficients()
    for _ in range(3):
        first, second = plan(core, "a"), plan(core, "local")
        assert second.plan.split == 0 and second.edge_address == ""
        clock.t += 1.0
        core.report(run_at(core, first, batch=2))
        core.report(run_at(core, second, batch=2, edge_steps=SPLIT))
        clock.t += 10.0
    assert core.costs.edge_coefficients().step_seconds(1) == pytest.approx(before.step_seconds(1), rel=1e-9)


def test_a_plan_made_while_another_is_on_the_edge_is_predicted_in_its_batch():
    """A plan shares the edge with other users' plans still on it, each for the share of its
    predicted round still to come (it leaves the batch when done)."""
    clock = Clock()
    core = make_core(clock)
    coeff = core.costs.edge_coefficients()

    def edge_step(user: str) -> float:
        return plan(core, user).plan.edge_seconds / SPLIT

    first = plan(core, "a").plan
    assert first.edge_seconds / SPLIT == pytest.approx(float(coeff.step_seconds(1)))
    assert edge_step("b") == pytest.approx(float(coeff.step_seconds(2)))  # "a" has all its round to go
    assert plan(core, "local").plan.split == 0  # a plan all on the device loads no edge
    for _ in range(5):  # a user counts once, however many plans it has on the edge
        plan(core, "b")
    assert edge_step("c") == pytest.approx(float(coeff.step_seconds(3)))
    clock.t += 10.0  # every edge round is over by its prediction
    assert edge_step("d") == pytest.approx(float(coeff.step_seconds(1)))
    clock.t += (first.edge_seconds + first.transfer_seconds) / 2  # "d" is halfway through its round
    assert edge_step("e") == pytest.approx(float(coeff.step_seconds(1.5)))


def test_a_reported_plan_is_off_the_edge():
    clock = Clock()
    core = make_core(clock)
    coeff = core.costs.edge_coefficients()
    first = plan(core, "a")
    clock.t += 0.001
    core.report(run_at(core, first, batch=1))
    assert plan(core, "b").plan.edge_seconds == pytest.approx(SPLIT * float(coeff.step_seconds(1)))


def test_a_frames_edge_users_are_predicted_as_the_edges_continuous_batch():
    """Two users of one frame on the edge, k = 3 and k = 5 of 10: the edge runs 3 steps of both,
    then 2 of the second alone, so their edge seconds are 3(a + 2b) and 3(a + 2b) + 2(a + b). The
    closed-form shares give the same for equal splits, and more for these."""
    from dataclasses import replace

    from services.scheduler.decide.costs import EdgeCoefficients
    from services.scheduler.decide.planner import schedule_frame
    from services.scheduler.decide.problem import FrameProblem
    from services.scheduler.decide.scenario import UserSpec

    a, b = 0.004, 0.024  # a CPU edge: the per-request cost dominates
    costs = replace(CostProfile(), edge={"large": EdgeCoefficients(a, b)})
    users = [UserSpec(u, "phone", 5.0) for u in ("x", "y")]
    pick = [next(i for i, o in enumerate(DEFAULT_OPTIONS) if (o.steps, o.split, o.merge_ratio) == (10, k, 0.0))
            for k in (3, 5)]
    decision = schedule_frame(users, synthetic_profile(), costs, lambda p: pick)
    edge = [plan.edge_seconds for plan in decision.plans]
    assert edge == pytest.approx([3 * (a + 2 * b), 3 * (a + 2 * b) + 2 * (a + b)])
    assert all(e < c for e, c in zip(edge, decision.evaluation.edge_seconds))  # the shares over-predict
    same = FrameProblem.build(users, synthetic_profile(), costs, DEFAULT_OPTIONS)
    both_five = [pick[1], pick[1]]
    assert same.batched_edge_seconds(both_five) == pytest.approx(same.evaluate(both_five).edge_seconds)
    assert list(same.batched_edge_seconds([pick[0], LOCAL_OPTION])) == pytest.approx([3 * (a + b), 0.0])
