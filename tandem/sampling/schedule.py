"""Per-request sampling schedules: the timesteps and the per-step coefficients of one sampler.

The timesteps and sigmas come from diffusers' own samplers (so any real pack's sampler config,
SD 1.5's included, gives exactly what diffusers would run); we only precompute each step's scalar
coefficients, so that one vectorized update serves a batch of requests at different steps.
A Schedule is plain data: it travels inside the handoff and is JSON-serializable.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.sampling.names import SAMPLERS

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# Keys of a sampler config that define the noise process itself; two packs whose configs agree on
# these share a latent trajectory, whatever sampler class each pack's config names.
NOISE_PROCESS_KEYS: tuple[str, ...] = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


class ScheduleError(ValueError):
    """A sampler or sampler config Tandem cannot run exactly."""


@dataclass(frozen=True)
class Schedule:
    """Everything a sampler needs for one request, step by step.

    `coeffs[name][j]` is a scalar used at step j (0 ≤ j < steps). `signal[j]`/`noise[j]` describe
    the latent *before* step j (j = steps: the final latent) as signal·x0 + noise·ε, which the
    codec uses to treat the clean and noisy parts of a mid-trajectory latent separately.
    """

    sampler: str
    prediction_type: str
    timesteps: tuple[float, ...]
    init_noise_sigma: float
    input_divisor: tuple[float, ...]
    signal: tuple[float, ...]
    noise: tuple[float, ...]
    coeffs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    clip_sample_range: float | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def digest(self) -> str:
        """SHA-256 (hex) of every value: a handoff carries it instead of the arrays, and the
        device checks it against the schedule it computes for its own request."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "prediction_type": self.prediction_type,
            "timesteps": list(self.timesteps),
            "init_noise_sigma": self.init_noise_sigma,
            "input_divisor": list(self.input_divisor),
            "signal": list(self.signal),
            "noise": list(self.noise),
            "coeffs": {k: list(v) for k, v in self.coeffs.items()},
            "clip_sample_range": self.clip_sample_range,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        try:
            schedule = cls(
                sampler=str(data["sampler"]),
                prediction_type=str(data["prediction_type"]),
                timesteps=tuple(float(t) for t in data["timesteps"]),
                init_noise_sigma=float(data["init_noise_sigma"]),
                input_divisor=tuple(float(x) for x in data["input_divisor"]),
                signal=tuple(float(x) for x in data["signal"]),
                noise=tuple(float(x) for x in data["noise"]),
                coeffs={str(k): tuple(float(x) for x in v) for k, v in data["coeffs"].items()},
                clip_sample_range=(
                    None if data.get("clip_sample_range") is None else float(data["clip_sample_range"])
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ScheduleError(f"malformed schedule: {exc!r}") from exc
        schedule.validate()
        return schedule

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ScheduleError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ScheduleError(f"unsupported prediction_type {self.prediction_type!r}")
        n = self.steps
        if n < 1:
            raise ScheduleError("a schedule needs at least one step")
        if len(self.input_divisor) != n or len(self.signal) != n + 1 or len(self.noise) != n + 1:
            raise ScheduleError("schedule arrays disagree with the number of steps")
        for name in _COEFF_NAMES[self.sampler]:
            if len(self.coeffs.get(name, ())) != n:
                raise ScheduleError(f"schedule lacks coefficient {name!r} for {n} steps")
        every = [*self.timesteps, *self.input_divisor, *self.signal, *self.noise]
        every += [x for v in self.coeffs.values() for x in v]
        if not all(math.isfinite(x) for x in every):
            raise ScheduleError("schedule holds a non-finite value")


_COEFF_NAMES: dict[str, tuple[str, ...]] = {
    "ddim": ("alpha", "alpha_prev"),
    "euler": ("sigma", "sigma_next"),
    "dpmpp_2m": ("alpha_s", "sigma_s", "ratio", "phi", "order", "inv_r0"),
}


def noise_process(sampler_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a sampler config that defines the diffusion process (for pack compatibility)."""
    defaults = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
    }
    return {key: sampler_config.get(key, defaults[key]) for key in NOISE_PROCESS_KEYS}


def _diffusers_sampler(sampler: str, sampler_config: dict[str, Any]):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    config = {k: v for k, v in sampler_config.items() if not k.startswith("_")}
    if config.get("thresholding"):
        raise ScheduleError("sampler configs with thresholding=true are not supported")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ScheduleError(f"unsupported prediction_type {config.get('prediction_type')!r}")
    if sampler == "ddim":
        return DDIMScheduler.from_config(config)
    if sampler == "euler":
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            config.pop(key, None)
        return EulerDiscreteScheduler.from_config(config, timestep_type="discrete", final_sigmas_type="zero")
    if sampler == "dpmpp_2m":
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            config.pop(key, None)
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            variance_type=None,
        )
    raise ScheduleError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def make_schedule(sampler: str, steps: int, sampler_config: dict[str, Any]) -> Schedule:
    """The schedule diffusers' `sampler` would run for `steps` steps under `sampler_config`."""
    if sampler not in SAMPLERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")
    scheduler = _diffusers_sampler(sampler, sampler_config)
    scheduler.set_timesteps(steps)
    builder = {"ddim": _ddim, "euler": _euler, "dpmpp_2m": _dpmpp_2m}[sampler]
    schedule = builder(scheduler, steps)
    schedule.validate()
    return schedule


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _ddim(scheduler, steps: int) -> Schedule:
    # Same float32 tensor arithmetic as DDIMScheduler.step, precomputed per step.
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    alpha, alpha_prev = [], []
    for t in scheduler.timesteps.tolist():
        prev = t - ratio
        alpha.append(alphas[t])
        alpha_prev.append(alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod)
    before = [*alpha, alpha_prev[-1]]
    clip = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
    return Schedule(
        sampler="ddim",
        prediction_type=scheduler.config.prediction_type,
        timesteps=_floats(scheduler.timesteps),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        input_divisor=(1.0,) * steps,
        signal=_floats(a**0.5 for a in before),
        noise=_floats((1 - a) ** 0.5 for a in before),
        coeffs={"alpha": _floats(alpha), "alpha_prev": _floats(alpha_prev)},
        clip_sample_range=clip,
    )


def _euler(scheduler, steps: int) -> Schedule:
    sigmas = scheduler.sigmas  # float32, length steps + 1, last 0
    return Schedule(
        sampler="euler",
        prediction_type=scheduler.config.prediction_type,
        timesteps=_floats(scheduler.timesteps),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        input_divisor=_floats((s**2 + 1) ** 0.5 for s in sigmas[:-1]),
        # Euler works on x0 + σ·ε (not variance preserving).
        signal=(1.0,) * (steps + 1),
        noise=_floats(sigmas),
        coeffs={"sigma": _floats(sigmas[:-1]), "sigma_next": _floats(sigmas[1:])},
    )


def _dpmpp_2m(scheduler, steps: int) -> Schedule:
    sigmas = scheduler.sigmas  # float32, length steps + 1
    alpha_t = 1 / ((sigmas**2 + 1) ** 0.5)
    sigma_t = sigmas * alpha_t
    lambdas = torch.log(alpha_t) - torch.log(sigma_t)
    config = scheduler.config
    ratio, phi, order, inv_r0 = [], [], [], []
    for j in range(steps):
        h = lambdas[j + 1] - lambdas[j]
        ratio.append(sigma_t[j + 1] / sigma_t[j])
        phi.append(alpha_t[j + 1] * (torch.exp(-h) - 1.0))
        # DPMSolverMultistepScheduler.step's order rule, for solver_order=2.
        lower_order_final = j == steps - 1 and (
            config.euler_at_final
            or (config.lower_order_final and steps < 15)
            or config.final_sigmas_type == "zero"
        )
        second = j >= 1 and not lower_order_final
        order.append(2.0 if second else 1.0)
        inv_r0.append(1.0 / ((lambdas[j] - lambdas[j - 1]) / h) if second else 0.0)
    return Schedule(
        sampler="dpmpp_2m",
        prediction_type=config.prediction_type,
        timesteps=_floats(scheduler.timesteps),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        input_divisor=(1.0,) * steps,
        signal=_floats(alpha_t),
        noise=_floats(sigma_t),
        coeffs={
            "alpha_s": _floats(alpha_t[:-1]),
            "sigma_s": _floats(sigma_t[:-1]),
            "ratio": _floats(ratio),
            "phi": _floats(phi),
            "order": _floats(order),
            "inv_r0": _floats(inv_r0),
        },
    )
