"""Iteration-level batching: one UNet call advances many requests, each at its own step.

A DenoiseState is one request's position on its trajectory. `advance` stacks every state's
model input (classifier-free guidance adds an unconditional row), runs the UNet once with
per-sample timesteps, and applies each sampler's vectorized step to its group. Per-sample
timesteps and per-request noise mean a request's result does not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tandem.sampling import samplers
from tandem.sampling.schedule import Schedule


class NoisePredictor(Protocol):
    """What `advance` needs of a UNet: diffusers' UNet2DConditionModel satisfies it."""

    dtype: torch.dtype
    device: torch.device

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict: bool = ...): ...


@dataclass
class Guidance:
    """A request's text conditioning: prompt embedding, negative embedding, guidance scale."""

    cond: torch.Tensor  # [L, D]
    uncond: torch.Tensor | None  # [L, D]; None when scale == 1 (no guidance pass)
    scale: float

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.scale != 1.0


@dataclass
class DenoiseState:
    """One request mid-trajectory: `latent` is the latent before step `step`."""

    schedule: Schedule
    step: int
    latent: torch.Tensor  # [C, H, W], float32
    guidance: Guidance
    prev_denoised: torch.Tensor | None = None  # x0 prediction of step - 1 (DPM-Solver++ history)

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps


def initial_latent(seed: int, shape: tuple[int, int, int], schedule: Schedule) -> torch.Tensor:
    """The request's starting noise, drawn on the CPU so every device starts from the same one."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, dtype=torch.float32)[0] * schedule.init_noise_sigma


def placement(unet: NoisePredictor, inputs_on: torch.device) -> tuple[torch.device, torch.dtype]:
    """The UNet's device and dtype. Read from its first parameter: diffusers' `.device` and
    `.dtype` walk every submodule looking for offload hooks (~12 ms each for a small UNet on a
    CPU, as long as the UNet call itself). A UNet offloaded by accelerate keeps its weights on
    "meta" between calls and each layer's hook brings them to the inputs: `inputs_on` then."""
    if isinstance(unet, torch.nn.Module):
        first = next(unet.parameters(), None)
        if first is not None:
            return (inputs_on if first.device.type == "meta" else first.device), first.dtype
    return unet.device, unet.dtype


def predict_noise(
    unet: NoisePredictor, inputs: torch.Tensor, timesteps: torch.Tensor, guidances: list[Guidance]
) -> torch.Tensor:
    """The guided model output for each sample, from one batched UNet call."""
    guided = [i for i, g in enumerate(guidances) if g.guided]
    rows = torch.cat([inputs, inputs[guided]]) if guided else inputs
    steps = torch.cat([timesteps, timesteps[guided]]) if guided else timesteps
    context = [g.cond for g in guidances] + [g.uncond for i in guided if (g := guidances[i]).uncond is not None]
    device, dtype = placement(unet, inputs.device)
    hidden = torch.stack(context).to(device=device, dtype=dtype)
    out = unet(rows.to(device=device, dtype=dtype), steps.to(device), hidden, return_dict=False)[0]
    out = out.float()
    cond = out[: len(guidances)]
    if not guided:
        return cond
    uncond = out[len(guidances) :]
    scales = torch.tensor([guidances[i].scale for i in guided], device=out.device).view(-1, 1, 1, 1)
    guided_out = cond.clone()
    guided_out[guided] = uncond + scales * (cond[guided] - uncond)
    return guided_out


@torch.no_grad()
def advance(unet: NoisePredictor, states: list[DenoiseState]) -> None:
    """Runs one denoising step for every state (all must be unfinished), in place."""
    if not states:
        return
    if any(s.done for s in states):
        raise ValueError("advance() got a finished request")
    device, _ = placement(unet, states[0].latent.device)
    schedules = [s.schedule for s in states]
    indices = [s.step for s in states]
    latents = torch.stack([s.latent for s in states]).to(device)
    inputs = samplers.model_inputs(schedules, indices, latents)
    timesteps = samplers.unet_timesteps(schedules, indices, device)
    output = predict_noise(unet, inputs, timesteps, [s.guidance for s in states])
    for group in _groups(states):
        _step_group([states[i] for i in group], latents[group], output[group])


def _groups(states: list[DenoiseState]) -> list[list[int]]:
    """Indices of states that one vectorized sampler step can serve together."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(states):
        key = (s.schedule.sampler, s.schedule.prediction_type, s.schedule.clip_sample_range)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _step_group(states: list[DenoiseState], latents: torch.Tensor, output: torch.Tensor) -> None:
    schedules = [s.schedule for s in states]
    indices = [s.step for s in states]
    sampler = schedules[0].sampler
    if sampler == "ddim":
        result = samplers.ddim_step(schedules, indices, latents, output)
    elif sampler == "euler":
        result = samplers.euler_step(schedules, indices, latents, output)
    else:
        prev = torch.stack(
            [s.prev_denoised if s.prev_denoised is not None else torch.zeros_like(s.latent) for s in states]
        ).to(latents.device)
        missing = [s.step for s in states if s.prev_denoised is None and s.schedule.coeffs["order"][s.step] == 2.0]
        if missing:
            raise ValueError(f"DPM-Solver++ second-order step {missing[0]} without the previous prediction")
        result = samplers.dpmpp_2m_step(schedules, indices, latents, output, prev)
    for i, state in enumerate(states):
        state.latent = result.latent[i]
        state.prev_denoised = result.denoised[i]
        state.step += 1
