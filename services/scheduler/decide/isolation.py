"""Frame isolation: a request whose budget no plan can meet, even alone on the edge and the band,
is taken out of its frame's joint allocation (which would otherwise sacrifice the others trying
to rescue it) and gets the plan predicted fastest for it alone, marked infeasible. The others'
plans are then exactly those of the frame without it. Pure logic, no gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS, OptionTable
from services.scheduler.decide.planner import Plan, plan_frame
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.quality import QualityProfile
from services.scheduler.decide.scenario import FrameContext, UserSpec


def _alone(users: Sequence[UserSpec], quality: QualityProfile, costs: CostProfile,
           ctx: FrameContext, options: OptionTable) -> tuple[FrameProblem, np.ndarray]:
    """The frame's problem and [N, K] latency of each option with the whole GPU (batch 1) and band."""
    plain = [replace(u, budget_margin=0.0) for u in users]  # feasible = against the budget itself
    p = FrameProblem.build(plain, quality, costs, options, ctx)
    return p, p.edge_steps[None, :] * float(p.edge_step_seconds(1)) + p.comm + p.local


def split_infeasible(users: Sequence[UserSpec], quality: QualityProfile, costs: CostProfile,
                     ctx: FrameContext, options: OptionTable = DEFAULT_OPTIONS) -> dict[int, str]:
    """{index: why} for the users no option serves within their budgets even alone."""
    if not users or not any(np.isfinite([u.latency_budget_s, u.energy_budget_j]).any() for u in users):
        return {}
    p, alone = _alone(users, quality, costs, ctx, options)
    out = {}
    for i, u in enumerate(users):
        fits_time, fits_energy = alone[i] <= p.deadline[i], p.energy[i] <= p.energy_budget[i]
        if (fits_time & fits_energy).any():
            continue
        if not fits_time.any():
            out[i] = (f"latency_budget_seconds {u.latency_budget_s:.3g} s is below the fastest plan "
                      f"predicted alone, {alone[i].min():.3g} s")
        elif not fits_energy.any():
            out[i] = (f"energy_budget_joules {u.energy_budget_j:.3g} J is below the most frugal plan, "
                      f"{p.energy[i].min():.3g} J")
        else:
            out[i] = "no plan meets the latency and energy budgets together"
    return out


def best_effort_plan(user: UserSpec, quality: QualityProfile, costs: CostProfile, ctx: FrameContext,
                     options: OptionTable = DEFAULT_OPTIONS) -> Plan:
    """The option predicted fastest alone (ties: better quality), its budgets kept so the plan
    says it misses them."""
    p, alone = _alone([user], quality, costs, ctx, options)
    option = int(np.lexsort((-p.quality[0], alone[0]))[0])
    return plan_frame([user], quality, costs, lambda _: np.array([option]), ctx=ctx, options=options)[0]
