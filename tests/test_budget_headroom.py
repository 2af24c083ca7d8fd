"""Plans aim below the latency budget by --budget-headroom: a prediction is a median, so a plan
placed right at the budget misses it about half the time. Feasibility (budget_infeasible) is still
judged against the budget itself."""

from __future__ import annotations

import pytest

from services.scheduler.core import LinkInput, PlanInput, SchedulerCore
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.decide.scenario import ObjectiveConfig
from services.scheduler.edges import EdgeLoad, EdgeRegistry

LINK = LinkInput(bandwidth_bps=20e6, rtt_s=0.03)


def core(headroom: float) -> SchedulerCore:
    registry = EdgeRegistry()
    registry.heartbeat(EdgeLoad("edge:1"))
    return SchedulerCore(synthetic_profile(), CostProfile(), "exact", registry,
                         objective=ObjectiveConfig(budget_headroom=headroom))


def plan(c: SchedulerCore, budget: float = 0.0):
    (assigned,) = c.decide([PlanInput(device_class="phone", link=LINK, user_id="u", latency_budget_s=budget)], None)
    return assigned


def test_plans_aim_at_the_budget_less_the_headroom():
    free = plan(core(0.0)).plan  # no budget: the best plan at any latency
    budget = free.latency_seconds * 1.05  # it fits, within 10% of the budget
    at_edge = plan(core(0.0), budget).plan
    assert at_edge.latency_seconds == pytest.approx(free.latency_seconds)  # without headroom it is kept
    safe = plan(core(0.1), budget)
    assert safe.plan.latency_seconds <= 0.9 * budget + 1e-9
    assert (safe.plan.steps, safe.plan.split) != (free.steps, free.split)
    assert not safe.budget_infeasible


def test_a_budget_met_only_without_the_headroom_is_not_called_infeasible():
    fastest = min(plan(core(0.0), b).plan.latency_seconds for b in (0.05, 0.2, 1.0))
    assigned = plan(core(0.5), fastest * 1.2)  # fits the budget, not half of it
    assert not assigned.budget_infeasible
    assert plan(core(0.5), fastest * 0.5).budget_infeasible  # below the fastest plan: infeasible


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "nan"])
def test_a_bad_headroom_is_one_line(bad, capsys):
    from services.scheduler.server import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--budget-headroom", bad])
    assert f"--budget-headroom: out of range, got {bad}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="budget_headroom"):
        ObjectiveConfig(budget_headroom=float(bad))
