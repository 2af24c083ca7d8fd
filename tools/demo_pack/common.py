"""Shared training machinery: arguments, seeding, the --max-minutes deadline, logging,
resumable checkpoints (safetensors + json, no pickle), EMA and the on-device data banks.

Every stage writes under `OUT/runs/STAGE/`: `train_log.jsonl` (also echoed to stdout) and
`checkpoint/` (`params.safetensors`, `optimizer.safetensors`, `ema.safetensors`, `state.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tandem.demo.grammar import COLORS, POSITIONS, SHAPES, Scene
from tandem.demo.tokenizer import MAX_LENGTH
from tandem.demo.world import SceneArrays, render_arrays, sample_arrays
from tools.demo_pack.models import LATENT_CHANNELS, LATENT_SIZE, SCHEDULER_CONFIG

LossFn = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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


# ----------------------------------------------------------------------------- CUDA graphs
# These models are tiny, so an eager step is bound by kernel launches (measured on an H100:
# ~7 steps/s for the large UNet whatever the batch size). Replaying the forward and backward
# as CUDA graphs removes that overhead; every batch has the same shape, as graphs require.


class EpsModel(torch.nn.Module):
    """A UNet's noise prediction under autocast, as one module that can be captured."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.unet = unet
        self.device = device

    def forward(self, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.unet(xt, t, context).sample.float()


def eps_sample_args(batch: int, context_dim: int, device: torch.device,
                    context_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Example (x_t, t, context) inputs of EpsModel, for capturing it."""
    context = torch.zeros((batch, MAX_LENGTH, context_dim), device=device,
                          requires_grad=context_grad)
    return (torch.zeros((batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), device=device),
            torch.full((batch,), 500, device=device, dtype=torch.long), context)


def graphed_for_training(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...],
                         run: "Run") -> Callable:
    """`module` with forward and backward replayed as CUDA graphs (in train mode; eval mode
    runs eagerly); the module itself off CUDA, with --no-cuda-graphs, or if capture fails."""
    if run.device.type != "cuda" or not run.args.cuda_graphs:
        return module
    try:
        return torch.cuda.make_graphed_callables(module, sample_args, allow_unused_input=True)
    except Exception as exc:  # fall back rather than fail the run: eager is only slower
        run.log.event(event="cuda_graphs_failed", module=type(module).__name__,
                      error=repr(exc)[:500])
        return module


class CapturedInference:
    """A frozen model's forward captured once as a CUDA graph; each call copies the inputs into
    the captured buffers and replays. The output buffer is reused: use it before the next call."""

    def __init__(self, fn: Callable, sample_args: tuple[torch.Tensor, ...]) -> None:
        self.inputs = [a.detach().clone() for a in sample_args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up (cuDNN autotuning, lazy init) outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, args):
            buffer.copy_(value)
        self.graph.replay()
        return self.output


def captured_for_inference(fn: Callable, sample_args: tuple[torch.Tensor, ...],
                           run: "Run") -> Callable:
    """CapturedInference of `fn` on CUDA; `fn` itself elsewhere or if capture fails."""
    if run.device.type != "cuda" or not run.args.cuda_graphs:
        return fn
    try:
        return CapturedInference(fn, sample_args)
    except Exception as exc:
        run.log.event(event="cuda_graphs_failed", module=type(fn).__name__, error=repr(exc)[:500])
        return fn


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


# ----------------------------------------------------------------------------- EMA + checkpoints


class Ema:
    """Exponential moving average of named parameters, kept in fp32."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up: the average follows the weights closely early on.
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(
            list(self.shadow.values()), [p.detach().float() for p in self.params.values()],
            1.0 - decay,
        )

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for key, param in self.params.items():
            param.copy_(self.shadow[key])


class Trainer:
    """AdamW + warmup/cosine lr + grad clipping + optional EMA, resumable from `run_dir`."""

    def __init__(
        self, run: Run, params: dict[str, torch.nn.Parameter], *,
        ema_decay: float | None = None, weight_decay: float = 0.0,
    ) -> None:
        self.run = run
        self.args = run.args
        self.params = params
        self.optimizer = torch.optim.AdamW(
            list(params.values()), lr=self.args.lr, betas=(0.9, 0.99), weight_decay=weight_decay,
            fused=run.device.type == "cuda",
        )
        self.ema = Ema(params, ema_decay) if ema_decay else None
        self.step = 0
        self.ckpt_dir = run.run_dir / "checkpoint"
        if (self.ckpt_dir / "state.json").exists():
            self._load()
            run.log.event(event="resume", step=self.step)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 10% of the base rate."""
        if step < self.args.warmup:
            return self.args.lr * (step + 1) / self.args.warmup
        progress = (step - self.args.warmup) / max(1, self.args.steps - self.args.warmup)
        return self.args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))

    def train(self, loss_fn: LossFn) -> bool:
        """Steps until --steps or the deadline; checkpoints; True when all steps are done."""
        try:
            self._steps(loss_fn)
        finally:
            self.run.deadline.close()
        self.save()
        finished = self.step >= self.args.steps
        self.run.log.event(event="stop", step=self.step, finished=finished,
                           elapsed_s=round(self.run.deadline.elapsed_s(), 1))
        return finished

    def _steps(self, loss_fn: LossFn) -> None:
        last_ckpt = time.monotonic()
        lr = self.lr_at(self.step)
        while self.step < self.args.steps and not self.run.deadline.expired():
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, metrics = loss_fn(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.step)
            self.step += 1
            self.run.log.step(self.step, self.args.batch_size, lr,
                              {"loss": loss, **metrics, "grad_norm": grad_norm})
            if time.monotonic() - last_ckpt > self.args.ckpt_minutes * 60:
                self.save()
                last_ckpt = time.monotonic()
        self.run.log.flush(self.step, self.args.batch_size, lr)

    def use_ema_weights(self) -> None:
        """Before exporting: the averaged weights are the ones worth shipping."""
        if self.ema is not None:
            self.ema.copy_to_params()

    def save(self) -> None:
        # Written beside, then swapped in: a kill mid-save leaves the previous checkpoint intact.
        tmp = self.ckpt_dir.with_name("checkpoint.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_contiguous_cpu({k: p.detach() for k, p in self.params.items()}),
                  tmp / "params.safetensors")
        save_file(_optimizer_tensors(self.optimizer), tmp / "optimizer.safetensors")
        if self.ema is not None:
            save_file(_contiguous_cpu(self.ema.shadow), tmp / "ema.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "stage": self.run.stage}))
        old = self.ckpt_dir.with_name("checkpoint.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt_dir.exists():
            self.ckpt_dir.rename(old)
        tmp.rename(self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    @torch.no_grad()
    def _load(self) -> None:
        saved = load_file(self.ckpt_dir / "params.safetensors")
        _check_keys(saved, self.params, "params")
        for key, param in self.params.items():
            param.copy_(saved[key])
        _load_optimizer(self.optimizer, load_file(self.ckpt_dir / "optimizer.safetensors"))
        if self.ema is not None:
            shadow = load_file(self.ckpt_dir / "ema.safetensors")
            _check_keys(shadow, self.params, "ema")
            for key, value in self.ema.shadow.items():
                value.copy_(shadow[key])
        self.step = json.loads((self.ckpt_dir / "state.json").read_text())["step"]


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _check_keys(saved: dict[str, torch.Tensor], expected: dict[str, Any], what: str) -> None:
    if set(saved) != set(expected):
        raise RuntimeError(
            f"checkpoint {what} do not match this model (different --tiny or architecture?): "
            f"{len(set(saved) ^ set(expected))} keys differ"
        )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as a flat `state.INDEX.NAME` tensor dict."""
    state = optimizer.state_dict()["state"]
    return _contiguous_cpu(
        {f"state.{index}.{name}": value for index, entry in state.items()
         for name, value in entry.items()}
    )


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    # Hyperparameters come from this run's arguments; only the moments and step counts resume.
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def trainable(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}{k}": p for k, p in module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- data


@dataclass
class Bank:
    """Images rendered once per run, kept on the device; `scenes` as index arrays."""

    images: torch.Tensor  # uint8 [N, 64, 64, 3]
    scenes: SceneArrays

    def __len__(self) -> int:
        return len(self.images)


def render_bank(
    n: int, seed: int, style: str | None, device: torch.device, chunk: int = 1024
) -> Bank:
    """`n` generator images, rendered in parallel chunks (each seeded by its index, so the
    result does not depend on the number of threads)."""

    def render_chunk(i: int) -> tuple[np.ndarray, SceneArrays]:
        arrays = sample_arrays(min(chunk, n - i * chunk), np.random.default_rng([seed, i]), style)
        return render_arrays(arrays), arrays

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(render_chunk, range(math.ceil(n / chunk))))
    scenes = SceneArrays(**{
        f.name: np.concatenate([getattr(p[1], f.name) for p in parts]) for f in fields(SceneArrays)
    })
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(device)
    return Bank(images, scenes)


def to_model_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class PromptTable:
    """Token ids of every grammar prompt, looked up by scene indices on the device
    (tokenizing strings every step would dominate these tiny models' step time)."""

    def __init__(self, tokenizer: Any, device: torch.device) -> None:
        self.shape = (len(COLORS), len(SHAPES), len(POSITIONS), len(COLORS))
        prompts = []
        for c, s, p, b in np.ndindex(*self.shape):
            # Rows for colour == background are never looked up; any valid prompt fills them.
            bg = b if b != c else (c + 1) % len(COLORS)
            prompts.append(Scene(COLORS[c], SHAPES[s], POSITIONS[p], COLORS[bg]).prompt)
        self.ids = self._tokenize(tokenizer, prompts).to(device)
        self.empty = self._tokenize(tokenizer, [""]).to(device)[0]

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        # Exactly as StableDiffusionPipeline encodes prompts (padded to max length, no mask).
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def index(self, scenes: SceneArrays) -> torch.Tensor:
        """A flat prompt index per scene (int64, CPU); map with `.to(device)` once per bank."""
        flat = np.ravel_multi_index(
            (scenes.color, scenes.shape, scenes.position, scenes.background), self.shape)
        return torch.from_numpy(flat.astype(np.int64))

    def lookup(self, prompt_index: torch.Tensor, drop_prob: float,
               generator: torch.Generator) -> torch.Tensor:
        """Token ids [B, L]; each prompt replaced by "" with `drop_prob` (classifier-free
        guidance needs the unconditional prediction)."""
        ids = self.ids[prompt_index]
        drop = torch.rand(len(ids), device=ids.device, generator=generator) < drop_prob
        return torch.where(drop[:, None], self.empty[None, :], ids)


# ----------------------------------------------------------------------------- diffusion


class NoiseSchedule:
    """The training half of SCHEDULER_CONFIG: q(x_t | x_0) and timestep sampling."""

    def __init__(self, device: torch.device) -> None:
        cfg = SCHEDULER_CONFIG
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5,
                               cfg["num_train_timesteps"], dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
        self.num_timesteps = cfg["num_train_timesteps"]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def sample_timesteps(self, n: int, generator: torch.Generator, *, low_fraction: float = 0.0,
                         low_max: int = 700) -> torch.Tensor:
        """Uniform timesteps, a `low_fraction` of them drawn from [0, low_max) instead."""
        device = self.alphas_cumprod.device
        t = torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        low = torch.randint(0, low_max, (n,), device=device, generator=generator)
        pick_low = torch.rand(n, device=device, generator=generator) < low_fraction
        return torch.where(pick_low, low, t)


def sample_noise(x0: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise plus a small per-channel constant ("noise offset"), which lets the model
    move whole-image colour: plain backgrounds are all about it."""
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(
            (x0.shape[0], x0.shape[1], 1, 1), device=x0.device, generator=generator)
    return noise


def write_scheduler(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")


# ----------------------------------------------------------------------------- stage outputs


def load_vae(out: Path, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval().requires_grad_(False)
    return vae


def load_text(out: Path, device: torch.device):
    """The trained (frozen) text encoder and the tokenizer."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32)
    return encoder.to(device).eval().requires_grad_(False), tokenizer


@dataclass
class LatentBank:
    """A bank's images as scaled VAE latents, with each one's prompt: what the UNets train on."""

    latents: torch.Tensor  # fp32 [N, 4, 8, 8]
    prompt_index: torch.Tensor  # into `prompts`, [N]
    prompts: PromptTable

    def batch(self, n: int, drop_prob: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random (latent, token ids) pairs, prompts dropped to "" with `drop_prob`."""
        idx = torch.randint(0, len(self.latents), (n,), device=self.latents.device,
                            generator=generator)
        return self.latents[idx], self.prompts.lookup(self.prompt_index[idx], drop_prob, generator)

    def noised_batch(self, n: int, args: argparse.Namespace, schedule: "NoiseSchedule",
                     generator: torch.Generator, low_fraction: float = 0.0) -> "NoisedBatch":
        """A batch, its noise and timesteps per the denoising flags, and x_t."""
        x0, ids = self.batch(n, args.prompt_dropout, generator)
        noise = sample_noise(x0, generator, args.noise_offset)
        t = schedule.sample_timesteps(n, generator, low_fraction=low_fraction)
        return NoisedBatch(ids, noise, t, schedule.add_noise(x0, noise, t))


@dataclass
class NoisedBatch:
    ids: torch.Tensor  # prompt token ids
    noise: torch.Tensor  # the target of an eps-prediction model
    t: torch.Tensor
    xt: torch.Tensor


def latent_bank(run: Run, tokenizer: Any, style: str) -> LatentBank:
    """--bank-size generator images of `style`, encoded by the trained WORK/vae."""
    vae = load_vae(run.args.out, run.device)
    bank = render_bank(run.args.bank_size, run.args.seed, style, run.device)
    prompts = PromptTable(tokenizer, run.device)
    return LatentBank(encode_latents(vae, bank.images),
                      prompts.index(bank.scenes).to(run.device), prompts)


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Scaled latents (posterior means) of uint8 images, fp32 [N, 4, 8, 8] on their device."""
    scale = vae.config.scaling_factor
    chunks = [
        vae.encode(to_model_images(images[i:i + batch])).latent_dist.mean * scale
        for i in range(0, len(images), batch)
    ]
    return torch.cat(chunks).float()


def require(path: Path, what: str) -> None:
    if not path.exists():
        raise SystemExit(f"{path} is missing: train {what} first")
