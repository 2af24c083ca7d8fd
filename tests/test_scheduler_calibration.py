"""Online calibration from device reports: a report that matches the profile leaves it where it is."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.live.core import LinkInput, Measured, PlanInput, PlanReport, SchedulerCore
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry


@pytest.mark.parametrize("overhead", [0.0, 0.05])
def test_an_edge_report_as_the_device_times_it_does_not_move_the_edge_step(overhead):
    """The device's edge timer starts at the first progress event, after step 1: the queue phase
    holds that step (calibrating from edge_steps alone made the edge look 1/k faster) and the
    round's fixed overhead (connection, admission), which goes to the RTT, not the step time."""
    split = next(i for i, o in enumerate(DEFAULT_OPTIONS) if (o.steps, o.split) == (20, 10) and o.merge_ratio == 0)
    edges = EdgeRegistry()
    edges.heartbeat(EdgeLoad("edge:1"))
    core = SchedulerCore(synthetic_profile(), CostProfile(), lambda problem: np.full(problem.n_users, split), edges)
    step = core.costs.edge_coefficients().step_seconds(1)
    before = core.costs.edge_coefficients()
    rtt = core.costs.rtt_s
    for _ in range(3):  # calibration is robust: it moves on what several reports agree on
        plan = core.decide([PlanInput("phone", LinkInput(bandwidth_bps=50e6))])[0]
        measured = Measured(queue=step + overhead, edge_steps=9 * step, transfer=plan.plan.transfer_seconds - rtt,
                            device_steps=plan.plan.device_seconds)
        outcome = core.report(PlanReport(plan.plan_id, measured, handoff_bytes=plan.plan.handoff_bytes))
    after = core.costs.edge_coefficients()
    assert after.step_seconds(1) == pytest.approx(before.step_seconds(1), rel=1e-9)
    assert outcome.relative_errors["edge"] == pytest.approx(0.0, abs=1e-9)
    assert (core.costs.rtt_s > rtt) == (overhead > 0)
