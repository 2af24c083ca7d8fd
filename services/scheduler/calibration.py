"""Robust online calibration: the cost model every user's plan shares, moved only by what many
reports agree on.

Each calibrated quantity (edge step-time scale per pack, device step and decode seconds per
device class, the round-trip time) is the median of a window of recent samples that starts with
the profile's own value counted twice, so one report never moves it, and three consistent ones
do. A sample more than ``outlier_factor`` away from the current estimate is rejected outright
(no physical drift is that large between two reports). Pure logic; the caller serializes calls.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from statistics import median
from typing import Iterable

from services.scheduler.costs import CostProfile, EdgeCoefficients, PhaseObservation

PRIOR_WEIGHT = 2  # the profile's value as this many samples: a lone sample never moves the median
WINDOW = 32
OUTLIER_FACTOR = 20.0


@dataclass
class _Estimate:
    samples: deque

    @classmethod
    def start(cls, prior: float, window: int) -> "_Estimate":
        return cls(deque([prior] * PRIOR_WEIGHT, maxlen=window))

    @property
    def value(self) -> float:
        return median(self.samples)

    def add(self, sample: float, outlier_factor: float) -> bool:
        current = self.value
        near = current <= 0 or current / outlier_factor <= sample <= current * outlier_factor
        if not (math.isfinite(sample) and sample > 0 and near):
            return False
        self.samples.append(sample)
        return True


class RobustCalibrator:
    """``profile`` → :meth:`update` (observations) → the recalibrated profile."""

    def __init__(self, profile: CostProfile, window: int = WINDOW, outlier_factor: float = OUTLIER_FACTOR):
        if window <= PRIOR_WEIGHT or not outlier_factor > 1:
            raise ValueError(f"calibration window must be > {PRIOR_WEIGHT} and outlier factor > 1")
        self.prior = profile
        self.window = window
        self.outlier_factor = outlier_factor
        self._estimates: dict[tuple[str, str], _Estimate] = {}
        self.rejected = 0  # samples dropped as outliers (a metric for operators)

    def _estimate(self, key: tuple[str, str], prior: float) -> _Estimate:
        if key not in self._estimates:
            self._estimates[key] = _Estimate.start(prior, self.window)
        return self._estimates[key]

    def _add(self, key: tuple[str, str], prior: float, sample: float) -> None:
        if not self._estimate(key, prior).add(sample, self.outlier_factor):
            self.rejected += 1

    def update(self, observations: Iterable[PhaseObservation]) -> CostProfile:
        prior = self.prior
        for o in observations:
            if not (math.isfinite(o.seconds) and o.seconds > 0):
                continue
            if o.phase == "edge" and o.steps > 0:
                pack = o.pack or next(iter(prior.edge))
                predicted = float(prior.edge_coefficients(pack).step_seconds(max(o.batch, 1)))
                self._add(("edge", pack), 1.0, o.seconds / o.steps / predicted)  # a scale of the profile's a and b
            elif o.phase == "device" and o.steps > 0 and o.device_class in prior.devices:
                self._add(("step", o.device_class), prior.devices[o.device_class].step_s, o.seconds / o.steps)
            elif o.phase == "decode" and o.device_class in prior.devices:
                self._add(("decode", o.device_class), prior.devices[o.device_class].decode_s, o.seconds)
            elif o.phase == "transfer" and o.rate_bps > 0:
                self._add(("rtt", ""), prior.rtt_s, o.seconds - o.nbytes * 8.0 / o.rate_bps)
        return self.profile()

    def profile(self) -> CostProfile:
        """The prior with every estimate applied."""
        p = self.prior
        edge = dict(p.edge)
        devices = dict(p.devices)
        rtt = p.rtt_s
        for (kind, name), estimate in self._estimates.items():
            value = estimate.value
            if kind == "edge":
                old = p.edge_coefficients(name)
                edge[name] = EdgeCoefficients(old.a_s * value, old.b_s * value)
            elif kind == "step":
                devices[name] = replace(devices[name], step_s=value)
            elif kind == "decode":
                devices[name] = replace(devices[name], decode_s=value)
            else:
                rtt = value
        return replace(p, edge=edge, devices=devices, rtt_s=rtt)
