"""Baseline deciders: each maps a FrameProblem to one option index per user (allowed options only).

* ``all_edge`` / ``all_device``: every user on the same option with k = T / k = 0 (the best such
  uniform option for this frame: an oracle-tuned baseline, so a strong one);
* ``best_fixed_split``: the best uniform option (T, k/T, r) for the whole frame;
* ``greedy_ls``: every user starts at its best option alone, then 1-opt local search (each user in
  turn moves to its best option given the others) until no move helps;
* ``random_choice``: a uniformly random allowed option per user.
Where a uniform option is not allowed for a user (its budgets), that user takes its best option alone.
The exact optimum lives in :mod:`services.scheduler.decide.exact`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from services.scheduler.decide.problem import FrameProblem

Decider = Callable[[FrameProblem], np.ndarray]


def standalone_value(problem: FrameProblem) -> np.ndarray:
    """[N, K] utility of each option if the user were alone (n = 1, whole GPU and band)."""
    lam = problem.objective_cfg.latency_weight
    alone = problem.edge_steps * problem.edge_step_seconds(1)
    return problem.base_value - lam * (alone[None, :] + problem.comm)


def best_alone(problem: FrameProblem) -> np.ndarray:
    value = np.where(problem.mask, standalone_value(problem), -np.inf)
    return value.argmax(1) if problem.n_users else np.zeros(0, int)


def uniform(problem: FrameProblem, option: int) -> np.ndarray:
    fallback = best_alone(problem)
    return np.where(problem.mask[:, option], option, fallback)


def best_uniform(problem: FrameProblem, candidates) -> np.ndarray:
    candidates = list(candidates)
    sels = np.stack([uniform(problem, o) for o in candidates])
    return sels[int(np.argmax(problem.evaluate_batch(sels)))]


def best_fixed_split(problem: FrameProblem) -> np.ndarray:
    return best_uniform(problem, range(problem.n_options))


def all_edge(problem: FrameProblem) -> np.ndarray:
    return best_uniform(problem, [i for i, o in enumerate(problem.options) if o.split == o.steps])


def all_device(problem: FrameProblem) -> np.ndarray:
    return best_uniform(problem, [i for i, o in enumerate(problem.options) if o.split == 0])


def random_choice(problem: FrameProblem, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(np.flatnonzero(m)) for m in problem.mask], dtype=int)


def local_search(problem: FrameProblem, sel: np.ndarray, max_sweeps: int = 50,
                 max_visits: int | None = None) -> np.ndarray:
    """1-opt: each user in turn takes its best allowed option given the others; stop when a
    whole sweep changes nothing, after ``max_sweeps`` sweeps, or after ``max_visits`` user visits
    (a bound on the work that does not grow with the frame: sweeps cost O(N) visits each).

    A user's move changes the frame's sums (Σ√k, Σ√c, edge users), so every user's latency and
    penalty. Per user, the utility part of J and the user's own penalty are O(1) per option from
    the sums (one vector over the options). Penalties are >= 0, so that value bounds an option's
    J: only options that beat the current J are candidates, and of the other users only those
    whose latency could pass their limit under the candidates' largest coefficients (latencies
    are monotone in them) need a per-candidate check. Same moves as evaluating every option on
    the whole frame (tested), without the O(N·K) matrix per user.
    """
    p = problem
    sel = np.array(sel, dtype=int)
    n = p.n_users
    if n == 0:
        return sel
    rows = np.arange(n)
    lam, over_cost = p.objective_cfg.latency_weight, p.objective_cfg.violation_penalty - 1.0
    limit = p.deadline * (1 + 1e-9)
    inv_deadline = np.where(np.isfinite(p.deadline), 1.0 / p.deadline, 0.0)
    has_deadline = bool(np.isfinite(p.deadline).any())
    blocked = np.where(p.mask, 0.0, -np.inf)  # [N, K], added to a user's option values
    uses_edge, sqrt_k = p.uses_edge, p.sqrt_k
    edge_flag = uses_edge.astype(int).tolist()
    g_of = p.edge_step_seconds(np.arange(n + 2)).tolist()  # g(n_edge) for every count
    current = float(p.evaluate_batch(sel[None])[0])
    visits_left = max_sweeps * n if max_visits is None else min(max_visits, max_sweeps * n)
    while visits_left > 0:
        improved = False
        sk, sc, local = sqrt_k[sel].astype(float), p.sqrt_c[rows, sel], p.local[rows, sel]
        s_k, s_c, base = float(sk.sum()), float(sc.sum()), float(p.base_value[rows, sel].sum())
        n_edge = int(uses_edge[sel].sum())
        for i in range(min(n, visits_left)):
            cur = int(sel[i])
            rest = n_edge - edge_flag[cur]
            s_k2 = sqrt_k + (s_k - sk[i])  # Σ√k with user i on each option
            b = p.sqrt_c[i] + (s_c - sc[i])  # Σ√c likewise
            a = np.where(uses_edge, g_of[rest + 1], g_of[rest]) * s_k2  # L_j = a·√k_j + b·√c_j + local_j
            base_i = p.base_value[i]
            value = base_i + (base - base_i[cur]) - lam * (a * s_k2 + b * b) + blocked[i]
            if limit[i] < np.inf:
                own = a * sqrt_k + b * p.sqrt_c[i] + p.local[i]
                value = value - (own * inv_deadline[i] + over_cost) * (own > limit[i])
            tol = 1e-12 * max(1.0, abs(current))
            cand = np.flatnonzero(value > current + tol)
            if cand.size == 0:
                continue
            values = value[cand]
            if has_deadline:
                a_c, b_c = a[cand], b[cand]
                worst = a_c.max() * sk + b_c.max() * sc + local
                worst[i] = -np.inf  # user i's own penalty is in `value`
                risky = np.flatnonzero(worst > limit)
                if risky.size:
                    lat = a_c[:, None] * sk[risky] + b_c[:, None] * sc[risky] + local[risky]
                    values = values - ((lat * inv_deadline[risky] + over_cost) * (lat > limit[risky])).sum(1)
            best = int(np.argmax(values))
            if values[best] > current + tol:
                o = int(cand[best])
                s_k, s_c = float(s_k2[o]), float(b[o])
                base += float(base_i[o] - base_i[cur])
                n_edge += edge_flag[o] - edge_flag[cur]
                sel[i], sk[i], sc[i], local[i] = o, sqrt_k[o], p.sqrt_c[i, o], p.local[i, o]
                current, improved = float(values[best]), True
        visits_left -= n
        if not improved:
            break
    return sel


def greedy_ls(problem: FrameProblem) -> np.ndarray:
    return local_search(problem, best_alone(problem))


def polished(decider: Decider, sweeps: int = 1, max_visits: int | None = None) -> Decider:
    """`decider`, then 1-opt on the frame objective: at most `sweeps` sweeps and at most
    ``max_visits`` user visits (no bound when None), so small frames get every sweep and a large
    one a bounded amount of work (a visit is ~20-40 µs at N = 100 on one CPU core). A policy is
    least exact on profiles it was not trained on; the sweeps lift it to greedy + local search's
    level there (BENCHMARKS §4)."""
    def decide(problem: FrameProblem) -> np.ndarray:
        return local_search(problem, decider(problem), max_sweeps=sweeps, max_visits=max_visits)

    return decide


BASELINES: dict[str, Decider] = {
    "all_edge": all_edge,
    "all_device": all_device,
    "best_fixed_split": best_fixed_split,
    "greedy_ls": greedy_ls,
    "greedy": best_alone,
    "random": random_choice,
}
