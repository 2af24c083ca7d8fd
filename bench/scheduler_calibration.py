"""Scheduler: predicted vs measured end-to-end latency, live over loopback.

    .venv/bin/python -m bench.scheduler_calibration [--generations 30] [--window 10]
        [--cost-profile services/scheduler/profiles/demo_cpu.json] [--device-class cpu-demo]

Starts the scheduler (with the measured cost profile) and an edge server on the demo pack that
heartbeats to it, then runs generations one after the other through `tandem generate --scheduler
... --device-class ... --json` in this process (the CLI is the device: small pack, late steps,
decode). Each generation's plan carries the predicted seconds and the CLI's breakdown the measured
ones; the CLI reports them, so the scheduler recalibrates after every image. Latency budgets taken
in turn make the planner pick different splits, so every phase is exercised. Prints, per window of
generations, the median and p90 of |predicted − measured| / measured of the end-to-end latency and
of each phase, and the scheduler's calibrated cost model after the window.

All processes use one torch thread: on two cores shared with other jobs, two OpenMP threads per
process make a UNet step up to ~70× slower and the timings meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads, here and in the services
ROOT = Path(__file__).resolve().parent.parent

from services.common.launcher import edge_server, metric_value, scheduler_service, wait_metric  # noqa: E402
from services.scheduler.live.core import Measured, measured_phases  # noqa: E402
from tandem.phases import COARSE_PHASES  # noqa: E402
from tandem.stats import percentile  # noqa: E402

PROMPTS = [f"a {c} {s} at the {p} on a {b} background" for c, s, p, b in [
    ("red", "circle", "left", "blue"), ("green", "square", "top", "black"), ("yellow", "triangle", "right", "white"),
    ("blue", "circle", "bottom", "gray"), ("white", "square", "center", "red")]]
CALIBRATION = ("tandem_scheduler_edge_step_seconds", "tandem_scheduler_device_step_seconds",
               "tandem_scheduler_device_decode_seconds", "tandem_scheduler_rtt_seconds")


@dataclass(frozen=True)
class Generation:
    index: int
    steps: int
    split: int
    merge_ratio: float
    predicted: dict[str, float]
    measured: dict[str, float]
    fallback: bool

    def relative_error(self, phase: str) -> float | None:
        meas = self.measured[phase]
        return abs(self.predicted[phase] - meas) / meas if meas > 0 else None


def measured(report: dict) -> dict[str, float]:
    """The CLI's timers as the scheduler's phases, split as the scheduler splits them."""
    s = report["seconds"]
    timers = Measured(queue=s.get("queue", 0.0), edge_steps=s.get("edge_steps", 0.0),
                      transfer=s.get("transfer", 0.0), device_steps=s.get("device_steps", 0.0),
                      decode=s.get("decode", 0.0))
    predicted, split = report["plan"]["predicted_seconds"], report["edge_steps"]
    return measured_phases(timers, split, predicted["edge"] / split if split else 0.0)


def generate(index: int, scheduler: str, args: argparse.Namespace, out_dir: Path) -> Generation:
    from services.cli.generate import main as cli

    argv = ["generate", PROMPTS[index % len(PROMPTS)], "--seed", str(index), "--out", str(out_dir / f"{index}.png"),
            "--large", str(args.large), "--small", str(args.small), "--device", "cpu", "--scheduler", scheduler,
            "--device-class", args.device_class, "--link-mbps", str(args.link_mbps), "--json", "--quiet",
            "--latency-budget", str(args.budgets[index % len(args.budgets)])]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"scheduler_calibration: error: tandem generate exited with {code}")
    report = json.loads(stdout.getvalue())
    if report["plan"] is None:
        raise SystemExit("scheduler_calibration: error: the CLI got no plan from the scheduler")
    return Generation(index, report["total_steps"], report["split"], report["codec"]["merge_ratio"],
                      report["plan"]["predicted_seconds"], measured(report), bool(report["fallback"]))


def warm_up(index: int, edge: str, args: argparse.Namespace, out_dir: Path) -> None:
    from services.cli.generate import main as cli

    argv = ["generate", PROMPTS[0], "--out", str(out_dir / f"warm{index}.png"), "--small", str(args.small),
            "--device", "cpu", "--edge", edge, "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        if cli(argv) != 0:
            raise SystemExit("scheduler_calibration: error: the warm-up generation failed")


def calibration_state(metrics: str, device_class: str) -> str:
    a = metric_value(metrics, CALIBRATION[0], 'term="fixed"')
    b = metric_value(metrics, CALIBRATION[0], 'term="per_request"')
    step = metric_value(metrics, CALIBRATION[1], f'device_class="{device_class}"')
    decode = metric_value(metrics, CALIBRATION[2], f'device_class="{device_class}"')
    rtt = metric_value(metrics, CALIBRATION[3])
    return (f"edge {a * 1000:.1f} + {b * 1000:.1f}·n ms/step, {device_class} step {step * 1000:.1f} ms, "
            f"decode {decode * 1000:.1f} ms, rtt {rtt * 1000:.1f} ms")


def summarize(label: str, gens: list[Generation]) -> str:
    rows = [f"{label}: {len(gens)} generations, plans {sorted({(g.steps, g.split, g.merge_ratio) for g in gens})}"]
    for phase in COARSE_PHASES:
        errors = [e for g in gens if not g.fallback and (e := g.relative_error(phase)) is not None]
        if errors:
            pred = statistics.median(g.predicted[phase] for g in gens)
            meas = statistics.median(g.measured[phase] for g in gens)
            rows.append(f"  {phase:<8} |pred-meas|/meas median {statistics.median(errors):6.1%}  p90 "
                        f"{percentile(errors, 90):6.1%}   (median predicted {pred:.3f} s, measured {meas:.3f} s)")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, default=ROOT / "tandem/demo_pack/large")
    parser.add_argument("--small", type=Path, default=ROOT / "tandem/demo_pack/small")
    parser.add_argument("--cost-profile", type=Path, default=ROOT / "services/scheduler/profiles/demo_cpu.json")
    parser.add_argument("--device-class", default="cpu-demo", help="the profiled class (cpu-demo)")
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1,
                        help="generations straight to the edge first, not reported or counted: a fresh edge "
                             "process's first UNet calls are several times slower (1)")
    parser.add_argument("--window", type=int, default=10, help="generations per summary window (10)")
    parser.add_argument("--link-mbps", type=float, default=100.0, help="the CLI's downlink estimate (100)")
    parser.add_argument("--budgets", type=lambda t: [float(v) for v in t.split(",")], default=[0.0, 0.5, 0.55],
                        help="latency budgets in turn, 0 = none (0,0.5,0.55: with the demo CPU profile and the "
                             "default policy the planner then picks T=10 with k = 8, 5, 3 and 0)")
    args = parser.parse_args()
    if args.generations < 1 or args.window < 1 or args.warmup < 0:
        parser.error("--generations and --window must be >= 1, --warmup >= 0")
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPU cores, load average {load:.2f} at start (other jobs share this machine); "
          f"torch threads 1 per process; {args.warmup} warm-up + {args.generations} generations one at a time", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        with scheduler_service(tmp_path, "--cost-profile", str(args.cost_profile), "--edge-ttl", "30") as sched, \
                edge_server(args.large, tmp_path, "--scheduler", sched.address) as edge:
            try:
                wait_metric(sched, "tandem_scheduler_edges_live", 1, 60, "the edge never heartbeated to the scheduler")
            except AssertionError as exc:
                raise SystemExit(f"scheduler_calibration: error: {exc}") from None
            print(f"profile {args.cost_profile.relative_to(ROOT)}: {calibration_state(sched.metrics(), args.device_class)}")
            for i in range(args.warmup):  # straight to the edge: warms both processes, reports nothing
                warm_up(i, edge.address, args, tmp_path)
            gens: list[Generation] = []
            for i in range(args.generations):
                g = generate(i, sched.address, args, tmp_path)
                gens.append(g)
                print(f"{i:>3} T={g.steps:<2} k={g.split:<2} r={g.merge_ratio:<4g} predicted {g.predicted['total']:.3f} s"
                      f"  measured {g.measured['total']:.3f} s  ({g.relative_error('total'):.1%})"
                      + ("  FALLBACK" if g.fallback else ""), file=sys.stderr, flush=True)
                if (i + 1) % args.window == 0 or i + 1 == args.generations:
                    start = i + 1 - ((i % args.window) + 1)
                    print(summarize(f"generations {start + 1}-{i + 1}", gens[start:]), flush=True)
                    print(f"  calibrated after {i + 1}: {calibration_state(sched.metrics(), args.device_class)}", flush=True)
            print(f"# load average {os.getloadavg()[0]:.2f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
