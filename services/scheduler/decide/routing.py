"""Which edge runs a plan's edge steps: the one where they would finish first, given each edge's
own measured speed and its current load. Pure: no gRPC, no clock (the registry in live/edges.py
holds the state and calls these).

The cost model prices one batched iteration of ``n`` requests at ``a + b·n`` seconds, up to
``max_batch`` requests at once (services/scheduler/decide/costs.py). An edge runs at its own
multiple ``scale`` of that model, measured from its heartbeats (the seconds its iterations took
over the interval against what the model gives for the same iterations and request-steps); an
edge not measured yet runs at the model's speed (scale 1). With ``load`` requests already on an
edge (queued, running, and routed there since its last heartbeat), a request of ``k`` steps joins
a batch of ``n = min(load + 1, max_batch)`` and, beyond the batch, waits its turn:

    finish = scale · k · (a + b·n) · (load + 1) / n

the time for the edge to run ``(load + 1)·k`` request-steps at its throughput ``n / (a + b·n)``
(within the batch, just ``k`` iterations of ``a + b·(load + 1)``). Each plan goes to the edge of
the smallest finish; within a frame each later plan sees the plans routed before it, so a frame's
users spread over the edges as their speeds and loads say.

The two baselines the bench compares with (bench/multi_edge.py): least load (queued + running +
routed, the speed only breaking ties: what the scheduler did before) and round robin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.decide.costs import CostProfile

ROUTERS = ("finish", "least-load", "round-robin")
# Per heartbeat with work in it, the weight left to the earlier measurements of an edge's speed
# (about the last three busy seconds count): a speed that changes (another tenant on the GPU, a
# restart on other hardware) shows within a few beats, one odd interval moves it a third.
DECAY = 0.7
# The measured scale is kept within [1/MAX_SCALE, MAX_SCALE] of the model: a wild heartbeat
# (or a clock that jumped) never makes an edge infinitely fast or slow.
MAX_SCALE = 1000.0
_BUILT_IN = CostProfile()  # the synthetic built-in profile: the model when none is given


@dataclass(frozen=True)
class StepModel:
    """Seconds for one batched iteration of ``n`` requests: ``a_s + b_s·n``, ``n`` up to ``max_batch``."""

    a_s: float = _BUILT_IN.edge_coefficients().a_s
    b_s: float = _BUILT_IN.edge_coefficients().b_s
    max_batch: int = _BUILT_IN.max_batch

    @classmethod
    def of(cls, costs: CostProfile, pack: str | None = None) -> "StepModel":
        coeff = costs.edge_coefficients(pack)
        return cls(coeff.a_s, coeff.b_s, costs.max_batch)

    def iteration_seconds(self, n: float) -> float:
        return self.a_s + self.b_s * n


@dataclass(frozen=True)
class Speed:
    """What an edge measured of its own speed, as decayed sums over its heartbeats: iterations
    run, request-steps they advanced, seconds they took."""

    iterations: float = 0.0
    steps: float = 0.0
    busy_s: float = 0.0

    @property
    def measured(self) -> bool:
        return self.iterations > 0 and self.steps > 0 and self.busy_s > 0

    def observe(self, iterations: int, steps: int, busy_s: float, decay: float = DECAY) -> "Speed":
        """With one heartbeat's interval added (an interval without work changes nothing)."""
        if not (iterations > 0 and steps > 0 and busy_s > 0 and math.isfinite(busy_s)):
            return self
        return Speed(self.iterations * decay + iterations, self.steps * decay + steps, self.busy_s * decay + busy_s)

    def scale(self, model: StepModel) -> float:
        """The edge's seconds over the model's for the same work (1: not measured yet)."""
        if not self.measured:
            return 1.0
        expected = model.a_s * self.iterations + model.b_s * self.steps
        if not expected > 0:
            return 1.0
        return min(max(self.busy_s / expected, 1 / MAX_SCALE), MAX_SCALE)


@dataclass(frozen=True)
class EdgeView:
    """One live edge as the router sees it."""

    address: str
    load: int = 0  # requests on it: queued + running (its last heartbeat) + routed there since
    speed: Speed = Speed()
    steps_per_second: float = 0.0  # its last heartbeat's rate: breaks ties in favour of the busier-proven edge


def finish_seconds(steps: int, load: float, model: StepModel, scale: float = 1.0) -> float:
    """Predicted seconds until a request of ``steps`` edge steps, joining ``load`` others, is done."""
    ahead = max(load, 0.0) + 1.0
    n = min(ahead, float(max(model.max_batch, 1)))
    return scale * max(steps, 1) * model.iteration_seconds(n) * ahead / n


def route(edges: Sequence[EdgeView], steps: Sequence[int], model: StepModel = StepModel(),
          policy: str = "finish", turn: int = 0) -> list[str]:
    """An edge address for each plan (``steps``: its edge steps k), in order; each later plan sees
    the earlier ones on their edges. ``turn``: where round robin starts. [] edges: "" each."""
    if policy not in ROUTERS:
        raise ValueError(f"unknown routing policy {policy!r}; expected one of {', '.join(ROUTERS)}")
    if not edges:
        return ["" for _ in steps]
    if policy == "round-robin":
        ordered = sorted(e.address for e in edges)
        return [ordered[(turn + i) % len(ordered)] for i in range(len(steps))]
    loads = [float(e.load) for e in edges]
    scales = [e.speed.scale(model) for e in edges]
    rates = [_finite(e.steps_per_second) for e in edges]
    out = []
    for k in steps:
        if policy == "finish":
            keys = [(finish_seconds(k, loads[j], model, scales[j]), loads[j], -rates[j], e.address)
                    for j, e in enumerate(edges)]
        else:  # least-load
            keys = [(loads[j], 0.0, -rates[j], e.address) for j, e in enumerate(edges)]
        best = min(range(len(edges)), key=keys.__getitem__)
        loads[best] += 1
        out.append(edges[best].address)
    return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
