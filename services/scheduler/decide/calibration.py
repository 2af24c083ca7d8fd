"""Robust online calibration: the cost model every user's plan shares, moved only by what many
reports agree on.

Each calibrated quantity (edge step-time scale per pack, device step and decode seconds per
device class, the round-trip time) is a trimmed mean of a window of recent samples that starts
with the profile's own value counted twice: the lowest and highest quarter (at least one each)
are dropped, so one report never moves it, a few hostile ones are trimmed away, and consistent
new measurements move it within a couple of reports. A compute-time sample more than
``outlier_factor`` away from the current estimate is rejected outright (no hardware drifts that
much between two reports); a round trip only beyond ``max_rtt_s`` (a profile measured on loopback
says little about a WAN's). Pure logic; the caller serializes calls.

:class:`UserLinks` is the other half: each user's own downlink (rate and round trip) from that
user's own reports, so a link is never one shared number and a bad measurement moves only the
plans of the user who sent it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from statistics import fmean
from typing import Any

from services.scheduler.decide.checks import as_list, count, numbers, require_keys
from services.scheduler.decide.costs import CostProfile, EdgeCoefficients, PhaseObservation
from tandem.link import MAX_BPS, MAX_RTT_S, MIN_BPS, LinkEstimate, LinkWindow
from tandem.lru import Lru

PRIOR_WEIGHT = 2  # the profile's value as this many samples: a lone sample is always trimmed
WINDOW = 32
OUTLIER_FACTOR = 100.0
MAX_LINK_USERS = 10_000  # users whose links are remembered; the least recently reporting one goes


@dataclass
class _Estimate:
    samples: deque

    @classmethod
    def start(cls, prior: float, window: int) -> "_Estimate":
        return cls(deque([prior] * PRIOR_WEIGHT, maxlen=window))

    @property
    def value(self) -> float:
        ordered = sorted(self.samples)
        trim = max(1, len(ordered) // 4) if len(ordered) >= 3 else 0
        return fmean(ordered[trim:len(ordered) - trim])

    def add(self, sample: float, low: float, high: float) -> bool:
        """Keeps ``sample`` when finite and in [low, high] (and > 0); False when rejected."""
        if not (math.isfinite(sample) and sample > 0 and low <= sample <= high):
            return False
        self.samples.append(sample)
        return True


class RobustCalibrator:
    """``profile`` → :meth:`update` (observations) → the recalibrated profile."""

    def __init__(self, profile: CostProfile, window: int = WINDOW, outlier_factor: float = OUTLIER_FACTOR,
                 max_rtt_s: float = MAX_RTT_S):
        if window <= PRIOR_WEIGHT or not outlier_factor > 1:
            raise ValueError(f"calibration window must be > {PRIOR_WEIGHT} and outlier factor > 1")
        self.prior = profile
        self.window = window
        self.outlier_factor = outlier_factor
        self.max_rtt_s = max_rtt_s
        self._estimates: dict[tuple[str, str], _Estimate] = {}
        self.rejected = 0  # samples dropped as outliers

    def _estimate(self, key: tuple[str, str], prior: float) -> _Estimate:
        if key not in self._estimates:
            self._estimates[key] = _Estimate.start(prior, self.window)
        return self._estimates[key]

    def _add(self, key: tuple[str, str], prior: float, sample: float) -> None:
        estimate = self._estimate(key, prior)
        if key[0] == "rtt":
            low, high = 0.0, self.max_rtt_s
        elif (current := estimate.value) > 0:
            low, high = current / self.outlier_factor, current * self.outlier_factor
        else:  # a profile without this figure: anything physical teaches it
            low, high = 0.0, math.inf
        if not estimate.add(sample, low, high):
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
            elif o.phase == "device" and o.steps > 0 and o.device_class is not None and o.device_class in prior.devices:
                self._add(("step", o.device_class), prior.devices[o.device_class].step_s, o.seconds / o.steps)
            elif o.phase == "decode" and o.device_class is not None and o.device_class in prior.devices:
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

    # --- kept across restarts (services/scheduler/state.py) ------------------------------------
    def export(self) -> dict[str, Any]:
        """Plain JSON: every estimate's window of samples (the prior's copies included)."""
        return {"rejected": self.rejected,
                "estimates": [{"kind": kind, "name": name, "samples": list(estimate.samples)}
                              for (kind, name), estimate in self._estimates.items()]}

    @classmethod
    def restored(cls, profile: CostProfile, data: Any, window: int = WINDOW, outlier_factor: float = OUTLIER_FACTOR,
                 max_rtt_s: float = MAX_RTT_S) -> "RobustCalibrator":
        """A calibrator of ``profile`` holding what :meth:`export` gave (its last ``window`` samples
        each); ValueError naming what is wrong when ``data`` is not that."""
        calibrator = cls(profile, window, outlier_factor, max_rtt_s)
        require_keys(data, {"rejected", "estimates"}, "calibration")
        calibrator.rejected = count(data["rejected"], "calibration.rejected")
        for i, entry in enumerate(as_list(data["estimates"], "calibration.estimates")):
            where = f"calibration.estimates[{i}]"
            require_keys(entry, {"kind", "name", "samples"}, where)
            kind, name = entry["kind"], entry["name"]
            known = {"edge": profile.edge, "step": profile.devices, "decode": profile.devices, "rtt": {"": None}}
            if kind not in known or not isinstance(name, str) or name not in known[kind]:
                raise ValueError(f"{where}: no {kind!r} figure {name!r} in the cost profile")
            if (kind, name) in calibrator._estimates:
                raise ValueError(f"{where}: {kind} {name!r} twice")
            samples = numbers(entry["samples"], f"{where}.samples", low=0.0, high=math.inf, positive=True)
            if not samples:
                raise ValueError(f"{where}.samples: empty")
            calibrator._estimates[(kind, name)] = _Estimate(deque(samples, maxlen=window))
        return calibrator



class UserLinks:
    """Per user: a window of its own rates (handoff bits over the measured transfer seconds) and
    round trips (the round's fixed cost: what the edge's first step does not explain of the time
    before it, see ``live.core.measured_phases``), as tandem/link.py estimates a link. At most
    ``max_users`` users are kept (the least recently reporting forgotten), so a flood of
    identities bounds its own memory. Pure logic; the caller serializes calls."""

    def __init__(self, max_users: int = MAX_LINK_USERS):
        self._users: Lru[str, LinkWindow] = Lru(max_users)
        self.rejected = 0  # impossible samples dropped

    def __len__(self) -> int:
        return len(self._users)

    def observe(self, user: str, nbytes: int, transfer_s: float, rtt_s: float | None) -> None:
        """One report of ``user``: ``nbytes`` arrived in ``transfer_s``; ``rtt_s`` the round's fixed
        cost (None: not measured)."""
        window = self._users.peek(user) or LinkWindow()
        self._users.put(user, window)  # now the most recently reporting
        self.rejected += window.add(nbytes, transfer_s, rtt_s)

    def get(self, user: str) -> LinkEstimate:
        window = self._users.peek(user)
        return window.estimate() if window is not None else LinkEstimate()

    def export(self) -> list[dict[str, Any]]:
        """Plain JSON, the least recently reporting user first."""
        return [{"user": user, "rates": list(window.rates), "rtts": list(window.rtts)} for user, window in self._users.items()]

    @classmethod
    def restored(cls, data: Any, max_users: int = MAX_LINK_USERS) -> "UserLinks":
        """What :meth:`export` gave, each user's window its own (the most recent ``max_users`` users
        kept); ValueError naming what is wrong when ``data`` is not that."""
        links = cls(max_users)
        for i, entry in enumerate(as_list(data, "links")):
            where = f"links[{i}]"
            require_keys(entry, {"user", "rates", "rtts"}, where)
            user = _user(entry["user"], where, links._users)
            rates = numbers(entry["rates"], f"{where}.rates", low=MIN_BPS, high=MAX_BPS)
            rtts = numbers(entry["rtts"], f"{where}.rtts", low=0.0, high=MAX_RTT_S, positive=True)
            links._users.put(user, LinkWindow(rates, rtts))
        return links


MAX_MARGIN = 0.5  # a user's own margin never shrinks its target below budget / 1.5
# A plan over budget costs the objective more than any quality it gains (violation_penalty 1 vs
# option gaps of 0.01-0.15), so a user's target leaves room for nearly its worst recent error: the
# 90th percentile, the largest of a full window.
MARGIN_QUANTILE = 0.9
MARGIN_WINDOW = 10
MARGIN_MIN_SAMPLES = 3


class UserMargins:
    """Per user: how much slower than predicted its own plans ran (measured / predicted end to end,
    the last ``MARGIN_WINDOW`` reports run as planned). A user's margin, the 90th percentile of
    that ratio less 1 (from 3 reports on, within [0, MAX_MARGIN]), sets that user's own latency
    target, budget / (1 + margin), where that is below the frame's headroom, and nobody else's:
    one user's slow device or hostile reports make only its own plans more careful. Bounded like
    :class:`UserLinks`. Pure logic; the caller serializes."""

    def __init__(self, max_users: int = MAX_LINK_USERS):
        self._users: Lru[str, deque[float]] = Lru(max_users)

    def __len__(self) -> int:
        return len(self._users)

    def observe(self, user: str, measured_s: float, predicted_s: float) -> None:
        if not (math.isfinite(measured_s) and math.isfinite(predicted_s) and measured_s > 0 and predicted_s > 0):
            return
        window = self._users.peek(user) or deque(maxlen=MARGIN_WINDOW)
        window.append(min(measured_s / predicted_s, 1.0 + 2 * MAX_MARGIN))
        self._users.put(user, window)  # now the most recently reporting

    def export(self) -> list[dict[str, Any]]:
        """Plain JSON, the least recently reporting user first."""
        return [{"user": user, "ratios": list(window)} for user, window in self._users.items()]

    @classmethod
    def restored(cls, data: Any, max_users: int = MAX_LINK_USERS) -> "UserMargins":
        """What :meth:`export` gave, each user's ratios its own (the most recent ``max_users`` users
        kept); ValueError naming what is wrong when ``data`` is not that."""
        margins = cls(max_users)
        for i, entry in enumerate(as_list(data, "margins")):
            where = f"margins[{i}]"
            require_keys(entry, {"user", "ratios"}, where)
            user = _user(entry["user"], where, margins._users)
            ratios = numbers(entry["ratios"], f"{where}.ratios", low=0.0, high=1.0 + 2 * MAX_MARGIN, positive=True)
            margins._users.put(user, deque(ratios, maxlen=MARGIN_WINDOW))
        return margins

    def margin(self, user: str) -> float:
        window = self._users.peek(user)
        if window is None or len(window) < MARGIN_MIN_SAMPLES:
            return 0.0
        ratios = sorted(window)
        ratio = ratios[min(len(ratios) - 1, int(MARGIN_QUANTILE * len(ratios)))]
        return min(max(ratio - 1.0, 0.0), MAX_MARGIN)



def _user(value: Any, where: str, seen: Lru) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.user: expected a non-empty string")
    if value in seen:
        raise ValueError(f"{where}.user: {value!r:.60} twice")
    return value
