"""Invariant 2: a request's result does not depend on which requests shared its batches
(per-sample timesteps, per-request seeds and guidance)."""

from __future__ import annotations

import copy

import torch

from tandem.pipeline import start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import advance


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding (BLAS kernels block differently for other batch sizes), relative
    to the tensor's scale: x0 predictions at high noise divide ε by √ᾱ ≈ 0.07, scaling rounding too."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def make_requests() -> list[GenerationRequest]:
    prompts = ["a red circle at the left on a blue background", "a green square at the top on a black background"]
    samplers = ["ddim", "euler", "dpmpp_2m"]
    return [
        GenerationRequest(
            prompt=prompts[i % 2],
            steps=4 + i,
            split=0,
            sampler=samplers[i % 3],
            guidance_scale=1.0 if i == 4 else 2.0 + i,
            seed=100 + i,
            height=32,
            width=32,
        )
        for i in range(6)
    ]


def test_every_batched_step_equals_the_same_step_alone(large_pack):
    """Requests join one after another (so they sit at different steps, with different samplers
    and guidance) and leave when done; at every iteration each request's batched step must equal
    the step it would take alone. Compared per step: an untrained random UNet is chaotic and would
    amplify float rounding over a whole trajectory."""
    states = [start(large_pack, req) for req in make_requests()]
    active, joined, batch_sizes = [], 0, []
    while joined < len(states) or active:
        if joined < len(states):
            active.append(states[joined])
            joined += 1
        alone = [copy.deepcopy(s) for s in active]
        for state in alone:
            advance(large_pack.unet, [state])
        batch_sizes.append(len(active))
        advance(large_pack.unet, active)
        for batched, single in zip(active, alone):
            assert batched.step == single.step
            assert close(batched.latent, single.latent)
            assert close(batched.prev_denoised, single.prev_denoised)
        active = [s for s in active if not s.done]
    assert max(batch_sizes) >= 4  # the batches really mixed requests
    assert all(s.done for s in states)


def test_batch_order_does_not_matter(large_pack):
    requests = make_requests()[:4]
    forward = [start(large_pack, r) for r in requests]
    backward = [start(large_pack, r) for r in reversed(requests)]
    advance(large_pack.unet, forward)
    advance(large_pack.unet, backward)
    for a, b in zip(forward, reversed(backward)):
        assert close(a.latent, b.latent)
