"""Sharing the edge GPU and the downlink band among a frame's users.

Given, per user, GPU work ``w_i`` (edge seconds at the whole GPU), transfer time ``c_i`` (seconds
at the whole band) and a weight, choose shares x (GPU) and y (band) that

    minimize  Σ weight_i · (w_i / x_i + c_i / y_i)   s.t.  Σx ≤ 1, Σy ≤ 1, x, y ≥ eps
    [and per-user deadlines  w_i / x_i + c_i / y_i + local_i ≤ D_i].

Without deadlines the problem separates and has a closed form, x_i ∝ √(weight_i·w_i) (microseconds).
With deadlines, :func:`deadline_shares` solves it exactly through its KKT conditions (an active-set
iteration on two scalars, a fraction of a millisecond at N = 100) or proves it infeasible;
:class:`DeadlineAllocator` tries that first and falls back to cvxpy (Parameters, compiled once per
size bucket, Clarabel) only when it can do neither. An infeasible budget is a result
(``feasible=False``), not an exception.
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
    solver: str  # "closed_form", "active_set" or "cvxpy"

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


def _frame_arrays(work, comm, weights, local, deadlines) -> tuple[np.ndarray, ...]:
    """(w, c, weights, local, deadlines) as float arrays; weights 1, local 0, deadlines ∞ by default."""
    w = np.asarray(work, dtype=float)
    n = len(w)
    return (w, np.asarray(comm, dtype=float),
            np.ones(n) if weights is None else np.asarray(weights, dtype=float),
            np.zeros(n) if local is None else np.asarray(local, dtype=float),
            np.full(n, np.inf) if deadlines is None else np.asarray(deadlines, dtype=float))


def deadline_shares(work, comm, weights=None, local=None, deadlines=None, eps: float = DEFAULT_EPS,
                    max_iter: int | None = None) -> Allocation | None:
    """The deadline-constrained optimum from its KKT conditions, an infeasibility certificate, or
    None when neither could be established (then ask :meth:`DeadlineAllocator.solve_convex`).

    With a multiplier μ_i ≥ 0 per deadline, the shares are the closed form's with weights
    a_i = weight_i + μ_i: x_i = b_i√w_i / S_w, y_i = b_i√c_i / S_c with b_i = √a_i, S_w = Σ b_j√w_j,
    S_c = Σ b_j√c_j, so user i's latency is v_i·S / b_i with v_i = (√w_i, √c_i). Complementary
    slackness makes b_i = max(√weight_i, v_i·S / s_i) (s_i: the slack D_i − local_i): for a guessed
    binding set B, S solves the 2×2 system (I − A_B)·S = Σ_{i∉B} √weight_i·v_i with
    A_B = Σ_{i∈B} v_i v_iᵀ / s_i. B grows monotonically to the fixed point (at most N rounds, two or
    three in practice); the problem is convex, so that KKT point is the optimum (and it is checked
    against every deadline).

    Infeasibility: for any shares meeting the deadlines and any unit u ≥ 0, Cauchy–Schwarz gives
    (u·v_i)² ≤ (w_i/x_i + c_i/y_i)(u₁²x_i + u₂²y_i) ≤ s_i(u₁²x_i + u₂²y_i), so summing over B,
    uᵀA_B u ≤ 1: a set B whose A_B has spectral radius above 1 proves the budgets can't be met.
    """
    w, c, wt, loc, d = _frame_arrays(work, comm, weights, local, deadlines)
    n = len(w)
    if n == 0:
        return None
    slack = d - loc
    if ((slack <= 0) | (w + c > slack)).any():  # a user alone with the whole GPU and band misses it
        return _infeasible(w, c, wt, eps, "infeasible", "active_set")
    v = np.stack([np.sqrt(w), np.sqrt(c)])  # [2, N]
    floor = np.sqrt(wt)
    inv_slack = np.where(np.isfinite(slack), 1.0 / slack, 0.0)
    binding = np.zeros(n, dtype=bool)
    for _ in range(max_iter or n + 1):
        a = (v[:, binding] * inv_slack[binding]) @ v[:, binding].T  # A_B
        half_trace = 0.5 * (a[0, 0] + a[1, 1])
        radius = half_trace + np.sqrt(max(half_trace**2 - (a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]), 0.0))
        if radius > 1 + 1e-9:
            return _infeasible(w, c, wt, eps, "infeasible", "active_set")
        if radius > 1 - 1e-9:
            return None  # on the boundary: leave it to the convex solver
        free = ~binding
        f0 = v[:, free] @ floor[free]
        m = np.eye(2) - a
        det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
        s_w = (m[1, 1] * f0[0] - m[0, 1] * f0[1]) / det
        s_c = (m[0, 0] * f0[1] - m[1, 0] * f0[0]) / det
        need = (v[0] * s_w + v[1] * s_c) * inv_slack  # the b_i that puts user i exactly at its deadline
        now = need > floor * (1 + 1e-12)
        if (now == binding).all():
            break
        binding |= now  # S only grows, so a binding user stays binding
    else:
        return None
    b = np.where(binding, need, floor)
    x = _shares(b * v[0], eps)
    y = _shares(b * v[1], eps)
    edge, tx = w / x, c / y
    alloc = Allocation(x, y, edge, tx, float((wt * (edge + tx)).sum()), True, "optimal", "active_set")
    return alloc if meets_deadlines(alloc, loc, d, rtol=1e-4).all() else None


class DeadlineAllocator:
    """Per-user deadlines: the exact active-set solution when it certifies itself, else cvxpy
    (problems compiled once per size bucket)."""

    def __init__(self, eps: float = DEFAULT_EPS, solver: str = "CLARABEL", fast_path: bool = True) -> None:
        self.eps = eps
        self.solver = solver
        self.fast_path = fast_path
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
            self.solve_convex(np.ones(n), np.ones(n), deadlines=np.full(n, 4.0 * n * n))
            if size >= max_users:
                break

    def solve(self, work, comm, weights=None, local=None, deadlines=None) -> Allocation:
        if self.fast_path:
            fast = deadline_shares(work, comm, weights, local, deadlines, self.eps)
            if fast is not None:
                return fast
        return self.solve_convex(work, comm, weights, local, deadlines)

    def solve_convex(self, work, comm, weights=None, local=None, deadlines=None) -> Allocation:
        """The cvxpy solve (also the reference the fast path is tested against)."""
        w, c, wt, loc, d = _frame_arrays(work, comm, weights, local, deadlines)
        n = len(w)
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


def _infeasible(w, c, wt, eps, status: str, solver: str = "cvxpy") -> Allocation:
    base = closed_form(w, c, wt, eps)
    return Allocation(base.gpu_shares, base.band_shares, base.edge_seconds, base.transfer_seconds,
                      base.objective, False, status, solver)


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


__all__ = ["Allocation", "DeadlineAllocator", "allocate", "closed_form", "deadline_shares", "default_solver",
           "meets_deadlines", "total_weighted_latency_lower_bound", "DEFAULT_EPS"]
