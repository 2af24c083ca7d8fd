"""Invariant 1: a split run with a lossless codec equals the single-process run, for every k."""

from __future__ import annotations

import pytest
import torch

from tandem.handoff import CodecSpec, decode_handoff, encode_handoff
from tandem.pipeline import HybridPipeline, decode, make_handoff, resume, run_steps, start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import advance

STEPS = 6
LOSSLESS = CodecSpec(encoding="fp32")


def request(sampler: str, split: int, **kw) -> GenerationRequest:
    base = dict(
        prompt="a red circle at the left on a blue background",
        steps=STEPS,
        split=split,
        sampler=sampler,
        guidance_scale=3.0,
        seed=7,
        height=32,
        width=32,
    )
    return GenerationRequest(**{**base, **kw})


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_same_model_both_sides_equals_single_process_for_every_split(large_pack, sampler):
    whole = start(large_pack, request(sampler, 0))
    run_steps(large_pack, whole, STEPS)
    pipeline = HybridPipeline(large_pack, large_pack)
    for k in range(STEPS + 1):
        result = pipeline.generate(request(sampler, k), LOSSLESS)
        assert (result.latent - whole.latent).abs().max().item() <= 1e-5, f"k={k}"
        assert result.edge_steps == k and result.device_steps == STEPS - k
    assert (result.image == decode(large_pack, whole.latent)).all()


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_two_models_continue_the_carried_trajectory(large_pack, small_pack, sampler):
    """Large for [0, k), small for [k, T): equal to one loop that swaps UNets at k, history included."""
    k = 3
    req = request(sampler, k)
    reference = start(large_pack, req)
    for step in range(STEPS):
        advance((large_pack if step < k else small_pack).unet, [reference])
    result = HybridPipeline(large_pack, small_pack).generate(req, LOSSLESS)
    assert (result.latent - reference.latent).abs().max().item() <= 1e-5


def test_handoff_carries_dpm_history_and_remaining_timesteps(large_pack, small_pack):
    req = request("dpmpp_2m", 4)
    state = start(large_pack, req)
    run_steps(large_pack, state, 4)
    handoff = decode_handoff(encode_handoff(make_handoff(state, req), LOSSLESS), req, state.schedule)
    assert handoff.step == 4 and handoff.remaining_steps == STEPS - 4
    assert handoff.schedule.timesteps == state.schedule.timesteps
    assert torch.equal(handoff.prev_denoised, state.prev_denoised)
    resumed = resume(small_pack, handoff)
    assert torch.equal(resumed.latent, state.latent) and resumed.step == 4
