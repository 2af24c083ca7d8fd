"""``plan_frame``: the function the scheduler service calls once per time frame.

It builds the frame's arrays, lets a decider (the trained policy, a baseline name, the exact
search or any callable) pick one option per user, shares the GPU and the band with the closed form,
and, only when that misses someone's latency budget, re-solves the shares with the deadline-aware
convex allocator. Every user gets a :class:`Plan`; one whose budget still can't be met says so.
A plan's edge seconds are those of the edge's continuous batch (the frame's edge users start
together, each leaves when its k steps are done), unless the deadline allocator was called.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from services.scheduler.decide.allocator import Allocation, DeadlineAllocator, default_solver
from services.scheduler.decide.baselines import BASELINES
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS, OptionTable
from services.scheduler.decide.problem import FrameEval, FrameProblem
from services.scheduler.decide.quality import QualityProfile
from services.scheduler.decide.scenario import FrameContext, ObjectiveConfig, UserSpec

Decider = Callable[[FrameProblem], np.ndarray]
DeciderLike = str | Decider


@dataclass(frozen=True, slots=True)  # thousands wait in the pending-plan table
class Plan:
    """The decision for one request, with the latencies the cost models predict for it."""

    user_id: str
    steps: int  # T
    split: int  # k (0: all on the device, T: all on the edge)
    merge_ratio: float
    codec: str
    option_index: int
    gpu_share: float
    band_share: float
    edge_seconds: float
    transfer_seconds: float  # incl. RTT when the edge is used
    device_seconds: float  # late steps + VAE decode
    latency_seconds: float
    energy_j: float
    quality: float
    handoff_bytes: int
    meets_budget: bool


@dataclass(frozen=True, eq=False)
class FrameDecision:
    plans: tuple[Plan, ...]
    selection: np.ndarray
    evaluation: FrameEval  # closed-form shares
    allocation: Allocation | None  # the deadline-aware re-solve, when one was needed
    decide_seconds: float
    allocate_seconds: float

    @property
    def objective(self) -> float:
        return self.evaluation.objective


def resolve_decider(decider: DeciderLike) -> Decider:
    if callable(decider):
        return decider
    if decider == "exact":
        from services.scheduler.decide.exact import exact_optimum

        return lambda p: exact_optimum(p)[0]
    if decider in BASELINES:
        return BASELINES[decider]
    raise ValueError(f"unknown decider {decider!r}; use a policy, a callable, 'exact' or one of {', '.join(BASELINES)}")


def warmup(max_users: int = 128) -> None:
    """Compile the deadline-aware allocator for every frame size up to ``max_users`` (call once
    at service start, so no frame pays the ~0.1–0.5 s first-solve compile)."""
    default_solver().warmup(max_users)


def schedule_frame(users: Sequence[UserSpec], quality: QualityProfile, costs: CostProfile,
                   decider: DeciderLike = "greedy_ls", *, ctx: FrameContext = FrameContext(),
                   options: OptionTable = DEFAULT_OPTIONS, objective: ObjectiveConfig = ObjectiveConfig(),
                   deadline_solver: DeadlineAllocator | None = None) -> FrameDecision:
    problem = FrameProblem.build(users, quality, costs, options, ctx, objective)
    t0 = time.perf_counter()
    sel = np.asarray(resolve_decider(decider)(problem), dtype=int)
    t1 = time.perf_counter()
    if sel.shape != (problem.n_users,) or (problem.n_users and (sel.min() < 0 or sel.max() >= len(options))):
        raise ValueError(f"decider returned an invalid selection {sel!r}")
    ev = problem.evaluate(sel)
    x, y = ev.gpu_shares, ev.band_shares
    edge, tx, ok = ev.edge_seconds, ev.transfer_seconds, ~ev.violations
    alloc = None
    edge_users = np.flatnonzero(problem.uses_edge[sel])
    if ev.violations[edge_users].any():  # shares can only help users that use the edge
        solver = deadline_solver or default_solver()
        sub = sel[edge_users]
        own = problem.own_comm[edge_users, sub]  # own links: fixed seconds, no band share to give
        alloc = solver.solve(problem.work_seconds(sel)[edge_users], problem.comm[edge_users, sub], None,
                             ev.local_seconds[edge_users] + own, problem.deadline[edge_users])
        if alloc.feasible:
            x, y, edge, tx = x.copy(), y.copy(), edge.copy(), tx.copy()
            x[edge_users], y[edge_users] = alloc.gpu_shares, alloc.band_shares
            edge[edge_users], tx[edge_users] = alloc.edge_seconds, alloc.transfer_seconds + own
            ok = ok.copy()
            ok[edge_users] = True
    if alloc is None and 0 < len(edge_users) <= problem.max_batch:
        edge = problem.batched_edge_seconds(sel)  # what the edge's continuous batch will take
    t2 = time.perf_counter()
    plans = []
    for i, (user, o) in enumerate(zip(problem.users, sel)):
        opt = options[int(o)]
        rtt = float(problem.rtt_s[i]) if opt.uses_edge else 0.0
        device = float(ev.local_seconds[i] - rtt)
        e = float(edge[i]) if opt.uses_edge else 0.0
        t = float(tx[i]) + rtt if opt.uses_edge else 0.0
        plans.append(Plan(user.user_id, opt.steps, opt.split, opt.merge_ratio, opt.codec, int(o),
                          float(x[i]) if opt.uses_edge else 0.0, float(y[i]) if opt.uses_edge else 0.0,
                          e, t, device, e + t + device, float(ev.energy[i]), float(ev.quality[i]),
                          int(problem.handoff_bytes[o]),
                          bool(ok[i] and ev.energy[i] <= problem.energy_budget[i] * (1 + 1e-9))))
    return FrameDecision(tuple(plans), sel, ev, alloc, t1 - t0, t2 - t1)


def plan_frame(users: Sequence[UserSpec], quality: QualityProfile, costs: CostProfile,
               decider: DeciderLike = "greedy_ls", **kwargs) -> list[Plan]:
    """One Plan per user, in the order given (see :func:`schedule_frame` for the keywords)."""
    return list(schedule_frame(users, quality, costs, decider, **kwargs).plans)
