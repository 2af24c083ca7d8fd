"""What a device checks before it trusts a handoff from an edge.

An edge (hostile, buggy, or one a scheduler was tricked into naming) could answer with another
user's prompt and seed, a 512 px latent for a 64 px request, a schedule with fewer steps than
asked, or an endless stream of chunks. The handoff carries the request it answers, so the device
compares it with its own request, the latent shape with the one its pack expects, the schedule
with the one it computes itself, and caps bytes and chunks by the largest handoff that request can
possibly encode to. Any mismatch raises HandoffRejected with the reason; the caller finishes the
image locally. Pure logic: no gRPC, no model (the expected schedule comes from the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.request import GenerationRequest
from tandem.sampling.schedule import Schedule

# Headroom over the largest possible encoding: a "small multiple", not an exact figure, so that a
# container-format tweak cannot turn every legitimate handoff into a fallback.
BYTES_HEADROOM = 2
META_BYTES = 64 * 1024  # JSON header: two prompts of ≤ 1000 chars (≤ 6 bytes each when escaped), schedule names
SCHEDULE_ARRAYS = 10  # timesteps, input divisor, signal, noise, ≤ 6 coefficient arrays (float32 each)
MAX_CHUNKS = 1024  # the edge sends 256 KiB chunks: a 2048 px handoff is a few of them
REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "sampler", "height", "width", "user")


class HandoffRejected(Exception):
    """The handoff does not answer this device's request; str() is the reason."""


@dataclass(frozen=True)
class HandoffLimits:
    """Caps on one handoff stream, from the request it must answer."""

    max_bytes: int
    max_chunks: int = MAX_CHUNKS

    @classmethod
    def for_request(cls, request: GenerationRequest, latent_shape: tuple[int, int, int]) -> "HandoffLimits":
        channels, height, width = latent_shape
        # Worst case: two fp32 tensors at full size (latent + multistep history), a global merge
        # plan (≤ 1 bit + 4 bytes per token), the schedule's float32 arrays and the JSON header.
        tensors = 2 * channels * height * width * 4
        plan = height * width * 8
        schedule = SCHEDULE_ARRAYS * (request.steps + 1) * 4
        return cls(max_bytes=BYTES_HEADROOM * (tensors + plan + schedule + META_BYTES))

    def check_chunk(self, index: int, count: int, total_bytes: int, received: int) -> None:
        """Before a chunk is kept: its declared sizes and what has arrived so far stay in bounds."""
        if total_bytes > self.max_bytes:
            raise HandoffRejected(f"handoff declares {total_bytes} bytes; this request's can be at most {self.max_bytes}")
        if not 1 <= count <= self.max_chunks:
            raise HandoffRejected(f"handoff declares {count} chunks; at most {self.max_chunks} are accepted")
        if index >= count or received > total_bytes:
            raise HandoffRejected(f"handoff chunk {index} goes past the declared {count} chunks / {total_bytes} bytes")


def check_header(meta: dict[str, Any], request: GenerationRequest, latent_shape: tuple[int, int, int]) -> None:
    """The handoff's header answers `request` (before any tensor is decoded)."""
    carried = meta.get("request")
    if not isinstance(carried, dict):
        raise HandoffRejected("handoff carries no request")
    ours = request.to_dict()
    for name in REQUEST_FIELDS:
        if carried.get(name) != ours[name]:
            raise HandoffRejected(f"handoff answers another request ({name} differs)")
    # The guidance scale crossed the wire as a float32.
    if not _same_float32(carried.get("guidance_scale"), request.guidance_scale):
        raise HandoffRejected("handoff answers another request (guidance_scale differs)")
    if meta.get("step") != request.split:
        raise HandoffRejected(f"handoff stops at step {meta.get('step')!r}, the request splits at {request.split}")
    if meta.get("latent_shape") != list(latent_shape):
        raise HandoffRejected(f"handoff latent shape {meta.get('latent_shape')!r} is not the expected {list(latent_shape)}")


def check_schedule(received: Schedule, expected: Schedule) -> None:
    """The carried schedule is the one this device computes for the request itself."""
    if received.steps != expected.steps or received.sampler != expected.sampler:
        raise HandoffRejected(f"handoff schedule has {received.steps} {received.sampler} steps, "
                              f"expected {expected.steps} {expected.sampler}")
    ours, theirs = expected.to_dict(), received.to_dict()
    for name in ("timesteps", "input_divisor", "signal", "noise"):
        if not np.allclose(theirs[name], ours[name], rtol=1e-6, atol=1e-7):
            raise HandoffRejected(f"handoff schedule's {name} differ from this device's")
    if set(theirs["coeffs"]) != set(ours["coeffs"]) or not all(
            np.allclose(theirs["coeffs"][k], ours["coeffs"][k], rtol=1e-6, atol=1e-7) for k in ours["coeffs"]):
        raise HandoffRejected("handoff schedule's coefficients differ from this device's")


def _same_float32(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and math.isfinite(a) and np.float32(a) == np.float32(b)
