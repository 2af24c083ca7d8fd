"""Vectorized sampler steps: one call advances a batch of requests, each at its own step.

Each function takes per-sample coefficient vectors (shape [B], gathered from each request's
Schedule at that request's step) and mirrors diffusers' arithmetic for the same sampler, so a
request gives the same trajectory alone, batched with others, or split across two processes.
All three samplers are deterministic (no fresh noise after the initial latent), so resuming needs
only the latent and, for DPM-Solver++(2M), the previous denoised prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.sampling.schedule import Schedule


@dataclass
class StepResult:
    latent: torch.Tensor  # the latent after the step, [B, C, H, W]
    denoised: torch.Tensor  # the step's prediction of the clean latent x0, [B, C, H, W]


def gather(schedules: list[Schedule], indices: list[int], name: str, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient `name` at each sample's step, shaped to broadcast over [B, C, H, W]."""
    values = [s.coeffs[name][j] for s, j in zip(schedules, indices)]
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)


def model_inputs(schedules: list[Schedule], indices: list[int], latents: torch.Tensor) -> torch.Tensor:
    """The UNet's input for each sample (Euler divides by sqrt(σ²+1); the others pass through)."""
    divisor = [s.input_divisor[j] for s, j in zip(schedules, indices)]
    if all(x == 1.0 for x in divisor):
        return latents
    return latents / _column(divisor, latents)


def unet_timesteps(schedules: list[Schedule], indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([s.timesteps[j] for s, j in zip(schedules, indices)], dtype=torch.float32, device=device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)


def ddim_step(
    schedules: list[Schedule], indices: list[int], latent: torch.Tensor, model_output: torch.Tensor
) -> StepResult:
    """DDIM with eta = 0 (DDIMScheduler.step)."""
    alpha = gather(schedules, indices, "alpha", latent)
    alpha_prev = gather(schedules, indices, "alpha_prev", latent)
    beta = 1 - alpha
    if schedules[0].prediction_type == "epsilon":
        denoised = (latent - beta**0.5 * model_output) / alpha**0.5
        eps = model_output
    else:  # v_prediction
        denoised = alpha**0.5 * latent - beta**0.5 * model_output
        eps = alpha**0.5 * model_output + beta**0.5 * latent
    clip = schedules[0].clip_sample_range
    if clip is not None:
        denoised = denoised.clamp(-clip, clip)
    direction = (1 - alpha_prev) ** 0.5 * eps
    return StepResult(alpha_prev**0.5 * denoised + direction, denoised)


def euler_step(
    schedules: list[Schedule], indices: list[int], latent: torch.Tensor, model_output: torch.Tensor
) -> StepResult:
    """Euler on the probability-flow ODE, no churn (EulerDiscreteScheduler.step)."""
    sigma = gather(schedules, indices, "sigma", latent)
    sigma_next = gather(schedules, indices, "sigma_next", latent)
    if schedules[0].prediction_type == "epsilon":
        denoised = latent - sigma * model_output
    else:  # v_prediction
        denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (latent / (sigma**2 + 1))
    derivative = (latent - denoised) / sigma
    return StepResult(latent + derivative * (sigma_next - sigma), denoised)


def dpmpp_2m_step(
    schedules: list[Schedule],
    indices: list[int],
    latent: torch.Tensor,
    model_output: torch.Tensor,
    prev_denoised: torch.Tensor,
) -> StepResult:
    """DPM-Solver++(2M), midpoint (DPMSolverMultistepScheduler.step, solver_order=2).

    `prev_denoised` holds the previous step's x0 prediction for samples at a second-order step
    (anything, e.g. zeros, for samples at a first-order step).
    """
    alpha_s = gather(schedules, indices, "alpha_s", latent)
    sigma_s = gather(schedules, indices, "sigma_s", latent)
    ratio = gather(schedules, indices, "ratio", latent)
    phi = gather(schedules, indices, "phi", latent)
    second = gather(schedules, indices, "order", latent) == 2.0
    inv_r0 = gather(schedules, indices, "inv_r0", latent)
    if schedules[0].prediction_type == "epsilon":
        denoised = (latent - sigma_s * model_output) / alpha_s
    else:  # v_prediction
        denoised = alpha_s * latent - sigma_s * model_output
    first_order = ratio * latent - phi * denoised
    d1 = inv_r0 * (denoised - prev_denoised)
    second_order = ratio * latent - phi * denoised - 0.5 * phi * d1
    return StepResult(torch.where(second, second_order, first_order), denoised)
