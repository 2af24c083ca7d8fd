"""The handoff: everything a device needs to continue a request exactly where the edge stopped,
and its wire format.

A Handoff holds the request, its schedule (remaining timesteps and sampler coefficients), the
step index k, the latent before step k and, from k ≥ 1, the previous step's clean-latent
prediction (DPM-Solver++'s multistep history). `encode_handoff` compresses the tensors with a
CodecSpec (fp32 / fp16 / int8, token merging at ratio r) into a versioned, checksummed payload;
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

import numpy as np
import torch

from tandem.codec.container import CodecError, pack_container, unpack_container
from tandem.codec.quantize import decode_tensor, encode_tensor
from tandem.codec.spec import (  # noqa: F401  (the codec vocabulary, re-exported)
    DEFAULT_STRATEGY,
    ENCODINGS,
    MAX_MERGE_RATIO,
    STRATEGIES,
    WINDOWS,
    CodecSpec,
)
from tandem.codec.token_merge import merge, pack_plan, plan_merge, unmerge, unpack_plan
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.schedule import Schedule, ScheduleError

HANDOFF_VERSION = 1


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


def _strategy(handoff: Handoff, spec: CodecSpec) -> str:
    """The tensors actually sent: "exact" when not merging; "denoised" needs x̂0 and some noise left."""
    if spec.merge_ratio == 0.0:
        return "exact"
    if spec.strategy == "denoised" and handoff.prev_denoised is not None and handoff.schedule.noise[handoff.step] > 0:
        return "denoised"
    return "latent"


def encode_handoff(handoff: Handoff, spec: CodecSpec = CodecSpec()) -> bytes:
    spec.validate()
    latent, prev = handoff.latent.detach().float().cpu(), handoff.prev_denoised
    prev = None if prev is None else prev.detach().float().cpu()
    strategy = _strategy(handoff, spec)
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
        assert prev is not None  # _strategy picks "denoised" only with x̂0 at hand
        s, n = handoff.schedule.signal[handoff.step], handoff.schedule.noise[handoff.step]
        noise = (latent - s * prev) / n
        plan = plan_merge(prev, spec.merge_ratio, spec.window)
        blobs["plan"] = pack_plan(plan)
        tensors["denoised"] = merge(prev, plan, "mean")
        tensors["noise"] = merge(noise, plan, "variance_preserving")
    schedule_meta, blobs["schedule"] = _pack_schedule(handoff.schedule)
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    blobs.update({name: encode_tensor(t, spec.encoding) for name, t in tensors.items()})
    meta = {
        "kind": "tandem.handoff",
        "handoff_version": HANDOFF_VERSION,
        "request": handoff.request.to_dict(),
        "schedule": schedule_meta,
        "step": handoff.step,
        "latent_shape": list(latent.shape),
        "codec": spec.to_dict(),
        "strategy": strategy,
        "shapes": shapes,
    }
    return pack_container(meta, blobs)


def _pack_schedule(schedule: Schedule) -> tuple[dict[str, Any], bytes]:
    """The schedule's per-step arrays as one float32 blob (JSON decimals would be ~4× larger than a
    small latent); its values are float32 computations, so float32 carries them exactly."""
    data = schedule.to_dict()
    arrays = {"timesteps": data.pop("timesteps"), "input_divisor": data.pop("input_divisor"),
              "signal": data.pop("signal"), "noise": data.pop("noise")}
    arrays.update({f"coeffs.{name}": values for name, values in data.pop("coeffs").items()})
    flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in arrays.values()])
    packed = flat.astype("<f4")
    if not np.array_equal(packed.astype(np.float64), flat):
        raise ValueError("schedule values are not float32-exact")  # a bug upstream, never user input
    data["arrays"] = [[name, len(values)] for name, values in arrays.items()]
    return data, packed.tobytes()


def _unpack_schedule(meta: dict[str, Any], blob: bytes) -> Schedule:
    names = meta["arrays"]
    total = sum(int(n) for _, n in names)
    if len(blob) != 4 * total:
        raise CodecError(f"schedule blob has {len(blob)} bytes, expected {4 * total}")
    flat = np.frombuffer(blob, dtype="<f4").astype(np.float64).tolist()
    data = {k: v for k, v in meta.items() if k != "arrays"}
    data["coeffs"] = {}
    offset = 0
    for name, count in names:
        values, offset = flat[offset : offset + int(count)], offset + int(count)
        if str(name).startswith("coeffs."):
            data["coeffs"][str(name)[len("coeffs.") :]] = values
        else:
            data[str(name)] = values
    return Schedule.from_dict(data)


def decode_handoff(payload: bytes) -> Handoff:
    """The Handoff in `payload`; CodecError with a clear message for anything malformed."""
    meta, blobs = unpack_container(payload)
    try:
        return _decode(meta, blobs)
    except CodecError:
        raise
    except (RequestError, ScheduleError) as exc:
        raise CodecError(f"handoff carries an invalid {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CodecError(f"malformed handoff: {type(exc).__name__}: {exc}") from exc


def _decode(meta: dict[str, Any], blobs: dict[str, bytes]) -> Handoff:
    if meta.get("kind") != "tandem.handoff":
        raise CodecError("payload is not a handoff")
    version = meta.get("handoff_version")
    if version != HANDOFF_VERSION:
        raise CodecError(f"handoff version {version!r} is not supported (this build reads {HANDOFF_VERSION})")
    request = GenerationRequest.from_dict(meta["request"])
    schedule = _unpack_schedule(meta["schedule"], blobs.get("schedule", b""))
    step = meta["step"]
    if not (isinstance(step, int) and 0 <= step <= schedule.steps):
        raise CodecError(f"handoff step {step!r} outside 0..{schedule.steps}")
    if schedule.steps != request.steps or schedule.sampler != request.sampler:
        raise CodecError("handoff schedule does not match its request")
    spec = CodecSpec(**meta["codec"]).validate()
    shape = [int(x) for x in meta["latent_shape"]]
    if len(shape) != 3 or min(shape) < 1:
        raise CodecError(f"bad latent shape {shape}")
    channels, height, width = shape
    strategy = meta["strategy"]

    def tensor(name: str) -> torch.Tensor:
        if name not in blobs:
            raise CodecError(f"handoff lacks tensor {name!r}")
        return decode_tensor(blobs[name], spec.encoding, tuple(meta["shapes"][name]))

    prev = None
    if strategy == "exact":
        latent = tensor("latent").reshape(shape)
        if "prev_denoised" in blobs:
            prev = tensor("prev_denoised").reshape(shape)
    elif strategy in ("latent", "denoised"):
        plan = unpack_plan(blobs["plan"], height, width, spec.window, spec.merge_ratio)
        if strategy == "latent":
            latent = unmerge(tensor("latent"), plan)
            if "prev_denoised" in blobs:
                prev = unmerge(tensor("prev_denoised"), plan)
        else:
            prev = unmerge(tensor("denoised"), plan)
            s, n = schedule.signal[step], schedule.noise[step]
            latent = s * prev + n * unmerge(tensor("noise"), plan)
    else:
        raise CodecError(f"unknown handoff strategy {strategy!r}")
    if latent.shape[0] != channels:
        raise CodecError(f"latent has {latent.shape[0]} channels, header says {channels}")
    if prev is None and step >= 1 and schedule.sampler == "dpmpp_2m" and step < schedule.steps:
        raise CodecError("DPM-Solver++ handoff after step 0 lacks the previous prediction")
    return Handoff(request=request, schedule=schedule, step=step, latent=latent, prev_denoised=prev)
