"""Handoff wire format: exact when lossless, bounded when lossy, loud when corrupt."""

from __future__ import annotations

import dataclasses

import numpy as np
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
    back = decode_handoff(encode_handoff(handoff, CodecSpec("fp32")), handoff.request, handoff.schedule)
    assert torch.equal(back.latent, handoff.latent)
    assert back.step == step and back.schedule == handoff.schedule and back.request == handoff.request
    if step > 0:
        assert torch.equal(back.prev_denoised, handoff.prev_denoised)


@pytest.mark.parametrize("encoding,bound", [("fp16", 1e-2), ("int8", 0.1)])
def test_lossy_precision_is_bounded(encoding, bound):
    handoff = make_handoff()
    back = decode_handoff(encode_handoff(handoff, CodecSpec(encoding)), handoff.request, handoff.schedule)
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
    back = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", ratio, strategy)), handoff.request, handoff.schedule)
    assert back.latent.shape == handoff.latent.shape
    assert back.prev_denoised.shape == handoff.prev_denoised.shape
    # Merging loses detail but must not blow up: error well below the latent's own scale.
    assert (back.latent - handoff.latent).pow(2).mean() < handoff.latent.pow(2).mean()


def test_denoised_strategy_keeps_the_noise_level():
    """Averaging noisy tokens shrinks the noise; the denoised strategy keeps its variance."""
    handoff = make_handoff(step=1, shape=(4, 32, 32))  # early: mostly noise
    std = handoff.latent.std().item()
    latent_merged = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", 0.75, "latent")), handoff.request, handoff.schedule).latent
    denoised_merged = decode_handoff(encode_handoff(handoff, CodecSpec("fp32", 0.75, "denoised")), handoff.request, handoff.schedule).latent
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
    handoff = make_handoff()
    payload = encode_handoff(handoff, CodecSpec("fp16", 0.5))
    for cut in range(0, len(payload), 7):
        with pytest.raises(CodecError):
            decode_handoff(payload[:cut], handoff.request, handoff.schedule)
    for position in range(0, len(payload), 11):
        corrupt = bytearray(payload)
        corrupt[position] ^= 0x41
        with pytest.raises(CodecError):
            decode_handoff(bytes(corrupt), handoff.request, handoff.schedule)


def _repack(payload: bytes, edit) -> bytes:
    meta, blobs = unpack_container(payload)
    edit(meta, blobs)
    return pack_container(meta, blobs)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m, b: m.update(handoff_version=1), "handoff version 1 is not supported"),
        (lambda m, b: m.update(kind="other"), "not a handoff"),
        (lambda m, b: m.update(step=99), "step 99 outside"),
        (lambda m, b: m.update(request="0" * 64), "answers another request"),
        (lambda m, b: m.update(schedule="0" * 64), "made with another schedule"),
        (lambda m, b: m.update(latent_shape=[4, 16]), "bad latent shape"),
        (lambda m, b: b.pop("prev_denoised"), "blobs .* are not the expected"),
        (lambda m, b: b.update(latent=b["latent"][:-2]), "needs 4096 bytes, got 4094"),
        (lambda m, b: m["shapes"].update(latent=[4, 8, 8]), "header is inconsistent"),
        (lambda m, b: m.update(strategy="zip"), "header is inconsistent"),
    ],
)
def test_semantically_invalid_handoffs_are_refused(edit, message):
    handoff = make_handoff()
    payload = encode_handoff(handoff, CodecSpec("fp32"))
    with pytest.raises(CodecError, match=message):
        decode_handoff(_repack(payload, edit), handoff.request, handoff.schedule)


def test_a_handoff_for_another_request_or_schedule_is_refused():
    handoff = make_handoff()
    payload = encode_handoff(handoff, CodecSpec("fp16"))
    other = dataclasses.replace(handoff.request, seed=handoff.request.seed + 1)
    with pytest.raises(CodecError, match="answers another request"):
        decode_handoff(payload, other, handoff.schedule)
    with pytest.raises(CodecError, match="another schedule"):
        decode_handoff(payload, handoff.request, make_schedule("dpmpp_2m", handoff.schedule.steps,
                                                               {**SD_SAMPLER_CONFIG, "beta_end": 0.02}))


def test_the_guidance_scale_is_compared_at_wire_precision():
    handoff = make_handoff()
    wire = dataclasses.replace(handoff.request, guidance_scale=float(np.float32(7.3)))
    ours = dataclasses.replace(handoff, request=dataclasses.replace(handoff.request, guidance_scale=7.3))
    assert decode_handoff(encode_handoff(dataclasses.replace(handoff, request=wire)), ours.request, handoff.schedule)


def test_foreign_bytes_are_not_a_payload():
    with pytest.raises(CodecError, match="not a Tandem payload"):
        decode_handoff(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, make_handoff().request, make_handoff().schedule)
