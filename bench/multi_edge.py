"""Multi-edge routing: does sending each plan to the edge where it finishes first (the scheduler's
routing, services/scheduler/decide/routing.py) beat round robin and least queue when edges differ in
speed, and match them when they do not?

    .venv/bin/python -m bench.multi_edge [--quick] [--no-loopback]

(a) Simulation in the scheduler's cost model: each edge runs iteration-level batches of n requests
at a + b·n seconds per iteration (its own a, b, up to its batch of 16), requests arrive as a
Poisson stream, each with k edge steps (4, 8, 12 or 16). The real EdgeRegistry routes them: it gets
each edge's heartbeat once a simulated second (queue, running, the interval's iterations,
request-steps and busy seconds), counts the plans routed since, and picks an edge per request by
its policy: "finish" (the scheduler's), "least-load" (queued + running + routed: the scheduler
before) or "round-robin". Its cost model is the GPU-like edge's a + b·n. Fleets of 1, 2, 4 and 8
edges: equal (all GPU-like) and two mixes: "gpu+cpu" (one GPU-like edge in four, the others
CPU-like: small a, large b, of three speeds) and "two gpus" (GPU-like edges beside ones of the
same shape 2.5x slower). Throughput at a latency budget: the highest arrival rate at
which 95 % of the requests finish their edge steps within the budget (bisection over the rate,
the same random arrivals scaled), given as the requests per second completed within the budget.

(b) Loopback: a scheduler and three real edge servers on tiny random packs of different UNet
widths (so different speeds), each heartbeating; client loops ask the scheduler for a plan and
run its edge steps on the plan's edge. Prints each edge's measured seconds per UNet iteration, the
scheduler's share of requests to it, and checks that the fastest edge got more than the slowest.

Exits non-zero unless, at the same budget, "finish" beats both baselines with mixed edges (2 edges
or more) and is within ±5 % of both with equal edges, and the loopback routing follows speed.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.scheduler.decide.routing import ROUTERS, StepModel
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry

POLICIES = ROUTERS  # ("finish", "least-load", "round-robin")
STEPS = (4, 8, 12, 16)  # a request's edge steps k
BUDGET_S = 2.0  # edge phase: waiting + its k steps
WITHIN = 0.95  # the share of requests that must meet the budget
HEARTBEAT_S = 1.0
EQUAL_TOLERANCE = 0.05


@dataclass(frozen=True)
class EdgeSpec:
    name: str
    a_s: float
    b_s: float
    max_batch: int = 16

    def iteration_seconds(self, n: int) -> float:
        return self.a_s + self.b_s * n


GPU = EdgeSpec("gpu", 0.025, 0.0075)  # the built-in profile's edge: batching nearly free
OLD_GPU = EdgeSpec("gpu-old", 0.0625, 0.01875)  # the same shape, 2.5x slower (an older card)
CPUS = (EdgeSpec("cpu", 0.01, 0.06), EdgeSpec("cpu-slow", 0.01, 0.10), EdgeSpec("cpu", 0.01, 0.08))
MODEL = StepModel(GPU.a_s, GPU.b_s, GPU.max_batch)  # what the scheduler's cost profile says
FLEETS = ("equal", "gpu+cpu", "two gpus")  # how the edges' speeds differ


def fleet(n: int, kind: str) -> list[EdgeSpec]:
    """``n`` edges: "equal" (all GPU-like), "gpu+cpu" (one GPU-like edge in four, CPU-like ones
    of three speeds beside it) or "two gpus" (GPU-like ones alternating with 2.5x slower ones)."""
    if kind == "equal":
        return [GPU] * n
    if kind == "two gpus":
        return [GPU if i % 2 == 0 else OLD_GPU for i in range(n)]
    if kind == "gpu+cpu":
        return [GPU if i % 4 == 0 else CPUS[(i - 1 - i // 4) % len(CPUS)] for i in range(n)]
    raise ValueError(f"unknown fleet {kind!r}; expected one of {', '.join(FLEETS)}")


# --- (a) the simulation ------------------------------------------------------------------------
@dataclass
class _Request:
    arrived: float
    left: int
    done: float = -1.0


@dataclass
class _Edge:
    spec: EdgeSpec
    address: str
    queue: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy: bool = False
    iterations: int = 0  # since its last heartbeat
    steps: int = 0
    busy_s: float = 0.0


@dataclass(frozen=True)
class SimResult:
    rate: float  # offered, requests/s
    within: float  # share of the counted requests done within the budget
    goodput: float  # requests/s done within the budget
    shares: dict[str, float]  # share of the requests routed to each edge kind


def simulate(specs: Sequence[EdgeSpec], policy: str, rate: float, *, duration: float = 60.0, warmup: float = 10.0,
             budget: float = BUDGET_S, seed: int = 0, model: StepModel = MODEL) -> SimResult:
    """One run: Poisson arrivals at ``rate`` for ``duration`` simulated seconds (those of the first
    ``warmup`` not counted), routed by an EdgeRegistry with ``policy``."""
    now = [0.0]
    registry = EdgeRegistry(ttl_s=10 * HEARTBEAT_S, clock=lambda: now[0], max_edges=max(1, len(specs)), policy=policy)
    edges = [_Edge(spec, f"edge{i}:1") for i, spec in enumerate(specs)]
    by_address = {e.address: e for e in edges}
    rng = random.Random(seed)  # the same draws for every rate: the arrivals are scaled, not redrawn
    events: list[tuple[float, int, str, int]] = []
    seq = 0

    def push(t: float, kind: str, index: int) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, index))
        seq += 1

    def start(edge: _Edge, t: float, index: int) -> None:
        while edge.queue and len(edge.running) < edge.spec.max_batch:
            edge.running.append(edge.queue.popleft())
        edge.busy = bool(edge.running)
        if edge.busy:
            push(t + edge.spec.iteration_seconds(len(edge.running)), "step", index)

    for i, edge in enumerate(edges):  # edges beat at their own phases
        registry.heartbeat(EdgeLoad(edge.address))
        push(HEARTBEAT_S * (i + 1) / len(edges), "beat", i)
    requests: list[_Request] = []
    routed: Counter[str] = Counter()
    t_next = rng.expovariate(1.0) / rate
    push(t_next, "arrive", 0)
    end = duration + budget + 5.0
    while events:
        t, _, kind, index = heapq.heappop(events)
        if t > end:
            break
        now[0] = t
        if kind == "arrive":
            request = _Request(t, rng.choice(STEPS))
            requests.append(request)
            address = registry.route([request.left], model)[0]
            edge = by_address[address]
            routed[edge.spec.name] += 1
            edge.queue.append(request)
            if not edge.busy:
                start(edge, t, edges.index(edge))
            t_next = t + rng.expovariate(1.0) / rate
            if t_next < duration:
                push(t_next, "arrive", 0)
        elif kind == "step":
            edge = edges[index]
            n = len(edge.running)
            edge.iterations += 1
            edge.steps += n
            edge.busy_s += edge.spec.iteration_seconds(n)
            for request in edge.running:
                request.left -= 1
                if request.left == 0:
                    request.done = t
            edge.running = [r for r in edge.running if r.left > 0]
            start(edge, t, index)
        else:  # a heartbeat
            edge = edges[index]
            registry.heartbeat(EdgeLoad(edge.address, len(edge.queue), len(edge.running), edge.steps / HEARTBEAT_S,
                                        interval_iterations=edge.iterations, interval_steps=edge.steps,
                                        interval_busy_s=edge.busy_s))
            edge.iterations, edge.steps, edge.busy_s = 0, 0, 0.0
            if t < duration + budget:
                push(t + HEARTBEAT_S, "beat", index)
    counted = [r for r in requests if r.arrived >= warmup]
    good = sum(1 for r in counted if 0 <= r.done - r.arrived <= budget)
    total = sum(routed.values()) or 1
    return SimResult(rate, good / max(len(counted), 1), good / max(duration - warmup, 1e-9),
                     {name: count / total for name, count in sorted(routed.items())})


def capacity(specs: Sequence[EdgeSpec]) -> float:
    """Requests/s the fleet could complete at full batches (an upper bound for the bisection)."""
    mean_k = sum(STEPS) / len(STEPS)
    return sum(s.max_batch / (mean_k * s.iteration_seconds(s.max_batch)) for s in specs)


def max_throughput(specs: Sequence[EdgeSpec], policy: str, *, duration: float = 60.0, warmup: float = 10.0,
                   budget: float = BUDGET_S, seed: int = 0, tolerance: float = 0.01) -> SimResult:
    """The run at the highest rate (within ``tolerance``) whose requests meet the budget at WITHIN."""
    def run(rate: float) -> SimResult:
        return simulate(specs, policy, rate, duration=duration, warmup=warmup, budget=budget, seed=seed)

    lo, hi = 0.0, capacity(specs) * 1.2
    best = SimResult(0.0, 1.0, 0.0, {})
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        result = run(mid)
        if result.within >= WITHIN:
            lo, best = mid, result
        else:
            hi = mid
    return best


@dataclass(frozen=True)
class Row:
    edges: int
    fleet: str
    results: dict[str, SimResult]

    @property
    def mixed(self) -> bool:
        return self.fleet != "equal" and self.edges >= 2

    def ratio(self, baseline: str) -> float:
        base = self.results[baseline].goodput
        return self.results["finish"].goodput / base if base > 0 else float("inf")


def simulation(sizes: Sequence[int] = (1, 2, 4, 8), *, duration: float = 60.0, warmup: float = 10.0,
               tolerance: float = 0.01, seed: int = 0) -> list[Row]:
    """Each fleet at each size (one edge: the equal fleet only, there is nothing to mix)."""
    return [Row(n, kind, {policy: max_throughput(fleet(n, kind), policy, duration=duration, warmup=warmup,
                                                 tolerance=tolerance, seed=seed) for policy in POLICIES})
            for kind in FLEETS for n in sizes if kind == "equal" or n >= 2]


def failures(rows: Sequence[Row]) -> list[str]:
    """What the exit status checks: mixed (2+ edges): finish beats both; equal: within ±5 % of both."""
    out = []
    for row in rows:
        for baseline in ("least-load", "round-robin"):
            ratio = row.ratio(baseline)
            label = f"{row.edges} edges ({row.fleet}), finish vs {baseline}: {ratio:.3f}x"
            if row.mixed and not ratio > 1.0:
                out.append(f"{label} (should beat it)")
            if not row.mixed and abs(ratio - 1.0) > EQUAL_TOLERANCE:
                out.append(f"{label} (should match it within ±{EQUAL_TOLERANCE:.0%})")
    return out


def print_simulation(rows: Sequence[Row], duration: float) -> None:
    print(f"### (a) Simulation: throughput at a {BUDGET_S:g} s edge-phase budget ({WITHIN:.0%} within), "
          f"{duration:g} simulated s per run\n")
    print("| edges | speeds | finish (req/s) | least-load | round-robin | finish / least-load | finish / round-robin "
          "| finish: share to GPU-like |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = row.results
        kinds = Counter(s.name for s in fleet(row.edges, row.fleet))
        speeds = ", ".join(f"{n}× {k}" for k, n in kinds.items())
        print(f"| {row.edges} | {speeds} | {r['finish'].goodput:.1f} | {r['least-load'].goodput:.1f} | "
              f"{r['round-robin'].goodput:.1f} | {row.ratio('least-load'):.3f} | {row.ratio('round-robin'):.3f} | "
              f"{r['finish'].shares.get('gpu', 0.0):.0%} |")
    print()
    specs = ", ".join(f"{s.name} a={s.a_s:g} s b={s.b_s:g} s" for s in (GPU, OLD_GPU, *dict.fromkeys(CPUS)))
    print(f"Edges (per iteration a + b·n, batch ≤ 16): {specs}; the router's model: the GPU-like one.\n")


# --- (b) loopback -------------------------------------------------------------------------------
LOOPBACK_WIDTHS = {"fast": (16, 32), "medium": (32, 64), "slow": (64, 128)}
PROMPTS = ("a red circle at the left on a blue background", "a green square at the top on a white background",
           "a yellow triangle at the center on a black background")


@dataclass
class LoopbackResult:
    requests: dict[str, int]  # by edge name: requests the scheduler routed there and that completed
    iteration_s: dict[str, float]  # by edge name: mean seconds per UNet iteration (its own metrics)
    mean_batch: dict[str, float]
    failed: int
    seconds: float

    @property
    def follows_speed(self) -> bool:
        fastest = min(self.iteration_s, key=lambda name: self.iteration_s[name] / max(self.mean_batch[name], 1.0))
        slowest = max(self.iteration_s, key=lambda name: self.iteration_s[name] / max(self.mean_batch[name], 1.0))
        return self.requests.get(fastest, 0) > self.requests.get(slowest, 0)


def loopback(seconds: float = 40.0, clients: int = 6, log_dir: Path | None = None) -> LoopbackResult:
    from services.common.launcher import ONE_THREAD, Group, metric_value, scheduler_service, wait_metric
    from tandem.tiny_pack import build_tiny_pack

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        logs = log_dir or root
        packs = {name: build_tiny_pack(root / name, seed=i, unet_channels=widths, role="large")
                 for i, (name, widths) in enumerate(LOOPBACK_WIDTHS.items())}
        with scheduler_service(logs, env=ONE_THREAD) as sched, Group() as group:
            edges = _start_edges(packs, sched.address, logs, group)
            names = {edge.address: name for name, edge in edges.items()}
            wait_metric(sched, "tandem_scheduler_edges_live", 3, 60, "the three edges never all heartbeated")
            before = {name: _unet_totals(edge.metrics(), metric_value) for name, edge in edges.items()}
            counts: Counter[str] = Counter()
            failed = [0]
            lock = threading.Lock()
            began = time.monotonic()
            asyncio.run(_clients(sched.address, clients, began + seconds, names, counts, failed, lock))
            elapsed = time.monotonic() - began
            after = {name: _unet_totals(edge.metrics(), metric_value) for name, edge in edges.items()}
    iteration_s, mean_batch = {}, {}
    for name in packs:
        calls, busy, steps = (a - b for a, b in zip(after[name], before[name]))
        iteration_s[name] = busy / calls if calls else float("nan")
        mean_batch[name] = steps / calls if calls else 0.0
    return LoopbackResult(dict(counts), iteration_s, mean_batch, failed[0], elapsed)


def _start_edges(packs: dict[str, Path], scheduler: str, logs: Path, group) -> dict:
    """An edge server per pack, started together (each heartbeating to ``scheduler``), in ``group``."""
    from concurrent.futures import ThreadPoolExecutor

    from services.common.launcher import ONE_THREAD, start_server

    with ThreadPoolExecutor(len(packs)) as pool:
        futures = {name: pool.submit(start_server, "services.edge_server", "--pack", str(pack), "--device", "cpu",
                                     "--scheduler", scheduler, log_dir=logs, name=f"edge-{name}", env=ONE_THREAD)
                   for name, pack in packs.items()}
        edges, errors = {}, []
        for name, future in futures.items():
            try:
                edges[name] = group.add(future.result())
            except Exception as exc:  # noqa: BLE001 - the others still stop with the group; the first error is raised
                errors.append(exc)
    if errors:
        raise errors[0]
    return edges


def _unet_totals(text: str, metric_value) -> tuple[float, float, float]:
    return (metric_value(text, "tandem_edge_iteration_seconds_count"), metric_value(text, "tandem_edge_iteration_seconds_sum"),
            metric_value(text, "tandem_edge_steps_total"))


async def _clients(scheduler: str, clients: int, until: float, names: dict[str, str], counts: Counter,
                   failed: list[int], lock: threading.Lock) -> None:
    from services.common.scheduler_client import report, request_plan
    from services.ue_client.transport import EdgeError, fetch_handoff
    from tandem.handoff import CodecSpec
    from tandem.request import GenerationRequest

    async def one(index: int) -> None:
        i = index
        while time.monotonic() < until:
            plan = await asyncio.to_thread(request_plan, scheduler, "cpu-demo", bandwidth_bps=100e6,
                                           user_id=f"client{index}", timeout=30)
            if plan is None or not plan.edge_address or plan.split == 0:
                with lock:
                    failed[0] += 1
                await asyncio.sleep(0.1)
                continue
            request = GenerationRequest(PROMPTS[i % len(PROMPTS)], steps=plan.steps, split=plan.split, seed=i,
                                        guidance_scale=4.0, height=32, width=32).validate()
            try:
                edge = await fetch_handoff(plan.edge_address, request, CodecSpec(plan.encoding, plan.merge_ratio,
                                                                                 plan.merge_strategy), timeout=120)
            except EdgeError:
                with lock:
                    failed[0] += 1
                continue
            with lock:
                counts[names.get(plan.edge_address, plan.edge_address)] += 1
            await asyncio.to_thread(report, scheduler, plan.plan_id, edge.seconds, plan.split, 0, len(edge.payload),
                                    timeout=30)
            i += clients

    await asyncio.gather(*(one(c) for c in range(clients)))


def print_loopback(result: LoopbackResult, clients: int) -> None:
    total = sum(result.requests.values()) or 1
    print(f"### (b) Loopback: 3 edge servers (tiny packs, UNet widths {', '.join(f'{k} {v}' for k, v in LOOPBACK_WIDTHS.items())}), "
          f"a scheduler, {clients} client loops, {result.seconds:.0f} s\n")
    print("| edge | s per UNet iteration | mean batch | s per request-step | requests | share |")
    print("|---|---|---|---|---|---|")
    for name in LOOPBACK_WIDTHS:
        it, batch = result.iteration_s[name], result.mean_batch[name]
        print(f"| {name} | {it * 1000:.1f} ms | {batch:.2f} | {it / max(batch, 1.0) * 1000:.1f} ms | "
              f"{result.requests.get(name, 0)} | {result.requests.get(name, 0) / total:.0%} |")
    print(f"\nfailed or unplanned: {result.failed}; routing follows the measured speeds: {result.follows_speed}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multi_edge", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 2 minutes on 2 cores)")
    parser.add_argument("--no-loopback", action="store_true", help="the simulation only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    duration, tolerance = (60.0, 0.02) if args.quick else (300.0, 0.01)
    began = time.perf_counter()
    rows = simulation(duration=duration, tolerance=tolerance, seed=args.seed)
    print_simulation(rows, duration)
    print(f"(simulation: {time.perf_counter() - began:.0f} s of wall time)\n")
    problems = failures(rows)
    if not args.no_loopback:
        clients = 6
        result = loopback(seconds=15.0 if args.quick else 60.0, clients=clients)
        print_loopback(result, clients)
        if not result.follows_speed:
            problems.append("loopback: the fastest edge did not get more requests than the slowest")
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("OK: finish-time routing beats round robin and least queue with mixed edges and matches them with equal ones")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
