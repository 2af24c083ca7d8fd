"""The torch-free codec spec is the one home of the wire's sizes: it must equal what the encoders
write, and the scheduler (which may not import torch) must be able to use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tandem.codec.container import unpack_container
from tandem.codec.spec import CodecSpec, handoff_tensor_bytes
from tandem.handoff import Handoff, encode_handoff
from tandem.request import GenerationRequest
from tandem.sampling.schedule import make_schedule
from tandem.tiny_pack import SD_SAMPLER_CONFIG


def _handoff(shape: tuple[int, int, int], step: int, steps: int = 8) -> Handoff:
    g = torch.Generator().manual_seed(sum(shape) + step)
    schedule = make_schedule("dpmpp_2m", steps, SD_SAMPLER_CONFIG)
    clean = torch.randn(shape, generator=g)
    latent = schedule.signal[step] * clean + schedule.noise[step] * torch.randn(shape, generator=g)
    request = GenerationRequest("spec", steps=steps, split=step, sampler="dpmpp_2m")
    return Handoff(request, schedule, step, latent, clean if step > 0 else None)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 7, 9), (3, 16, 16), (4, 64, 64)])
@pytest.mark.parametrize("window", ["local", "global"])
@pytest.mark.parametrize("strategy", ["latent", "denoised"])
def test_tensor_bytes_equal_the_encoded_blobs(encoding, ratio, shape, window, strategy):
    spec = CodecSpec(encoding, ratio, strategy, window)
    _, blobs = unpack_container(encode_handoff(_handoff(shape, step=4), spec))
    written = sum(len(b) for name, b in blobs.items() if name != "schedule")
    assert handoff_tensor_bytes(*shape, spec) == written


def test_first_step_handoff_carries_one_tensor():
    spec = CodecSpec("fp16")
    _, blobs = unpack_container(encode_handoff(_handoff((4, 8, 8), step=0), spec))
    assert handoff_tensor_bytes(4, 8, 8, spec, tensors=1) == sum(len(b) for n, b in blobs.items() if n != "schedule")


def test_spec_and_scheduler_cost_model_import_no_torch():
    code = ("import sys, tandem.codec.spec, tandem.request, services.scheduler.decide.costs, services.scheduler.decide.options; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75])
@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 7, 9), (4, 64, 64)])
@pytest.mark.parametrize("strategy", ["latent", "denoised"])
@pytest.mark.parametrize("step", [0, 4, 8])
def test_handoff_size_is_the_payloads_length(encoding, ratio, shape, strategy, step):
    """The whole payload, header included, from (shape, codec, k, T) alone."""
    from tandem.codec.spec import handoff_size

    spec = CodecSpec(encoding, ratio, strategy)
    assert handoff_size(*shape, spec, steps=8, step=step) == len(encode_handoff(_handoff(shape, step=step), spec))
