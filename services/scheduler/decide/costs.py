"""Cost models: edge step time vs batch size, device step/decode time per device class, handoff
bytes (exactly what ``tandem.handoff.encode_handoff`` writes, from ``tandem.codec.spec``), transfer time and device energy.

A :class:`CostProfile` is plain data, saved as JSON (a profiling command writes one from real
measurements) and recalibrated online from measured phase latencies by :func:`calibrate`.
The defaults are synthetic, Stable-Diffusion-scale planning figures (marked ``synthetic``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from services.scheduler.decide.channel import (  # noqa: F401  (re-exported: the channel is a cost model too)
    ChannelConfig,
    path_loss_db,
    sample_spectral_efficiency,
    shannon_rate_bps,
    snr_linear,
    spectral_efficiency,
)
from services.scheduler.decide.ranges import check, load_json, ranged
from tandem.codec.spec import ENCODINGS, CodecSpec, handoff_size
from tandem.stats import fit_linear

COST_FORMAT = "tandem.scheduler.costs"
COST_VERSION = 1


class CostProfileError(ValueError):
    """A cost profile file that does not follow the format."""


@dataclass(frozen=True)
class EdgeCoefficients:
    """Seconds for one denoising step of a batch of ``n`` requests: ``a_s + b_s * n``."""

    a_s: float = ranged(0)
    b_s: float = ranged(0, above=True)  # a request always costs the batch something (fit() keeps it >= 1e-6)

    def step_seconds(self, batch: float | np.ndarray):
        return self.a_s + self.b_s * np.asarray(batch)

    def per_request_step_seconds(self, batch: int | np.ndarray):
        """GPU seconds one request costs per step when ``batch`` requests share each step."""
        return self.a_s / np.maximum(np.asarray(batch), 1) + self.b_s

    @classmethod
    def fit(cls, batch: Sequence[float], per_step_seconds: Sequence[float]) -> tuple["EdgeCoefficients", float]:
        """Least squares a + b·batch over measured per-step seconds (two or more batch sizes),
        and its R². A negative intercept is noise, not a negative overhead: clamped at 0."""
        a, b, r2 = fit_linear(batch, per_step_seconds)
        return cls(max(a, 0.0), max(b, 1e-6)), r2


@dataclass(frozen=True)
class DeviceClass:
    """A kind of UE: small-model step time, VAE decode time, power while computing."""

    step_s: float = ranged(0, above=True)
    decode_s: float = ranged(0)
    power_w: float = ranged(0)

    def compute_seconds(self, device_steps: int | np.ndarray):
        return np.asarray(device_steps) * self.step_s + self.decode_s

    def energy_j(self, device_steps: int | np.ndarray):
        return self.power_w * self.compute_seconds(device_steps)


@dataclass(frozen=True)
class LatentShape:
    channels: int = ranged(1, default=4)
    height: int = ranged(1, default=64)
    width: int = ranged(1, default=64)


@dataclass(frozen=True)
class CostProfile:
    edge: Mapping[str, EdgeCoefficients] = field(
        default_factory=lambda: {"large": EdgeCoefficients(a_s=0.025, b_s=0.0075)}
    )
    devices: Mapping[str, DeviceClass] = field(
        default_factory=lambda: {
            "laptop-gpu": DeviceClass(step_s=0.12, decode_s=0.25, power_w=45.0),
            "phone": DeviceClass(step_s=0.45, decode_s=0.8, power_w=5.0),
            "cpu": DeviceClass(step_s=1.5, decode_s=2.0, power_w=30.0),
        }
    )
    latent: LatentShape = LatentShape()
    rtt_s: float = ranged(0, default=0.02)
    max_batch: int = ranged(1, default=32)
    synthetic: bool = True

    def edge_coefficients(self, pack: str | None = None) -> EdgeCoefficients:
        if pack is None:
            return next(iter(self.edge.values()))
        try:
            return self.edge[pack]
        except KeyError:
            raise CostProfileError(f"cost profile has no edge pack {pack!r}; it has {', '.join(self.edge)}") from None

    def device(self, device_class: str) -> DeviceClass:
        try:
            return self.devices[device_class]
        except KeyError:
            raise CostProfileError(
                f"cost profile has no device class {device_class!r}; it has {', '.join(self.devices)}"
            ) from None

    def handoff_bytes(self, steps: int, split: int, codec: str, merge_ratio: float) -> int:
        return handoff_bytes(self.latent, codec, merge_ratio, steps, split)

    def with_edge_load(self, others: float, pack: str | None = None) -> "CostProfile":
        """This profile for a frame whose edge already runs ``others`` requests (other frames' plans
        still on it): a step of the frame's n then costs a + b·(others + n), a fixed cost of
        a + b·others. ``others`` is capped so that the batch stays within max_batch."""
        if not others > 0:
            return self
        name = pack if pack is not None else next(iter(self.edge))
        coeff = self.edge_coefficients(name)
        extra = min(others, max(self.max_batch - 1, 0))
        return replace(self, edge={**self.edge, name: EdgeCoefficients(coeff.a_s + coeff.b_s * extra, coeff.b_s)})

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": COST_FORMAT,
            "version": COST_VERSION,
            "synthetic": self.synthetic,
            "edge": {k: {"a_s": v.a_s, "b_s": v.b_s} for k, v in self.edge.items()},
            "devices": {k: {"step_s": v.step_s, "decode_s": v.decode_s, "power_w": v.power_w}
                        for k, v in self.devices.items()},
            "latent": {"channels": self.latent.channels, "height": self.latent.height, "width": self.latent.width},
            "rtt_s": self.rtt_s,
            "max_batch": self.max_batch,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostProfile":
        """Reads a profile, every number checked against its field's range; the fitted handoff-metadata
        keys of earlier profilers (meta_base_bytes, meta_bytes_per_step, merge_meta_bytes) are
        ignored: handoff bytes are exact now."""
        form, version = (d.get("format"), d.get("version")) if isinstance(d, Mapping) else (None, None)
        if form != COST_FORMAT or version != COST_VERSION:
            raise CostProfileError(
                f"not a cost profile of format {COST_FORMAT!r} version {COST_VERSION}: "
                f"format={form!r} version={version!r}"
            )
        try:  # int fields take the JSON value as is: check() refuses 2.5, NaN or inf (int() truncates or overflows)
            profile = cls(
                edge={k: EdgeCoefficients(float(v["a_s"]), float(v["b_s"])) for k, v in d["edge"].items()},
                devices={k: DeviceClass(float(v["step_s"]), float(v["decode_s"]), float(v["power_w"]))
                         for k, v in d["devices"].items()},
                latent=LatentShape(d["latent"]["channels"], d["latent"]["height"], d["latent"]["width"]),
                rtt_s=float(d["rtt_s"]),
                max_batch=d["max_batch"],
                synthetic=bool(d.get("synthetic", False)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CostProfileError(f"malformed cost profile: {type(exc).__name__}: {exc}") from exc
        if not profile.edge or not profile.devices:
            raise CostProfileError("cost profile needs at least one edge pack and one device class")
        check(profile, "", CostProfileError)
        return profile

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        """The profile at ``path``; a bad one raises CostProfileError, one line naming the file."""
        return load_json(path, cls.from_dict, CostProfileError)


# --- handoff bytes and transfer -----------------------------------------------------------------
def handoff_bytes(
    latent: LatentShape,
    codec: str,
    merge_ratio: float,
    steps: int,
    split: int,
) -> int:
    """Payload bytes of the handoff at split ``split``, exactly what the edge will write
    (``tandem.codec.spec.handoff_size``); 0 when nothing is sent (k = 0)."""
    if split <= 0:
        return 0
    if codec not in ENCODINGS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(ENCODINGS)}")
    return handoff_size(latent.channels, latent.height, latent.width, CodecSpec(codec, merge_ratio), steps, split)


def transfer_seconds(nbytes: float | np.ndarray, rate_bps: float | np.ndarray, rtt_s: float = 0.0):
    """bytes / rate + RTT (0 when nothing is sent)."""
    nbytes = np.asarray(nbytes, dtype=float)
    return np.where(nbytes > 0, nbytes * 8.0 / np.asarray(rate_bps, dtype=float) + rtt_s, 0.0)


def device_energy_j(power_w: float, seconds: float | np.ndarray):
    """GPU-style energy: P·t."""
    return power_w * np.asarray(seconds)


def cpu_energy_j(cycles: float, freq_hz: float, kappa: float = 1e-28):
    """CMOS dynamic energy κ·C·f² for C cycles at frequency f."""
    return kappa * cycles * freq_hz**2


# --- online calibration ---------------------------------------------------------------------------
# What a calibration sample measures (the cost model's terms, not tandem.phases: edge compute, device
# steps, decode, and a transfer with its round trip).
CostTerm = Literal["edge", "device", "decode", "transfer"]


@dataclass(frozen=True)
class PhaseObservation:
    """A measured phase latency, as a UE reports it.

    edge: ``seconds`` for ``steps`` steps at batch size ``batch`` on pack ``pack`` (time-weighted:
    the requests on the edge during them, see services/scheduler/live/occupancy.py);
    device: ``seconds`` for ``steps`` small-model steps on ``device_class``;
    decode: VAE decode ``seconds`` on ``device_class``;
    transfer: ``seconds`` for ``nbytes`` at ``rate_bps`` (updates the RTT).
    """

    phase: CostTerm
    seconds: float
    steps: int = 0
    batch: float = 1.0
    pack: str | None = None
    device_class: str | None = None
    nbytes: int = 0
    rate_bps: float = 0.0
