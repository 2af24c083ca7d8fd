"""The codec's vocabulary and exact byte sizes, torch-free: the one home of what a handoff's
tensors cost on the wire.

The encoders (quantize.py, token_merge.py, handoff.py) and the torch-free scheduler (its option
table and cost model) both read these names and sizes, so a prediction of handoff bytes and the
bytes actually written cannot drift apart.

Merge strategies: "latent" merges x_k itself; "denoised" merges the clean prediction x̂0 and the
noise apart and rebuilds x_k on the device (tandem/handoff.py). The default is the measured
winner: merging x_k keeps the evaluator's accuracy at every split and ratio (0.985 vs 0.805
all-four at k = T/4, r = 0.5, 200 prompts; BENCHMARKS.md, section 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

from tandem.codec.container import container_size
from tandem.echo import shown
from tandem.request import RequestError

ENCODINGS: tuple[str, ...] = ("fp32", "fp16", "int8")
DEFAULT_ENCODING = "fp16"
BYTES_PER_ELEMENT: dict[str, int] = {"fp32": 4, "fp16": 2, "int8": 1}
INT8_SCALE_BYTES = 4  # one fp32 scale per channel, ahead of the int8 values
Window = Literal["local", "global"]
WINDOWS: tuple[str, ...] = ("local", "global")
STRATEGIES: tuple[str, ...] = ("latent", "denoised")
DEFAULT_STRATEGY = "latent"
MAX_MERGE_RATIO = 0.75


@dataclass(frozen=True)
class CodecSpec:
    """How the handoff's tensors travel: precision, merge ratio, how a noisy latent is merged."""

    encoding: str = DEFAULT_ENCODING
    merge_ratio: float = 0.0
    strategy: str = DEFAULT_STRATEGY
    window: Window = "local"

    @property
    def lossless(self) -> bool:
        return self.encoding == "fp32" and self.merge_ratio == 0.0

    def validate(self) -> "CodecSpec":
        if self.encoding not in ENCODINGS:
            raise RequestError("codec", f"unknown {shown(self.encoding)}; expected one of {', '.join(ENCODINGS)}")
        ratio = self.merge_ratio
        if not (isinstance(ratio, Real) and not isinstance(ratio, bool) and 0.0 <= ratio <= MAX_MERGE_RATIO):
            raise RequestError("merge_ratio", f"must be in 0..{MAX_MERGE_RATIO}, got {shown(ratio)}")
        if self.strategy not in STRATEGIES:
            raise RequestError("merge_strategy", f"unknown {shown(self.strategy)}; expected one of {', '.join(STRATEGIES)}")
        if self.window not in WINDOWS:
            raise RequestError("merge_window", f"unknown {shown(self.window)}; expected one of {', '.join(WINDOWS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "merge_ratio": self.merge_ratio, "strategy": self.strategy, "window": self.window}


# --- token grid: a fixed partition into dst tokens (even row, even column) and src tokens -------
def dst_tokens(height: int, width: int) -> int:
    return ((height + 1) // 2) * ((width + 1) // 2)


def src_tokens(height: int, width: int) -> int:
    return height * width - dst_tokens(height, width)


def merge_count(height: int, width: int, ratio: float) -> int:
    """Src tokens merged at ``ratio``: ``floor(ratio * H * W)`` clipped to the src tokens."""
    check_grid(height, width)
    check_ratio(ratio)
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    wanted = math.floor(ratio * height * width + 1e-9)
    return min(wanted, src_tokens(height, width))


def global_index_bytes(n_dst: int) -> int:
    """Bytes per dst index in a global merge plan (uint16 while it fits)."""
    return 2 if n_dst <= 1 << 16 else 4


def packed_plan_size(height: int, width: int, window: str, n_merged: int) -> int:
    """Exact bytes of a packed merge plan: a 4-bit neighbour code per src token ("local"), or a
    merged-bit per src token plus one dst index per merged token ("global")."""
    check_grid(height, width)
    check_window(window)
    n_src = src_tokens(height, width)
    if window == "local":
        return (n_src + 1) // 2
    return (n_src + 7) // 8 + n_merged * global_index_bytes(dst_tokens(height, width))


# --- tensors -------------------------------------------------------------------------------------
def encoded_size(shape: Sequence[int], encoding: str) -> int:
    """Exact bytes of one tensor of ``shape`` (channel axis first) in ``encoding``."""
    check_encoding(encoding)
    dims = check_shape(shape, encoding)
    numel = math.prod(dims)
    if encoding == "int8":
        return dims[0] * INT8_SCALE_BYTES + numel
    return numel * BYTES_PER_ELEMENT[encoding]


def handoff_tensor_bytes(channels: int, height: int, width: int, spec: CodecSpec, tensors: int = 2) -> int:
    """Exact bytes of a handoff's tensor blobs (and merge plan): ``tensors`` tensors of
    ``channels × kept`` (the latent and, after step 0, the multistep history x̂0 — or x̂0 and
    the noise for the "denoised" strategy), plus the packed plan when merging."""
    spec.validate()
    if spec.merge_ratio == 0.0:
        return tensors * encoded_size((channels, height, width), spec.encoding)
    merged = merge_count(height, width, spec.merge_ratio)
    kept = height * width - merged
    plan = packed_plan_size(height, width, spec.window, merged)
    return tensors * encoded_size((channels, kept), spec.encoding) + plan


# --- checks (ValueError: these guard programming errors, RequestError guards user input) ---------
def check_grid(height: int, width: int) -> None:
    for name, value in (("H", height), ("W", width)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {shown(value)}")


def check_window(window: str) -> None:
    if window not in WINDOWS:
        raise ValueError(f"unknown merge window {shown(window)}; valid windows: {', '.join(WINDOWS)}")


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, Real) and 0.0 <= ratio <= MAX_MERGE_RATIO):
        raise ValueError(f"merge ratio must be in [0, {MAX_MERGE_RATIO}], got {shown(ratio)}")


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown tensor encoding {shown(encoding)}; valid encodings: {', '.join(ENCODINGS)}")


def check_shape(shape: Sequence[int], encoding: str) -> tuple[int, ...]:
    dims = tuple(shape)
    if not all(_is_int(d) and d >= 0 for d in dims):
        raise ValueError(f"shape must be non-negative integers, got {list(dims)}")
    if encoding == "int8" and not dims:
        raise ValueError("int8 encoding needs at least one dimension (dim 0 is the channel axis)")
    return tuple(int(d) for d in dims)


def _is_int(value: Any) -> bool:
    # numpy integers count (shapes often come from numpy); bool does not.
    return hasattr(value, "__index__") and not isinstance(value, bool)


# --- the whole handoff payload ------------------------------------------------------------------
# A handoff carries the latent at step k (and, after step 0, the multistep history x̂0) plus a
# header that is fixed by (latent shape, codec, k) alone: the request and the schedule travel as
# digests, since the device has both already (it computes its schedule from its own request and
# checks it against the edge's). So its size is known before anything is encoded.
HANDOFF_KIND = "tandem.handoff"
HANDOFF_VERSION = 2
DIGEST_CHARS = 64  # SHA-256, hex


def handoff_strategy(spec: CodecSpec, step: int, steps: int) -> str:
    """The tensors actually sent: "exact" when not merging; "denoised" (x̂0 and the noise apart)
    needs x̂0 (after step 0) and some noise left (before the last step); else "latent"."""
    if spec.merge_ratio == 0.0:
        return "exact"
    if spec.strategy == "denoised" and 0 < step < steps:
        return "denoised"
    return "latent"


def handoff_tensors(channels: int, height: int, width: int, spec: CodecSpec, step: int,
                    steps: int) -> tuple[str, list[tuple[str, list[int]]]]:
    """(strategy, [(tensor name, shape)]) of a handoff at step ``step`` of ``steps``."""
    strategy = handoff_strategy(spec, step, steps)
    if strategy == "denoised":
        names = ["denoised", "noise"]
    else:
        names = ["latent", "prev_denoised"] if step > 0 else ["latent"]
    if strategy == "exact":
        shape = [channels, height, width]
    else:
        shape = [channels, height * width - merge_count(height, width, spec.merge_ratio)]
    return strategy, [(name, shape) for name in names]


def handoff_meta(request_digest: str, schedule_digest: str, step: int, latent_shape: Sequence[int],
                 spec: CodecSpec, strategy: str, tensors: list[tuple[str, list[int]]]) -> dict[str, Any]:
    """The handoff's header, as written (its JSON is part of the payload's size)."""
    return {
        "kind": HANDOFF_KIND,
        "handoff_version": HANDOFF_VERSION,
        "request": request_digest,
        "schedule": schedule_digest,
        "step": step,
        "latent_shape": [int(x) for x in latent_shape],
        "codec": spec.to_dict(),
        "strategy": strategy,
        "shapes": {name: list(shape) for name, shape in tensors},
    }


def handoff_blob_sizes(channels: int, height: int, width: int, spec: CodecSpec, step: int,
                       steps: int) -> list[tuple[str, int]]:
    """(name, bytes) of the payload's blobs in the order they are written."""
    strategy, tensors = handoff_tensors(channels, height, width, spec, step, steps)
    plan = [] if strategy == "exact" else [
        ("plan", packed_plan_size(height, width, spec.window, merge_count(height, width, spec.merge_ratio)))]
    return plan + [(name, encoded_size(shape, spec.encoding)) for name, shape in tensors]


def handoff_size(channels: int, height: int, width: int, spec: CodecSpec, steps: int, step: int) -> int:
    """Exact bytes of the handoff payload at step ``step`` of ``steps`` (what encode_handoff writes)."""
    spec.validate()
    strategy, tensors = handoff_tensors(channels, height, width, spec, step, steps)
    meta = handoff_meta("0" * DIGEST_CHARS, "0" * DIGEST_CHARS, step, (channels, height, width), spec, strategy,
                        tensors)
    return container_size(meta, handoff_blob_sizes(channels, height, width, spec, step, steps))
