"""Our vectorized samplers against diffusers' own, and schedule (de)serialization."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from tandem.sampling.denoise import DenoiseState, Guidance, advance, initial_latent
from tandem.sampling.schedule import Schedule, ScheduleError, make_schedule
from tandem.tiny_pack import SD_SAMPLER_CONFIG

REFERENCE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


class FakeUNet:
    """A deterministic, nonlinear stand-in for a UNet: depends on sample, timestep and context."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False):
        t = timestep.view(-1, 1, 1, 1).float()
        context = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (torch.sin(sample * 1.3 + t / 300.0) * 0.8 + context,)


def reference_run(sampler: str, steps: int, config: dict, latent: torch.Tensor, guidance: Guidance) -> torch.Tensor:
    """The same request through diffusers' sampler loop, as a pipeline would run it."""
    scheduler = REFERENCE[sampler].from_config(config)
    scheduler.set_timesteps(steps)
    x = latent[None].clone()
    unet = FakeUNet()
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(model_in, torch.full((2,), float(t)), torch.stack([guidance.cond, guidance.uncond]))[0]
        eps = out[1:] + guidance.scale * (out[:1] - out[1:])
        x = scheduler.step(eps, t, x).prev_sample
    return x[0]


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_matches_diffusers(sampler, spacing, prediction, steps):
    config = dict(SD_SAMPLER_CONFIG, timestep_spacing=spacing, prediction_type=prediction)
    schedule = make_schedule(sampler, steps, config)
    guidance = Guidance(torch.full((5, 6), 0.1), torch.zeros(5, 6), 3.0)
    latent = initial_latent(3, (4, 8, 8), schedule)
    state = DenoiseState(schedule, 0, latent.clone(), guidance)
    while not state.done:
        advance(FakeUNet(), [state])
    expected = reference_run(sampler, steps, config, latent, guidance)
    assert (state.latent - expected).abs().max().item() <= 1e-5


def test_ddim_clip_sample_matches_diffusers():
    config = dict(SD_SAMPLER_CONFIG, clip_sample=True, clip_sample_range=0.5)
    schedule = make_schedule("ddim", 10, config)
    assert schedule.clip_sample_range == 0.5
    guidance = Guidance(torch.full((5, 6), 0.4), torch.zeros(5, 6), 5.0)
    latent = initial_latent(1, (4, 8, 8), schedule)
    state = DenoiseState(schedule, 0, latent.clone(), guidance)
    while not state.done:
        advance(FakeUNet(), [state])
    assert (state.latent - reference_run("ddim", 10, config, latent, guidance)).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_schedule_round_trips_through_dict(sampler):
    schedule = make_schedule(sampler, 13, SD_SAMPLER_CONFIG)
    assert Schedule.from_dict(schedule.to_dict()) == schedule


def test_bad_samplers_and_schedules_are_refused():
    with pytest.raises(ScheduleError, match="unknown sampler 'heun'"):
        make_schedule("heun", 10, SD_SAMPLER_CONFIG)
    with pytest.raises(ScheduleError, match="at least 1"):
        make_schedule("ddim", 0, SD_SAMPLER_CONFIG)
    with pytest.raises(ScheduleError, match="thresholding"):
        make_schedule("ddim", 5, dict(SD_SAMPLER_CONFIG, thresholding=True))
    data = make_schedule("ddim", 4, SD_SAMPLER_CONFIG).to_dict()
    data["coeffs"]["alpha"] = data["coeffs"]["alpha"][:2]
    with pytest.raises(ScheduleError, match="lacks coefficient 'alpha'"):
        Schedule.from_dict(data)
    data = make_schedule("euler", 4, SD_SAMPLER_CONFIG).to_dict()
    data["timesteps"][1] = float("nan")
    with pytest.raises(ScheduleError, match="non-finite"):
        Schedule.from_dict(data)
    with pytest.raises(ScheduleError, match="malformed"):
        Schedule.from_dict({"sampler": "ddim"})


def test_dpm_second_order_step_without_history_is_refused():
    schedule = make_schedule("dpmpp_2m", 6, SD_SAMPLER_CONFIG)
    guidance = Guidance(torch.zeros(5, 6), None, 1.0)
    state = DenoiseState(schedule, 2, torch.zeros(4, 8, 8), guidance)  # step 2 is second order
    with pytest.raises(ValueError, match="without the previous prediction"):
        advance(FakeUNet(), [state])
