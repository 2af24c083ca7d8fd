"""Which requests should step in each edge iteration? The a + b·n model, simulated (no models, no timing).

    .venv/bin/python -m bench.edge_scheduling [--fixed-costs 2.8,8] [--anneal 20000]

With a step costing a + b·n, the engine steps every admitted request at every iteration
(processor sharing); diffusers' serving loop in bench/peer_diffusers.py runs each batch to its end
and batches whoever waited meanwhile (FIFO batches). Processor sharing delays everyone when
batching saves little (a/b small), so iteration-level rules that step a chosen subset are worth
checking before building one:

- "plan": newcomers join the running batch only when the grouping with the least total
  completion time says so (requests sorted by remaining steps run as consecutive groups, each
  group together to its end; a dynamic program over where groups end, planned anew at every
  iteration, no further arrivals assumed). Running requests never pause, so none starves.
- "plan+arrivals": the same, counting the requests expected at the recent arrival rate during
  the plan as waiting behind it.
- "best prefix" (--anneal N): at each iteration the k requests with the least remaining steps
  step, the sequence of k found by simulated annealing for this one arrival pattern (an offline
  bound for this family of rules, knowing the future).

Scenarios: the peer bench's 16 requests 0.1 s apart (a burst that ends) and a stream of 200
(steady load), each request 20 steps, b = 5 ms (the demo pack on one CPU thread), a = b·a/b.
Ratios are against FIFO batches: mean latency (lower is better) and throughput (requests / time
until the last is done).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from dataclasses import dataclass

B = 0.005
STEPS = 20
MAX_BATCH = 16


@dataclass
class Job:
    arrival: float
    remaining: int = STEPS
    started: bool = False
    done_at: float = math.nan


def first_group(remaining: list[int], c: float, at_least: int, behind: float) -> int:
    """Size of the first group of the least-total-completion grouping of sorted `remaining`
    (in units of b: a group of r_1 <= ... <= r_k lasts c·r_k + Σ r, and its member q is done
    c·r_q + Σ_{s<q} r_s + (k - q + 1)·r_q after it starts); the first group holds `at_least`."""
    m = len(remaining)
    least = [0.0] * (m + 1)
    first = m
    for i in range(m - 1, -1, -1):
        best, within, total = math.inf, 0.0, 0.0
        lowest, highest = (at_least, max(min(m, MAX_BATCH), at_least)) if i == 0 else (i + 1, min(m, i + MAX_BATCH))
        for j in range(i + 1, highest + 1):
            r = remaining[j - 1]
            within += 2 * total + c * r + r
            total += r
            if j < lowest:
                continue
            cost = within + (m - j + behind) * (c * r + total) + least[j]
            if cost < best:
                best = cost
                if i == 0:
                    first = j
        least[i] = best
    return first


def serve(policy: str, arrivals: list[float], c: float, prefix: list[int] | None = None) -> list[Job]:
    """Iteration by iteration: who steps is `policy`'s choice; each iteration costs a + b·n."""
    jobs, now, iteration = [Job(t) for t in arrivals], 0.0, 0
    while any(math.isnan(j.done_at) for j in jobs):
        present = [j for j in jobs if j.arrival <= now and math.isnan(j.done_at)]
        if not present:
            now = min(j.arrival for j in jobs if math.isnan(j.done_at))
            continue
        running = [j for j in present if j.started]
        waiting = [j for j in present if not j.started]  # in arrival order
        if policy == "processor sharing":
            batch = running + waiting[:MAX_BATCH - len(running)]
        elif policy == "best prefix":
            order = sorted(present, key=lambda j: (j.remaining, j.arrival))
            batch = order[:max(1, prefix[iteration] if iteration < len(prefix) else MAX_BATCH)]
        else:  # plan / plan+arrivals
            batch = running + waiting[:admit(policy, running, waiting, c, now, arrivals)]
        now += (c + len(batch)) * B
        iteration += 1
        for job in batch:
            job.started, job.remaining = True, job.remaining - 1
            if job.remaining == 0:
                job.done_at = now
    return jobs


def admit(policy: str, running: list[Job], waiting: list[Job], c: float, now: float, arrivals: list[float]) -> int:
    free = MAX_BATCH - len(running)
    if not running or free <= 0:
        return free
    candidates = waiting[:free]
    behind = float(len(waiting) - len(candidates))
    order = sorted([(j.remaining, True) for j in running] + [(j.remaining, False) for j in candidates])
    if policy == "plan+arrivals":  # arrivals in the last second, expected again while all run together
        rate = sum(now - 1.0 < t <= now for t in arrivals)
        behind += rate * (c + len(order)) * B * max(r for r, _ in order)
    at_least = max(i for i, (_, is_running) in enumerate(order) if is_running) + 1
    return max(0, first_group([r for r, _ in order], c, at_least, behind) - len(running))


def fifo_batches(arrivals: list[float], c: float) -> list[Job]:
    jobs, now, i = [Job(t) for t in arrivals], 0.0, 0
    while i < len(jobs):
        now = max(now, jobs[i].arrival)
        batch = [j for j in jobs[i:i + MAX_BATCH] if j.arrival <= now]
        now += STEPS * (c + len(batch)) * B
        for job in batch:
            job.done_at = now
        i += len(batch)
    return jobs


def mean_latency(jobs: list[Job]) -> float:
    return statistics.mean(j.done_at - j.arrival for j in jobs)


def throughput(jobs: list[Job]) -> float:
    return len(jobs) / max(j.done_at for j in jobs)


def anneal(arrivals: list[float], c: float, steps: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    prefix = [MAX_BATCH] * (len(arrivals) * STEPS)
    cost = mean_latency(serve("best prefix", arrivals, c, prefix))
    temperature = 0.02
    for _ in range(steps):
        trial = list(prefix)
        i = rng.randrange(min(len(trial), 8 * STEPS))
        trial[i] = max(1, min(MAX_BATCH, trial[i] + rng.choice((-2, -1, 1, 2))))
        trial_cost = mean_latency(serve("best prefix", arrivals, c, trial))
        if trial_cost < cost or rng.random() < math.exp((cost - trial_cost) / temperature):
            prefix, cost = trial, trial_cost
        temperature *= 0.9997
    return prefix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed-costs", default="2.8,8", help="a/b values to simulate, comma-separated")
    parser.add_argument("--anneal", type=int, default=0, help="annealing steps for 'best prefix' (burst only; 0 = skip)")
    args = parser.parse_args()
    scenarios = {"16 requests 0.1 s apart": [i * 0.1 for i in range(16)],
                 "200 requests 0.1 s apart": [i * 0.1 for i in range(200)],
                 "200 requests 0.07 s apart": [i * 0.07 for i in range(200)]}
    print("| scenario | a/b | rule | mean latency vs FIFO batches | throughput vs FIFO batches |\n|---|---|---|---|---|")
    for c in (float(v) for v in args.fixed_costs.split(",")):
        for name, arrivals in scenarios.items():
            fifo = fifo_batches(arrivals, c)
            rules = ["processor sharing", "plan", "plan+arrivals"]
            if args.anneal and len(arrivals) <= 16:
                rules.append("best prefix")
            for rule in rules:
                prefix = anneal(arrivals, c, args.anneal) if rule == "best prefix" else None
                jobs = serve(rule, arrivals, c, prefix)
                print(f"| {name} | {c:g} | {rule} | {mean_latency(jobs) / mean_latency(fifo):.3f}x | "
                      f"{throughput(jobs) / throughput(fifo):.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
