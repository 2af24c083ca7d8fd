"""The exact optimum of a small frame: dominance pruning + branch and bound over the first users
with a vectorized enumeration of the last ones (numpy, closed-form shares).

Bound: expanding (S_head + Σ_rest √k)² ≥ S_head² + Σ_rest (2·S_head·√k + k) (cross terms among
the remaining users are ≥ 0; same for the band), with the smallest per-request step cost g the
frame could reach and no penalties, separates over the remaining users.
"""

from __future__ import annotations

import itertools

import numpy as np

from services.scheduler.decide.baselines import greedy_ls
from services.scheduler.decide.problem import FrameProblem


def undominated(problem: FrameProblem, user: int) -> np.ndarray:
    """Allowed options of ``user`` that no other allowed option (same edge use) beats on every
    coupling quantity (√k, √c, local time) and on the separable value."""
    opts = np.flatnonzero(problem.mask[user])
    feats = np.stack([-problem.base_value[user, opts], problem.sqrt_k[opts], problem.sqrt_c[user, opts],
                      problem.local[user, opts]], 1)
    edge = problem.uses_edge[opts]
    le = (feats[:, None, :] <= feats[None, :, :] + 1e-12).all(2)  # le[a, b]: a no worse than b
    eq = (np.abs(feats[:, None, :] - feats[None, :, :]) <= 1e-12).all(2)
    same = edge[:, None] == edge[None, :]
    order = np.arange(len(opts))
    beaten = (le & same & (~eq | (order[:, None] < order[None, :]))).any(0)
    return opts[~beaten]


def brute_force(problem: FrameProblem, chunk: int = 1 << 18) -> tuple[np.ndarray, float]:
    """Plain vectorized enumeration of every allowed combination (tests; tiny frames)."""
    allowed = [np.flatnonzero(m) for m in problem.mask]
    best_val, best = -np.inf, None
    combos = itertools.product(*allowed)
    while True:
        block = np.array(list(itertools.islice(combos, chunk)), dtype=int).reshape(-1, problem.n_users)
        if len(block) == 0:
            break
        values = problem.evaluate_batch(block)
        i = int(np.argmax(values))
        if values[i] > best_val:
            best_val, best = float(values[i]), block[i].copy()
    if best is None:
        raise ValueError("the frame allows no combination of options")
    return best, best_val


def exact_optimum(problem: FrameProblem, tail_limit: int = 1 << 17) -> tuple[np.ndarray, float]:
    """(selection, J) maximizing J over allowed options."""
    n = problem.n_users
    if n == 0:
        return np.zeros(0, int), 0.0
    cand = [undominated(problem, i) for i in range(n)]
    # Head users (branched on) first, tail users (enumerated) last; fewest options in the head.
    order = sorted(range(n), key=lambda i: len(cand[i]))
    tail: list[int] = []
    size = 1
    for i in reversed(order):
        if size * len(cand[i]) > tail_limit and tail:
            break
        tail.insert(0, i)
        size *= len(cand[i])
    head = [i for i in order if i not in tail]
    tail_grid = np.array(list(itertools.product(*[cand[i] for i in tail])), dtype=int)

    incumbent = greedy_ls(problem)
    best_val = float(problem.evaluate_batch(incumbent[None])[0])
    best = incumbent.copy()
    lam = problem.objective_cfg.latency_weight
    g_min = float(problem.edge_step_seconds(n))
    sel = np.zeros(n, dtype=int)
    # Per remaining user: options' base value, √k, k, √c, c for the separable bound.
    stats = {i: (problem.base_value[i, cand[i]], problem.sqrt_k[cand[i]], problem.edge_steps[cand[i]],
                 problem.sqrt_c[i, cand[i]], problem.comm[i, cand[i]]) for i in range(n)}

    def bound(depth: int, base: float, s_k: float, s_c: float) -> float:
        total = base - lam * (g_min * s_k**2 + s_c**2)
        for i in head[depth:] + tail:
            b, sk, k, sc, c = stats[i]
            total += float(np.max(b - lam * (g_min * (2 * s_k * sk + k) + 2 * s_c * sc + c)))
        return total

    def leaf() -> None:
        nonlocal best_val, best
        block = np.repeat(sel[None], len(tail_grid), 0)
        block[:, tail] = tail_grid
        values = problem.evaluate_batch(block)
        j = int(np.argmax(values))
        if values[j] > best_val + 1e-12:
            best_val, best = float(values[j]), block[j].copy()

    def dfs(depth: int, base: float, s_k: float, s_c: float) -> None:
        if depth == len(head):
            leaf()
            return
        i = head[depth]
        b, sk, _, sc, _ = stats[i]
        for j in np.argsort(-b):
            nb, nk, nc = base + b[j], s_k + sk[j], s_c + sc[j]
            if bound(depth + 1, nb, nk, nc) <= best_val + 1e-12:
                continue
            sel[i] = cand[i][j]
            dfs(depth + 1, nb, nk, nc)

    if bound(0, 0.0, 0.0, 0.0) > best_val + 1e-12:
        dfs(0, 0.0, 0.0, 0.0)
    return best, best_val
