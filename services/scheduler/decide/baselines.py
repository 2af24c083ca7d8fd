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


def local_search(problem: FrameProblem, sel: np.ndarray, max_sweeps: int = 50) -> np.ndarray:
    """1-opt: each user in turn takes its best allowed option given the others; stop when a
    whole sweep changes nothing.

    A user's move changes the frame's sums (Σ√k, Σ√c, edge users), so every user's latency and
    penalty; the utility part of J is O(1) per option from the sums. Penalties are >= 0, so an
    option's utility bounds its J: only options whose utility beats the current J need the O(N)
    penalty check (a handful per user in a frame without violations, not all K).
    """
    p = problem
    sel = np.array(sel, dtype=int)
    n = p.n_users
    if n == 0:
        return sel
    rows = np.arange(n)
    lam, penalty = p.objective_cfg.latency_weight, p.objective_cfg.violation_penalty
    limit = p.deadline * (1 + 1e-9)
    inv_deadline = np.where(np.isfinite(p.deadline), 1.0 / p.deadline, 0.0)
    has_deadline = bool(np.isfinite(p.deadline).any())
    allowed = [np.flatnonzero(m) for m in p.mask]
    current = float(p.evaluate_batch(sel[None])[0])
    for _ in range(max_sweeps):
        improved = False
        sk, sc, local = p.sqrt_k[sel].astype(float), p.sqrt_c[rows, sel], p.local[rows, sel]
        s_k, s_c, base = sk.sum(), sc.sum(), float(p.base_value[rows, sel].sum())
        n_edge = int(p.uses_edge[sel].sum())
        for i in range(n):
            opts, cur = allowed[i], sel[i]
            sk_o, sc_o = p.sqrt_k[opts], p.sqrt_c[i, opts]
            s_k2, s_c2 = s_k - sk[i] + sk_o, s_c - sc[i] + sc_o
            g2 = p.edge_step_seconds(n_edge - int(p.uses_edge[cur]) + p.uses_edge[opts])
            util = base - p.base_value[i, cur] + p.base_value[i, opts] - lam * (g2 * s_k2**2 + s_c2**2)
            tol = 1e-12 * max(1.0, abs(current))
            if has_deadline:
                values = np.full(len(opts), -np.inf)
                cand = np.flatnonzero(util > current + tol)
                if cand.size == 0:
                    continue
                a, b = g2[cand] * s_k2[cand], s_c2[cand]  # L_j = a·√k_j + b·√c_j + local_j
                lat = a[:, None] * sk[None, :] + b[:, None] * sc[None, :] + local[None, :]
                lat[:, i] = a * sk_o[cand] + b * sc_o[cand] + p.local[i, opts[cand]]
                values[cand] = util[cand] - np.where(lat > limit, penalty + lat * inv_deadline - 1.0, 0.0).sum(1)
            else:
                values = util
            best = int(np.argmax(values))
            if values[best] > current + tol:
                o = opts[best]
                s_k, s_c = s_k2[best], s_c2[best]
                base += p.base_value[i, o] - p.base_value[i, cur]
                n_edge += int(p.uses_edge[o]) - int(p.uses_edge[cur])
                sel[i], sk[i], sc[i], local[i] = o, p.sqrt_k[o], p.sqrt_c[i, o], p.local[i, o]
                current, improved = float(values[best]), True
        if not improved:
            break
    return sel


def greedy_ls(problem: FrameProblem) -> np.ndarray:
    return local_search(problem, best_alone(problem))


def polished(decider: Decider, sweeps: int = 1, max_users: int | None = None) -> Decider:
    """`decider`, then `sweeps` 1-opt sweeps on the frame objective, for frames of at most
    ``max_users`` users (all when None). A sweep is N·K frame evaluations, O(N²·K): ~2 ms at
    N = 10 and ~30 ms at N = 100 on one CPU core, so it pays for small frames, where a policy
    trained across frame sizes is least exact; it also repairs a policy run on profiles it was
    not trained on."""
    def decide(problem: FrameProblem) -> np.ndarray:
        sel = decider(problem)
        if max_users is not None and problem.n_users > max_users:
            return sel
        return local_search(problem, sel, max_sweeps=sweeps)

    return decide


BASELINES: dict[str, Decider] = {
    "all_edge": all_edge,
    "all_device": all_device,
    "best_fixed_split": best_fixed_split,
    "greedy_ls": greedy_ls,
    "greedy": best_alone,
    "random": random_choice,
}
