"""Handoff wire format: exact when lossless, bounded when lossy, loud when corrupt."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from tandem.codec.container import CodecError, pack_container, unpack_container
from tandem.handoff import CodecSpec, Handoff, decode_handoff, encode_handoff
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.schedule import make_schedule
from tandem.tiny_pack import SD_SAMPLER_CONFIG


def make_handoff(sampler="dpmpp_2m", step=4, steps=8, shape=(4, 16, 16), seed=0) -> Handoff:
    g = torch.Generator().manual_seed(seed)
    schedule = make_schedule(sampler, steps, SD_SAMPLER_CONFIG)
    # A smooth "clean" latent plus noise at the level the schedule has at `step`.
    clean = torch.nn.functional.interpolate(torch.randn(1, *shape[:1], 4, 4, generator=g), size=shape[1:], mode="bilinear")[0]
    noise = torch.randn(shape, generator=g)
    latent = schedule.signal[step] * clean + schedule.noise[step] * noise
    request = GenerationRequest("a red circle at the left on a blue background", steps=steps, split=step, sampler=sampler)
    return Handoff(request, schedule, step, latent, clean if step > 0 else None)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("step", [0, 1, 5, 8])
def test_lossless_round_trip_is_bitwise(sampler, step):
    handoff = make_handoff(sampler, step)
    back = decode_handoff(encode_handoff(handoff, CodecSpec("fp32")))
    assert torch.equal(back.latent, handoff.latent)
    assert back.step == step and back.schedule == handoff.schedule and back.request == handoff.request
    if step > 0:
        assert torch.equal(back.prev_denoised, handoff.prev_denoised)


@pytest.mark.parametrize("encoding,bound", [("fp16", 1e-2), ("int8", 0.1)])
def test_lossy_precision_is_bounded(encoding, bound):
    handoff = make_handoff()
    back = decode_handoff(encode_handoff(handoff, CodecSpec(encoding)))
    assert 0 < (back.latent - handoff.latent).abs().max().item() <= bound


def test_bytes_shrink_with_precision_and_merge_ratio():
    handoff = make_handoff(shape=(4, 32, 32))
    sizes = {
        spec: len(encode_handoff(handoff, spec))
        for spec in [
            CodecSpec("fp32"),
            CodecSpec("fp16"),
            CodecSpec("int8"),
            CodecSpec("fp16", 0.5, "latent"),
            CodecSpec("fp16", 0.75, "latent"),
        ]
    }
    values = list(sizes.values())
    assert values[0] > values[1] > values[2]
    assert values[1] > values[3] > values[4]


@pytest.mark.parametrize("strategy", ["latent", "denoised"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_merged_handoff_restores_shapes_and_stays_close(strategy, ratio):
    handoff = make_handoff(shape=(4, 16, 16))
    back = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", ratio, strategy)))
    assert back.latent.shape == handoff.latent.shape
    assert back.prev_denoised.shape == handoff.prev_denoised.shape
    # Merging loses detail but must not blow up: error well below the latent's own scale.
    assert (back.latent - handoff.latent).pow(2).mean() < handoff.latent.pow(2).mean()


def test_denoised_strategy_keeps_the_noise_level():
    """Averaging noisy tokens shrinks the noise; the denoised strategy keeps its variance."""
    handoff = make_handoff(step=1, shape=(4, 32, 32))  # early: mostly noise
    std = handoff.latent.std().item()
    latent_merged = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", 0.75, "latent"))).latent
    denoised_merged = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", 0.75, "denoised"))).latent
    assert latent_merged.std().item() < 0.9 * std
    assert abs(denoised_merged.std().item() - std) < 0.1 * std


def test_step_zero_falls_back_to_merging_the_latent():
    handoff = make_handoff(step=0)
    meta, _ = unpack_container(encode_handoff(handoff, CodecSpec("fp16", 0.5, "denoised")))
    assert meta["strategy"] == "latent"


def test_bad_codec_specs_name_the_field():
    handoff = make_handoff()
    with pytest.raises(RequestError, match="merge_ratio"):
        encode_handoff(handoff, CodecSpec("fp16", 0.8))
    with pytest.raises(RequestError, match="codec: unknown 'bf8'"):
        encode_handoff(handoff, CodecSpec("bf8"))
    with pytest.raises(RequestError, match="merge_strategy"):
        encode_handoff(handoff, CodecSpec("fp16", 0.5, "magic"))


def test_truncated_and_corrupt_payloads_raise_codec_errors():
    payload = encode_handoff(make_handoff(), CodecSpec("fp16", 0.5))
    for cut in range(0, len(payload), 7):
        with pytest.raises(CodecError):
            decode_handoff(payload[:cut])
    for position in range(0, len(payload), 11):
        corrupt = bytearray(payload)
        corrupt[position] ^= 0x41
        with pytest.raises(CodecError):
            decode_handoff(bytes(corrupt))


def _repack(payload: bytes, edit) -> bytes:
    meta, blobs = unpack_container(payload)
    edit(meta, blobs)
    return pack_container(meta, blobs)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m, b: m.update(handoff_version=2), "handoff version 2 is not supported"),
        (lambda m, b: m.update(kind="other"), "not a handoff"),
        (lambda m, b: m.update(step=99), "step 99 outside"),
        (lambda m, b: m["request"].update(steps=10), "does not match"),
        (lambda m, b: m["request"].update(prompt=""), "prompt"),
        (lambda m, b: m.update(latent_shape=[4, 16]), "bad latent shape"),
        (lambda m, b: b.pop("prev_denoised"), "lacks the previous prediction"),
        (lambda m, b: b.update(latent=b["latent"][:-2]), "needs 4096 bytes, got 4094"),
        (lambda m, b: m["schedule"].update(sampler="heun"), "unknown sampler"),
        (lambda m, b: m.update(strategy="zip"), "unknown handoff strategy"),
    ],
)
def test_semantically_invalid_handoffs_are_refused(edit, message):
    payload = encode_handoff(make_handoff(), CodecSpec("fp32"))
    with pytest.raises(CodecError, match=message):
        decode_handoff(_repack(payload, edit))


def test_foreign_bytes_are_not_a_payload():
    with pytest.raises(CodecError, match="not a Tandem payload"):
        decode_handoff(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
