"""Sharing the edge GPU and the downlink band among a frame's users.

Given, per user, GPU work ``w_i`` (edge seconds at the whole GPU), transfer time ``c_i`` (seconds
at the whole band) and a weight, choose shares x (GPU) and y (band) that

    minimize  Σ weight_i · (w_i / x_i + c_i / y_i)   s.t.  Σx ≤ 1, Σy ≤ 1, x, y ≥ eps
    [and per-user deadlines  w_i / x_i + c_i / y_i + local_i ≤ D_i].

Without deadlines the problem separates and has a closed form, x_i ∝ √(weight_i·w_i) (microseconds);
:class:`DeadlineAllocator` solves the general problem with cvxpy (Parameters, compiled once per size
bucket, Clarabel). An infeasible budget is a result (``feasible=False``), not an exception.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_EPS = 1e-6
_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512)
_NO_DEADLINE = 1e3  # in units of the frame's total closed-form latency: no budget


@dataclass(frozen=True, eq=False)
class Allocation:
    gpu_shares: np.ndarray  # x
    band_shares: np.ndarray  # y
    edge_seconds: np.ndarray  # w / x (0 for users without edge work)
    transfer_seconds: np.ndarray  # c / y
    objective: float  # Σ weight · (w/x + c/y)
    feasible: bool  # every deadline met (True when none was given)
    status: str  # "optimal", "infeasible", "solver_error: …"
    solver: str  # "closed_form" or "cvxpy"

    @property
    def latencies(self) -> np.ndarray:
        return self.edge_seconds + self.transfer_seconds


def _shares(demand: np.ndarray, eps: float) -> np.ndarray:
    """x ∝ demand, every share ≥ eps, Σx = 1 (users with zero demand get eps)."""
    n = len(demand)
    total = demand.sum()
    if total <= 0:
        return np.full(n, 1.0 / max(n, 1))
    x = demand / total
    low = x < eps
    if low.any():  # give the floor to the small ones and rescale the rest
        free = 1.0 - eps * low.sum()
        x = np.where(low, eps, x * free / x[~low].sum())
    return x


def closed_form(work, comm, weights=None, eps: float = DEFAULT_EPS) -> Allocation:
    """Optimal shares without deadlines: x_i ∝ √(weight_i·w_i), y_i ∝ √(weight_i·c_i)."""
    w = np.asarray(work, dtype=float)
    c = np.asarray(comm, dtype=float)
    wt = np.ones_like(w) if weights is None else np.asarray(weights, dtype=float)
    x = _shares(np.sqrt(wt * w), eps)
    y = _shares(np.sqrt(wt * c), eps)
    edge, tx = w / x, c / y
    return Allocation(x, y, edge, tx, float((wt * (edge + tx)).sum()), True, "optimal", "closed_form")


def meets_deadlines(alloc: Allocation, local, deadlines, rtol: float = 1e-6) -> np.ndarray:
    d = np.asarray(deadlines, dtype=float)
    return alloc.latencies + np.asarray(local, dtype=float) <= d * (1 + rtol) + 1e-9


class DeadlineAllocator:
    """cvxpy formulation with per-user deadlines; problems compiled once per size bucket."""

    def __init__(self, eps: float = DEFAULT_EPS, solver: str = "CLARABEL") -> None:
        self.eps = eps
        self.solver = solver
        self._problems: dict[int, tuple] = {}

    def _problem(self, size: int):
        if size not in self._problems:
            import cvxpy as cp  # imported lazily: the closed form needs no solver

            x, y = cp.Variable(size), cp.Variable(size)  # shares
            t, u = cp.Variable(size), cp.Variable(size)  # edge and transfer seconds (epigraphs)
            sw = cp.Parameter(size, nonneg=True)  # √w
            sc = cp.Parameter(size, nonneg=True)  # √c
            wt = cp.Parameter(size, nonneg=True)  # weights
            slack = cp.Parameter(size)  # D − local
            # w/x ≤ t  ⇔  (√w)² ≤ t·x  ⇔  ‖(2√w, t − x)‖ ≤ t + x : well conditioned when w = 0.
            constraints = [
                cp.SOC(t + x, cp.vstack([2 * sw, t - x]), axis=0),
                cp.SOC(u + y, cp.vstack([2 * sc, u - y]), axis=0),
                cp.sum(x) <= 1, cp.sum(y) <= 1, x >= self.eps, y >= self.eps,
                t + u <= slack,
            ]
            objective = cp.Minimize(wt @ t + wt @ u)
            self._problems[size] = (cp.Problem(objective, constraints), x, y, sw, sc, wt, slack)
        return self._problems[size]

    def warmup(self, max_users: int = 128) -> None:
        """Compile every size bucket up to ``max_users`` now (~0.1–0.5 s each) instead of at the
        first frame that needs the solver."""
        for size in _BUCKETS:
            n = min(size, max_users)
            self.solve(np.ones(n), np.ones(n), deadlines=np.full(n, 4.0 * n * n))
            if size >= max_users:
                break

    def solve(self, work, comm, weights=None, local=None, deadlines=None) -> Allocation:
        w = np.asarray(work, dtype=float)
        c = np.asarray(comm, dtype=float)
        n = len(w)
        wt = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
        loc = np.zeros(n) if local is None else np.asarray(local, dtype=float)
        d = np.full(n, np.inf) if deadlines is None else np.asarray(deadlines, dtype=float)
        if n == 0:
            return closed_form(w, c, wt, self.eps)
        slack = d - loc
        # A deadline that local work alone misses, or that the whole GPU and band can't meet.
        if ((slack <= 0) | (w + c > slack)).any():
            return _infeasible(w, c, wt, self.eps, "infeasible")
        scale = max(np.sqrt(w).sum() ** 2 + np.sqrt(c).sum() ** 2, 1e-12)  # solve in O(1) units
        slack = np.where(np.isfinite(slack), slack / scale, _NO_DEADLINE)
        size = next((b for b in _BUCKETS if b >= n), n)
        prob, x, y, sw, sc, wp, sl = self._problem(size)
        pad = size - n
        sw.value = np.pad(np.sqrt(w / scale), (0, pad))
        sc.value = np.pad(np.sqrt(c / scale), (0, pad))
        wp.value = np.pad(wt / wt.max(), (0, pad))
        sl.value = np.pad(slack, (0, pad), constant_values=_NO_DEADLINE)
        try:
            with warnings.catch_warnings():  # "optimal_inaccurate" is judged below, by the deadlines
                warnings.simplefilter("ignore")
                prob.solve(solver=self.solver, warm_start=True)
        except Exception as exc:  # solver failures are reported, not raised
            return _infeasible(w, c, wt, self.eps, f"solver_error: {type(exc).__name__}: {exc}")
        if prob.status not in ("optimal", "optimal_inaccurate") or x.value is None:
            status = "infeasible" if "infeasible" in str(prob.status) else str(prob.status)
            return _infeasible(w, c, wt, self.eps, status)
        xs = np.maximum(np.asarray(x.value[:n]), self.eps)
        ys = np.maximum(np.asarray(y.value[:n]), self.eps)
        edge, tx = w / xs, c / ys
        objective = float((wt * (edge + tx)).sum())
        ok = bool(meets_deadlines(Allocation(xs, ys, edge, tx, objective, True, "", ""), loc, d, rtol=1e-4).all())
        return Allocation(xs, ys, edge, tx, objective, ok, prob.status if ok else "infeasible", "cvxpy")


def _infeasible(w, c, wt, eps, status: str) -> Allocation:
    base = closed_form(w, c, wt, eps)
    return Allocation(base.gpu_shares, base.band_shares, base.edge_seconds, base.transfer_seconds,
                      base.objective, False, status, "cvxpy")


def allocate(work, comm, weights=None, local=None, deadlines=None,
             solver: DeadlineAllocator | None = None) -> Allocation:
    """The fast path when it meets every deadline, the convex solver only when a budget binds."""
    base = closed_form(work, comm, weights)
    if deadlines is None or meets_deadlines(base, np.zeros(len(base.gpu_shares)) if local is None else local,
                                            deadlines).all():
        return base
    return (solver or default_solver()).solve(work, comm, weights, local, deadlines)


_SOLVER: DeadlineAllocator | None = None


def default_solver() -> DeadlineAllocator:
    """A process-wide DeadlineAllocator (its compiled problems are reused across frames)."""
    global _SOLVER
    if _SOLVER is None:
        _SOLVER = DeadlineAllocator()
    return _SOLVER


def total_weighted_latency_lower_bound(work, comm, weights=None) -> float:
    """(Σ√(weight·w))² + (Σ√(weight·c))²: the closed form's objective without the eps floor."""
    wt = np.ones(len(work)) if weights is None else np.asarray(weights, float)
    return float(np.sqrt(wt * np.asarray(work)).sum() ** 2 + np.sqrt(wt * np.asarray(comm)).sum() ** 2)


__all__ = ["Allocation", "DeadlineAllocator", "allocate", "closed_form", "default_solver", "meets_deadlines",
           "total_weighted_latency_lower_bound", "DEFAULT_EPS"]
