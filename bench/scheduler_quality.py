"""Scheduler quality and speed: trained policy vs greedy+LS vs baselines vs the exact optimum.

    .venv/bin/python -m bench.scheduler_quality [--instances 500] [--frames 200] [--policy DIR]

1. Small frames (N = 2..5, random scenario): objective J of each decider relative to the exact
   optimum (branch and bound + vectorized enumeration).
2. Default scenario at N = 20: J per user, ratio to the best fixed split, violations, how much of
   the denoising the edge does and its mean batch.
3. Budget violations on the training distribution (N = 1..100): the PID-Lagrangian policy vs the
   unconstrained PPO policy (same steps budget, λ = 0).
4. Decision latency at N = 100 (and 64, the largest frame the service decides): decider + allocator (closed form; when a budget binds, the exact
   active-set re-solve, cvxpy only if that can't decide), p50 / p99; and plan_frame end to end
   (incl. building the frame's arrays).
Prints markdown tables. Profiles: the service's defaults (the demo pack's measured quality and cost
profiles) unless given (``--quality synthetic --costs builtin`` for the synthetic ones); frames come
from the default scenario adapted to them (their device classes and personalized users).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from services.scheduler.decide import planner
from services.scheduler.decide.baselines import BASELINES, polished
from services.scheduler.decide.exact import exact_optimum
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.planner import schedule_frame
from services.scheduler.decide.policy import SchedulerPolicy
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.scenario import DEFAULT_SCENARIO, sample_frame, scenario_for
from services.scheduler.defaults import BUILTIN, DEFAULT_QUALITY, MAX_FRAME, POLISH_SWEEPS, POLISH_VISITS, default_cost_profile, display_path, load_profiles
from tandem.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = DEFAULT_SCENARIO  # set in main() from the profiles
POLICIES = ROOT / "services" / "scheduler" / "policies"
POLISHED = f"service (policy + {POLISH_SWEEPS} sweeps, {POLISH_VISITS} visits at most)"  # the service's default decider
ORDER = ["policy", POLISHED, "policy (unconstrained)", "greedy_ls", "best_fixed_split", "all_edge", "all_device", "greedy",
         "random"]


def deciders(policy_dir: Path) -> dict:
    out = {}
    unconstrained = policy_dir.with_name(policy_dir.name + "-unconstrained")
    for name, path in (("policy", policy_dir), ("policy (unconstrained)", unconstrained)):
        if (path / "config.json").exists():
            out[name] = SchedulerPolicy.load(path, DEFAULT_OPTIONS)
    if "policy" in out:
        out[POLISHED] = polished(out["policy"], POLISH_SWEEPS, POLISH_VISITS)
    out.update({k: BASELINES[k] for k in ORDER if k in BASELINES})
    return {k: out[k] for k in ORDER if k in out}


def small_frames(ds: dict, quality, costs, instances: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ratios = {k: [] for k in ds}
    regret = {k: [] for k in ds}
    optimal = {k: 0 for k in ds}
    t_exact = []
    skipped = 0
    for _ in range(instances):
        n = int(rng.integers(2, 6))
        users, ctx = sample_frame(rng, SCENARIO, n_users=n, costs=costs)
        p = FrameProblem.build(users, quality, costs, DEFAULT_OPTIONS, ctx)
        t0 = time.perf_counter()
        _, best = exact_optimum(p)
        t_exact.append(time.perf_counter() - t0)
        for name, decide in ds.items():
            value = float(p.evaluate_batch(np.asarray(decide(p))[None])[0])
            regret[name].append((best - value) / n)
            optimal[name] += value >= best - 1e-9 * max(1, abs(best))
            if best > 0:
                ratios[name].append(value / best)
        skipped += best <= 0
    print(f"\n### Small frames: J / exact optimum ({instances} frames, N = 2..5, K = {len(DEFAULT_OPTIONS)} options; "
          f"{skipped} frames with J* <= 0 left out of the ratios)\n")
    print("| decider | mean J/J* | p5 J/J* | min J/J* | at optimum | mean regret per user |")
    print("|---|---|---|---|---|---|")
    for name in ds:
        r = np.array(ratios[name])
        print(f"| {name} | {r.mean():.4f} | {percentile(r, 5):.4f} | {r.min():.4f} | "
              f"{optimal[name] / instances:.1%} | {np.mean(regret[name]):.4f} |")
    t = np.array(t_exact)
    print(f"\nexact search: mean {t.mean() * 1e3:.0f} ms, max {t.max() * 1e3:.0f} ms per frame")


def default_scenario(ds: dict, quality, costs, frames: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    acc = {k: {"J": 0.0, "U": 0.0, "viol": 0, "users": 0, "k": 0, "T": 0, "batch": 0.0, "q": 0.0, "lat": 0.0}
           for k in ds}
    per_frame = {k: [] for k in ds}
    for _ in range(frames):
        users, ctx = sample_frame(rng, SCENARIO, n_users=n, costs=costs)
        p = FrameProblem.build(users, quality, costs, DEFAULT_OPTIONS, ctx)
        for name, decide in ds.items():
            sel = np.asarray(decide(p))
            ev = p.evaluate(sel)
            a = acc[name]
            a["J"] += ev.objective
            a["U"] += ev.utility
            a["viol"] += ev.n_violations
            a["users"] += n
            a["k"] += p.edge_steps[sel].sum()
            a["T"] += sum(DEFAULT_OPTIONS[i].steps for i in sel)
            a["batch"] += p.uses_edge[sel].sum()
            a["q"] += ev.quality.sum()
            a["lat"] += ev.latency.sum()
            per_frame[name].append(ev.objective)
    base = acc["best_fixed_split"]["J"]
    wins = {k: np.mean(np.array(per_frame[k]) >= np.array(per_frame["best_fixed_split"]) - 1e-9) for k in ds}
    print(f"\n### Default scenario, N = {n} ({frames} frames)\n")
    print("| decider | J per user | ΣJ / ΣJ(best fixed split) | frames ≥ best fixed | utility per user | "
          "quality | latency s | violations | edge share of steps | edge batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ds:
        a = acc[name]
        print(f"| {name} | {a['J'] / a['users']:.4f} | {a['J'] / base:.3f} | {wins[name]:.0%} | "
              f"{a['U'] / a['users']:.4f} | {a['q'] / a['users']:.3f} | {a['lat'] / a['users']:.2f} | "
              f"{a['viol'] / a['users']:.2%} | {a['k'] / a['T']:.1%} | {a['batch'] / frames:.1f} |")


def violations(ds: dict, quality, costs, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [k for k in ("policy", "policy (unconstrained)", "greedy_ls", "best_fixed_split") if k in ds]
    acc = {k: [0, 0, 0.0, 0.0] for k in names}
    frames_with = {k: 0 for k in names}
    for _ in range(frames):
        users, ctx = sample_frame(rng, SCENARIO, costs=costs)
        p = FrameProblem.build(users, quality, costs, DEFAULT_OPTIONS, ctx)
        for name in names:
            ev = p.evaluate(np.asarray(ds[name](p)))
            a = acc[name]
            a[0] += ev.n_violations
            a[1] += p.n_users
            a[2] += ev.utility
            a[3] += ev.objective
            frames_with[name] += ev.n_violations > 0
    print(f"\n### Latency-budget violations, training distribution (N = 1..100, {frames} frames)\n")
    print("| decider | users over budget | frames with a violation | utility per user | J per user |")
    print("|---|---|---|---|---|")
    for name in names:
        a = acc[name]
        print(f"| {name} | {a[0] / a[1]:.2%} | {frames_with[name] / frames:.0%} | {a[2] / a[1]:.4f} | {a[3] / a[1]:.4f} |")


def latency(ds: dict, quality, costs, frames: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [k for k in ("policy", POLISHED, "greedy_ls", "best_fixed_split") if k in ds]
    times = {k: [] for k in names}
    total = {k: [] for k in names}
    repairs = {k: 0 for k in names}
    convex = {k: 0 for k in names}
    scenes = [sample_frame(rng, SCENARIO, n_users=n, costs=costs) for _ in range(frames)]
    planner.warmup(n)  # compile the deadline-aware allocator, as the service does at start
    for name in names:  # warm-up (caches)
        schedule_frame(*scenes[0][:1], quality, costs, ds[name], ctx=scenes[0][1])
    for users, ctx in scenes:
        for name in names:
            t0 = time.perf_counter()
            d = schedule_frame(users, quality, costs, ds[name], ctx=ctx)
            total[name].append(time.perf_counter() - t0)
            times[name].append(d.decide_seconds + d.allocate_seconds)
            repairs[name] += d.allocation is not None
            convex[name] += d.allocation is not None and d.allocation.solver == "cvxpy"
    print(f"\n### Decision latency, N = {n} ({frames} frames, this machine, shared cores)\n")
    print("| decider | decide + allocate p50 | p99 | plan_frame end to end p50 | p99 | frames re-solved with "
          "deadlines | of which by cvxpy |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        t, e = np.array(times[name]) * 1e3, np.array(total[name]) * 1e3
        print(f"| {name} | {percentile(t, 50):.2f} ms | {percentile(t, 99):.2f} ms | "
              f"{percentile(e, 50):.2f} ms | {percentile(e, 99):.2f} ms | {repairs[name]}/{frames} | {convex[name]} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--only", choices=["small", "default", "violations", "latency"],
                    help="one section (e.g. the latency one again on a quieter machine)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--policy", type=Path, help="trained policy directory (default: policies/default, or "
                    "policies/synthetic with the synthetic profiles); its '-unconstrained' sibling is compared")
    ap.add_argument("--quality", default=str(DEFAULT_QUALITY), help="quality profile JSON or 'synthetic'")
    ap.add_argument("--costs", default=default_cost_profile(), help=f"cost profile JSON or {BUILTIN!r}")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    global SCENARIO
    quality, costs = load_profiles(args.quality, args.costs)
    SCENARIO = scenario_for(quality, costs)
    if args.policy is None:
        args.policy = POLICIES / ("synthetic" if quality.synthetic and costs.synthetic else "default")
    ds = deciders(args.policy)
    print("```\n" + " ".join([".venv/bin/python", "bench/scheduler_quality.py", *sys.argv[1:]]) + "\n```")
    print(f"quality profile: {'synthetic' if quality.synthetic else display_path(args.quality)}; "
          f"cost profile: {'synthetic' if costs.synthetic else display_path(args.costs)}")
    if "policy" in ds:
        meta = ds["policy"].config.meta
        print(f"policy: {display_path(args.policy)} "
              f"({meta.get('algorithm')}, {meta.get('steps')} steps, seed {meta.get('seed')}, trained on "
              f"{meta.get('quality_profile', '?')} / {meta.get('cost_profile', '?')})")
    run = lambda name: args.only in (None, name)  # noqa: E731
    if run("small"):
        small_frames(ds, quality, costs, args.instances, args.seed)
    if run("default"):
        default_scenario(ds, quality, costs, args.frames, args.n, args.seed + 1)
    if run("violations"):
        violations(ds, quality, costs, args.frames, args.seed + 2)
    if run("latency"):
        latency(ds, quality, costs, min(args.frames, 200), 100, args.seed + 3)
        latency(ds, quality, costs, min(args.frames, 200), MAX_FRAME, args.seed + 4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
