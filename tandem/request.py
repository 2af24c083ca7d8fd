"""A generation request and its validation: every bad value is named (CLI flag or gRPC field).

The one home of a request's limits (the edge, the device and the scheduler check against these)
and of the defaults of a pack that declares none. What a given request leaves unset is filled in
one place, tandem/resolve.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any

from tandem.echo import shown
from tandem.sampling.names import SAMPLERS

MAX_PROMPT_CHARS = 1000
MAX_STEPS = 200
MAX_IMAGE_SIDE = 2048
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1

# A pack's defaults when its manifest declares none (tandem.packs.PackManifest), and so a request's
# built in code without them.
DEFAULT_STEPS = 20
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_GUIDANCE = 7.5
DEFAULT_IMAGE_SIZE = 64  # height and width, in pixels


class RequestError(ValueError):
    """An invalid request field; `field` names it (as the wire and the CLI spell it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    """One image: what to draw, how many steps in all (T) and how many run on the edge (k = split)."""

    prompt: str
    steps: int = DEFAULT_STEPS
    split: int = DEFAULT_STEPS // 2  # default_split(DEFAULT_STEPS)
    sampler: str = DEFAULT_SAMPLER
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = 0
    negative_prompt: str = ""
    height: int = DEFAULT_IMAGE_SIZE
    width: int = DEFAULT_IMAGE_SIZE
    user: str | None = None

    def validate(self) -> "GenerationRequest":
        _require(isinstance(self.prompt, str) and self.prompt.strip() != "", "prompt", "must not be empty")
        _require(len(self.prompt) <= MAX_PROMPT_CHARS, "prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        _require(len(self.negative_prompt) <= MAX_PROMPT_CHARS, "negative_prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        _require(_is_int(self.steps) and 1 <= self.steps <= MAX_STEPS, "steps", f"must be in 1..{MAX_STEPS}, got {shown(self.steps)}")
        _require(
            _is_int(self.split) and 0 <= self.split <= self.steps,
            "split",
            f"must be in 0..steps ({self.steps}), got {shown(self.split)}",
        )
        _require(self.sampler in SAMPLERS, "sampler", f"unknown {shown(self.sampler)}; expected one of {', '.join(SAMPLERS)}")
        _require(
            isinstance(self.guidance_scale, (int, float)) and 1.0 <= self.guidance_scale <= MAX_GUIDANCE,
            "guidance_scale",
            f"must be in 1..{MAX_GUIDANCE:g}, got {shown(self.guidance_scale)}",
        )
        _require(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..2^63-1, got {shown(self.seed)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(_is_int(value) and 8 <= value <= MAX_IMAGE_SIDE, name, f"must be in 8..{MAX_IMAGE_SIDE}, got {shown(value)}")
        if self.user is not None:
            _require(self.user.isidentifier() and len(self.user) <= 64, "user", f"invalid user name {shown(self.user)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """SHA-256 (hex) of what the request asks for: a handoff carries it so the device can check
        that the latent answers its own request. The guidance scale crosses the wire as float32,
        so it is compared at float32 precision."""
        fields = self.to_dict()
        fields["guidance_scale"] = as_float32(self.guidance_scale)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationRequest":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise RequestError(sorted(unknown)[0], "unknown request field")
        return cls(**data).validate()


def default_split(steps: int) -> int:
    """The split k of a request that names none: half its steps on the edge (rounded down)."""
    return steps // 2


def split_for(steps: int, fraction: float) -> int:
    """Integer split k for a split fraction (round half up, so 0.5 of 15 -> 8): the scheduler's
    options, and a plan's share of steps applied to another T."""
    return int(math.floor(fraction * steps + 0.5))


def as_float32(value: float) -> float:
    """`value` as it arrives after crossing the wire in a proto float field (float32)."""
    return struct.unpack("<f", struct.pack("<f", float(value)))[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise RequestError(field, message)
