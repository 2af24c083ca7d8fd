"""Deadline-aware shares: the exact active-set solver vs cvxpy (Clarabel), same frames, one run.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.deadline_allocator [--frames 400] [--seed 0]

Random frames of N = 1..100 edge users (GPU work, transfer time, local seconds, weights), with
latency budgets between 0.4x and 1.3x of what the closed-form shares give (30% without a budget),
so many frames bind and some are infeasible. Prints how often the two agree (feasible /
infeasible, objective), and each one's time per frame with the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from services.scheduler.decide.allocator import DeadlineAllocator, closed_form, deadline_shares
from tandem.stats import percentile


def random_frame(rng: np.random.Generator):
    n = int(rng.integers(1, 101))
    w = rng.uniform(0.01, 3.0, n) * (rng.random(n) > 0.1)
    c = rng.uniform(0.001, 1.0, n)
    local = rng.uniform(0.0, 2.0, n)
    weights = rng.uniform(0.5, 2.0, n) if rng.random() < 0.5 else None
    deadlines = (closed_form(w, c, weights).latencies + local) * rng.uniform(0.4, 1.3, n)
    deadlines[rng.random(n) < 0.3] = np.inf
    return w, c, weights, local, deadlines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    frames = [random_frame(rng) for _ in range(args.frames)]
    solver = DeadlineAllocator()
    solver.warmup(128)
    t_fast, t_cvx = [], []
    outcome = {"both feasible": 0, "both infeasible": 0, "active set undecided": 0,
               "cvxpy failed, active set feasible": 0, "disagree": 0}
    gaps = []
    for frame in frames:
        t0 = time.perf_counter()
        fast = deadline_shares(*frame)
        t1 = time.perf_counter()
        ref = solver.solve_convex(*frame)
        t2 = time.perf_counter()
        t_fast.append(t1 - t0)
        t_cvx.append(t2 - t1)
        if fast is None:
            outcome["active set undecided"] += 1
        elif fast.feasible and ref.feasible:
            outcome["both feasible"] += 1
            gaps.append((fast.objective - ref.objective) / ref.objective)
        elif not fast.feasible and not ref.feasible:
            outcome["both infeasible"] += 1
        elif fast.feasible:
            outcome["cvxpy failed, active set feasible"] += 1  # its answer met every budget (checked)
        else:
            outcome["disagree"] += 1
    print("```\n" + " ".join([".venv/bin/python", "bench/deadline_allocator.py", *sys.argv[1:]]) + "\n```")
    print(f"\n{args.frames} frames, N = 1..100\n")
    print("| outcome | frames |\n|---|---|")
    for k, v in outcome.items():
        print(f"| {k} | {v} |")
    if gaps:
        g = np.array(gaps)
        print(f"\nobjective, active set vs cvxpy where both are feasible: max {g.max():+.2e}, "
              f"min {g.min():+.2e} (relative; negative = active set lower)")
    f, c = np.array(t_fast) * 1e3, np.array(t_cvx) * 1e3
    print("\n| solver | p50 | p99 |\n|---|---|---|")
    print(f"| active set | {percentile(f, 50):.3f} ms | {percentile(f, 99):.3f} ms |")
    print(f"| cvxpy (Clarabel, compiled) | {percentile(c, 50):.3f} ms | {percentile(c, 99):.3f} ms |")
    print(f"\ncvxpy / active set, per frame: median {np.median(c / f):.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
