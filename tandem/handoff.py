"""The handoff: everything a device needs to continue a request exactly where the edge stopped,
and its wire format.

A Handoff holds the request, its schedule (timesteps and sampler coefficients), the step index k,
the latent before step k and, from k ≥ 1, the previous step's clean-latent prediction
(DPM-Solver++'s multistep history). `encode_handoff` compresses the tensors with a CodecSpec
(fp32 / fp16 / int8, token merging at ratio r) into a versioned, checksummed payload whose header
carries the request and the schedule as digests only: the device has its request, computes the
schedule itself, and `decode_handoff` checks both digests, so a handoff that answers another
request (or was made with another noise process) is refused, and the payload's size is a function
of (latent shape, codec, k, T) alone (tandem.codec.spec.handoff_size, which the scheduler uses).
`decode_handoff` rejects anything malformed with a CodecError that says what is wrong.

Merging a noisy latent. Averaging k noisy tokens shrinks their noise by √k, which the sampler does
not expect. Strategy "denoised" therefore splits the latent x_k = s·x̂0 + n·ε̂ (x̂0 = the previous
prediction, which DPM-Solver++ needs anyway), merges x̂0 by averaging and ε̂ variance-preservingly
(sum/√k), and rebuilds x_k on the device; strategy "latent" merges x_k itself.
Measured on the demo pack, "latent" keeps accuracy better (BENCHMARKS.md): it is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tandem.codec.container import CodecError, pack_container, unpack_container
from tandem.codec.quantize import decode_tensor, encode_tensor
from tandem.codec.spec import (  # noqa: F401  (the codec vocabulary, re-exported)
    DEFAULT_STRATEGY,
    ENCODINGS,
    HANDOFF_KIND,
    HANDOFF_VERSION,
    MAX_MERGE_RATIO,
    STRATEGIES,
    WINDOWS,
    CodecSpec,
    handoff_meta,
    handoff_tensors,
)
from tandem.codec.token_merge import merge, pack_plan, plan_merge, unmerge, unpack_plan
from tandem.echo import capped, shown
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.schedule import Schedule


@dataclass
class Handoff:
    request: GenerationRequest
    schedule: Schedule
    step: int  # k: the latent is the one *before* step k
    latent: torch.Tensor  # [C, H, W] float32
    prev_denoised: torch.Tensor | None = None  # x̂0 of step k - 1; None at k = 0

    @property
    def remaining_steps(self) -> int:
        return self.schedule.steps - self.step


def encode_handoff(handoff: Handoff, spec: CodecSpec = CodecSpec()) -> bytes:
    spec.validate()
    latent, prev = handoff.latent.detach().float().cpu(), handoff.prev_denoised
    prev = None if prev is None else prev.detach().float().cpu()
    step, steps = handoff.step, handoff.schedule.steps
    if step > 0 and prev is None:
        raise ValueError("a handoff after step 0 needs the previous prediction x̂0")  # make_handoff sets it
    channels, height, width = latent.shape
    strategy, layout = handoff_tensors(channels, height, width, spec, step, steps)
    tensors: dict[str, torch.Tensor] = {}
    blobs: dict[str, bytes] = {}
    if strategy == "exact":
        tensors["latent"] = latent
        if prev is not None:
            tensors["prev_denoised"] = prev
    elif strategy == "latent":
        plan = plan_merge(latent, spec.merge_ratio, spec.window)
        blobs["plan"] = pack_plan(plan)
        tensors["latent"] = merge(latent, plan, "mean")
        if prev is not None:
            tensors["prev_denoised"] = merge(prev, plan, "mean")
    else:  # denoised: x_k = s·x̂0 + n·ε̂, merge x̂0 and ε̂ with one plan made on the smooth x̂0
        assert prev is not None  # handoff_strategy picks "denoised" only after step 0
        s, n = handoff.schedule.signal[step], handoff.schedule.noise[step]
        noise = (latent - s * prev) / n
        plan = plan_merge(prev, spec.merge_ratio, spec.window)
        blobs["plan"] = pack_plan(plan)
        tensors["denoised"] = merge(prev, plan, "mean")
        tensors["noise"] = merge(noise, plan, "variance_preserving")
    assert [(name, list(t.shape)) for name, t in tensors.items()] == layout  # the spec predicts sizes from it
    blobs.update({name: encode_tensor(t, spec.encoding) for name, t in tensors.items()})
    meta = handoff_meta(handoff.request.digest(), handoff.schedule.digest(), step, latent.shape, spec, strategy,
                        layout)
    return pack_container(meta, blobs)


def decode_handoff(payload: bytes, request: GenerationRequest, schedule: Schedule) -> Handoff:
    """The Handoff in `payload` for `request`, whose schedule the device computed itself
    (`schedule`); CodecError with a clear message for anything malformed, or for a handoff that
    answers another request or was made with another schedule."""
    meta, blobs = unpack_container(payload)
    try:
        return _decode(meta, blobs, request, schedule)
    except CodecError:
        raise
    except RequestError as exc:
        raise CodecError(f"handoff carries an invalid {capped(str(exc), 300)}") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CodecError(f"malformed handoff: {type(exc).__name__}: {capped(str(exc), 300)}") from exc


def _decode(meta: dict[str, Any], blobs: dict[str, bytes], request: GenerationRequest, schedule: Schedule) -> Handoff:
    if meta.get("kind") != HANDOFF_KIND:
        raise CodecError("payload is not a handoff")
    version = meta.get("handoff_version")
    if version != HANDOFF_VERSION:
        raise CodecError(f"handoff version {shown(version)} is not supported (this build reads {HANDOFF_VERSION})")
    if meta.get("request") != request.digest():
        raise CodecError("handoff answers another request (its request digest differs)")
    if meta.get("schedule") != schedule.digest():
        raise CodecError("handoff was made with another schedule than this device computes for the request "
                         "(different noise process or sampler settings)")
    step = meta["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= schedule.steps):
        raise CodecError(f"handoff step {shown(step)} outside 0..{schedule.steps}")
    spec = CodecSpec(**meta["codec"]).validate()
    shape = meta["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) and x >= 1 for x in shape)):
        raise CodecError(f"bad latent shape {shown(shape)}")
    channels, height, width = shape
    strategy, layout = handoff_tensors(channels, height, width, spec, step, schedule.steps)
    if meta["strategy"] != strategy or meta["shapes"] != dict(layout):
        raise CodecError(f"handoff header is inconsistent: strategy {shown(meta['strategy'])} with tensors "
                         f"{shown(meta['shapes'])}, expected {strategy!r} with {dict(layout)!r}")
    expected_blobs = {name for name, _ in layout} | ({"plan"} if strategy != "exact" else set())
    if set(blobs) != expected_blobs:
        raise CodecError(f"handoff blobs {sorted(blobs)} are not the expected {sorted(expected_blobs)}")

    def tensor(name: str) -> torch.Tensor:
        return decode_tensor(blobs[name], spec.encoding, tuple(meta["shapes"][name]))

    prev = None
    if strategy == "exact":
        latent = tensor("latent").reshape(shape)
        if step > 0:
            prev = tensor("prev_denoised").reshape(shape)
    else:
        plan = unpack_plan(blobs["plan"], height, width, spec.window, spec.merge_ratio)
        if strategy == "latent":
            latent = unmerge(tensor("latent"), plan)
            if step > 0:
                prev = unmerge(tensor("prev_denoised"), plan)
        else:
            prev = unmerge(tensor("denoised"), plan)
            s, n = schedule.signal[step], schedule.noise[step]
            latent = s * prev + n * unmerge(tensor("noise"), plan)
    # Tensor bytes are not covered by anything the device can check (the CRC is the packer's): a
    # NaN or an infinity would run every remaining step and decode to a blank image, not fail over.
    for name, value in (("latent", latent), ("prev_denoised", prev)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise CodecError(f"handoff {name} holds a NaN or an infinity")
    return Handoff(request=request, schedule=schedule, step=step, latent=latent, prev_denoised=prev)
