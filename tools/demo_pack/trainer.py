"""The training loop: AdamW with warmup and cosine decay, gradient clipping, EMA, and resumable
checkpoints (safetensors + json, no pickle) under `OUT/runs/STAGE/checkpoint/`
(`params.safetensors`, `optimizer.safetensors`, `ema.safetensors`, `state.json`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tools.demo_pack.runs import Run

LossFn = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
