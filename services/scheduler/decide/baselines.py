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
    whole sweep changes nothing."""
    sel = np.array(sel, dtype=int)
    current = float(problem.evaluate_batch(sel[None])[0])
    allowed = [np.flatnonzero(m) for m in problem.mask]
    for _ in range(max_sweeps):
        improved = False
        for i in range(problem.n_users):
            cand = np.repeat(sel[None], len(allowed[i]), 0)
            cand[:, i] = allowed[i]
            values = problem.evaluate_batch(cand)
            best = int(np.argmax(values))
            if values[best] > current + 1e-12 * max(1.0, abs(current)):
                sel[i], current, improved = allowed[i][best], float(values[best]), True
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
