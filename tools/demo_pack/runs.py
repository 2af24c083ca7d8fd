"""What every training stage sets up first: its flags (and the defaults --tiny changes), the
device, seeding, bf16 autocast, the --max-minutes deadline and the log.

Every stage writes under `OUT/runs/STAGE/`: `train_log.jsonl` (also echoed to stdout) and, through
`tools.demo_pack.trainer`, `checkpoint/`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import time
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------- arguments


def add_common_args(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float
) -> None:
    """The flags every stage takes. Defaults are for the GPU run; --tiny shrinks everything."""
    parser.add_argument("--out", type=Path, required=True, help="work dir shared by all stages")
    parser.add_argument("--steps", type=int, default=None, help=f"total steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {batch_size}")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=None, help="lr warmup steps (default 2%%)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop, checkpoint and exit after this much wall-clock time")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None, help="default 100 (tiny: 1)")
    parser.add_argument("--ckpt-minutes", type=float, default=3.0,
                        help="also checkpoint this often, in case the run is killed")
    parser.add_argument("--bank-size", type=int, default=None,
                        help="images rendered once per run to train from (default 65536)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (smoke tests)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run the models eagerly on CUDA instead of replaying CUDA graphs")
    parser.set_defaults(_defaults={"steps": steps, "batch_size": batch_size})


def add_denoising_args(
    parser: argparse.ArgumentParser, *, low_fraction: float | None = None, ema: bool = True
) -> None:
    """The flags of the stages that train a UNet to predict noise."""
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--noise-offset", type=float, default=0.05)
    if low_fraction is not None:
        parser.add_argument("--low-fraction", type=float, default=low_fraction,
                            help="share of timesteps drawn from t < 700")
    if ema:
        parser.add_argument("--ema-decay", type=float, default=0.999)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on --tiny."""
    defaults = args._defaults
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else defaults["steps"])
    if args.batch_size is None:
        args.batch_size = 4 if args.tiny else defaults["batch_size"]
    if args.warmup is None:
        args.warmup = 0 if args.tiny else max(1, args.steps // 50)
    if args.log_every is None:
        args.log_every = 1 if args.tiny else 100
    if args.bank_size is None:
        args.bank_size = 64 if args.tiny else 65536
    args.out = Path(args.out)
    del args._defaults
    return args


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        # Fast matmuls/convs: these small models are launch- and bandwidth-bound.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere. No weight-cast cache: CUDA graphs need that."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


# ----------------------------------------------------------------------------- run control


class Deadline:
    """--max-minutes from the stage's start, minus a reserve for saving; SIGTERM ends it early."""

    def __init__(self, max_minutes: float | None, reserve_s: float = 20.0) -> None:
        self.start = time.monotonic()
        self.limit_s = math.inf if max_minutes is None else max(0.0, max_minutes * 60 - reserve_s)
        self.terminated = False
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (e.g. some test runners): no signal handling
            self._previous_handler = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminated = True

    def close(self) -> None:
        """Gives SIGTERM its previous meaning again (training is over)."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.terminated or self.elapsed_s() >= self.limit_s


class TrainLog:
    """Loss and throughput every N steps, to stdout and `train_log.jsonl`."""

    def __init__(self, path: Path, log_every: int, stage: str, total_steps: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.log_every = log_every
        self.stage = stage
        self.total_steps = total_steps
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._since = time.monotonic()

    def event(self, **fields_: Any) -> None:
        record = {"stage": self.stage, "time": round(time.time(), 3), **fields_}
        line = json.dumps(record)
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")

    def step(self, step: int, batch_size: int, lr: float, metrics: dict[str, torch.Tensor]) -> None:
        # Metrics stay on the device until logged, so logging does not sync every step.
        for key, value in metrics.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1
        if step % self.log_every == 0:
            self.flush(step, batch_size, lr)

    def flush(self, step: int, batch_size: int, lr: float) -> None:
        if not self._count:
            return
        elapsed = max(time.monotonic() - self._since, 1e-9)
        averages = {k: round(v.item() / self._count, 6) for k, v in self._sums.items()}
        steps_per_s = self._count / elapsed
        self.event(step=step, lr=lr, **averages, steps_per_s=round(steps_per_s, 2),
                   samples_per_s=round(steps_per_s * batch_size, 1),
                   progress=round(step / self.total_steps, 4),
                   eta_min=round((self.total_steps - step) / steps_per_s / 60, 1))
        self._sums, self._count, self._since = {}, 0, time.monotonic()


@dataclass
class Run:
    """What a stage's main() sets up first: its args, device, deadline, log and run dir."""

    args: argparse.Namespace
    stage: str
    device: torch.device = field(init=False)
    deadline: Deadline = field(init=False)
    run_dir: Path = field(init=False)
    log: TrainLog = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = Deadline(self.args.max_minutes)
        self.device = resolve_device(self.args.device)
        seed_everything(self.args.seed)
        self.run_dir = self.args.out / "runs" / self.stage
        self.log = TrainLog(self.run_dir / "train_log.jsonl", self.args.log_every, self.stage,
                            self.args.steps)
        self.log.event(event="start", device=str(self.device), steps=self.args.steps,
                       batch_size=self.args.batch_size, tiny=self.args.tiny)

    def generator(self, step: int) -> torch.Generator:
        """The run's random stream, seeded by the step it starts from (resumes stay seeded)."""
        return torch.Generator(self.device).manual_seed(self.args.seed * 1_000_003 + step)
