"""Users of a frame and the seeded scenario generator that samples heterogeneous frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from services.scheduler.decide.channel import ChannelConfig, sample_spectral_efficiency
from services.scheduler.decide.quality import BASE_USER, PERSONALIZED_USER


@dataclass(frozen=True, slots=True)
class UserSpec:
    """One request of a frame as the scheduler sees it."""

    user_id: str
    device_class: str
    spectral_efficiency: float  # b/s/Hz of this user's downlink over the whole band
    personalized: bool = False
    profile_user: str = BASE_USER  # whose entry of the quality profile applies
    latency_budget_s: float = math.inf
    energy_budget_j: float = math.inf
    rtt_s: float | None = None  # the device's own round-trip estimate (None: the cost profile's)
    # True: spectral_efficiency x the band is this user's own rate (a measured or typed bit rate:
    # its own link), not a share of a band the frame's users split among themselves.
    own_link: bool = False
    # The user's own measured under-prediction (calibration.UserMargins): its plans aim at its
    # budget / (1 + margin) when that is below the frame's headroom. Feasibility ignores both.
    budget_margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.spectral_efficiency > 0:
            raise ValueError(f"user {self.user_id!r}: spectral_efficiency must be > 0")
        if not (self.latency_budget_s > 0 and self.energy_budget_j > 0):
            raise ValueError(f"user {self.user_id!r}: budgets must be > 0")


@dataclass(frozen=True)
class FrameContext:
    """What the frame shares: the edge GPU (fraction available) and the downlink band."""

    bandwidth_hz: float = 10e6
    edge_capacity: float = 1.0  # fraction of the edge GPU available to this frame
    pair: str | None = None  # quality-profile pack pair (None: the profile's first)
    edge_pack: str | None = None  # cost-profile edge pack (None: the first)


@dataclass(frozen=True)
class ObjectiveConfig:
    """utility_i = quality_i − λ_lat·latency_i − λ_en·energy_i; a user over its latency budget
    costs ``violation_penalty`` + the relative overshoot in the frame objective."""

    latency_weight: float = 0.03  # per second
    energy_weight: float = 0.002  # per joule
    violation_penalty: float = 1.0
    # Plans aim at (1 - headroom) x each latency budget at most: a prediction is a median, and a
    # plan placed right at the budget misses it about half the time (bench/links.py). A user's
    # own margin, when measured larger, takes its place (UserSpec.budget_margin).
    budget_headroom: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget_headroom < 1.0:
            raise ValueError(f"budget_headroom must be in [0, 1), got {self.budget_headroom}")


@dataclass(frozen=True)
class ScenarioConfig:
    n_users: tuple[int, int] = (1, 100)  # inclusive range
    n_users_log_uniform: bool = True  # small frames as often as large ones (per decade)
    device_mix: tuple[tuple[str, float], ...] = (("laptop-gpu", 0.3), ("phone", 0.5), ("cpu", 0.2))
    distance_km: tuple[float, float] = (0.05, 1.5)
    personalized_prob: float = 0.4
    latency_budget_s: tuple[float, float] = (4.0, 25.0)  # log-uniform
    energy_budget_j: tuple[float, float] = (20.0, 400.0)  # log-uniform
    unbounded_prob: float = 0.1  # share of users without budgets
    edge_capacity: tuple[float, float] = (0.3, 1.0)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    # Budgets are at least ``budget_floor`` × what the user's own device needs for ``min_steps``
    # steps alone, so a frame always has a feasible plan (everyone local) and violations are avoidable.
    budget_floor: float = 1.1
    min_steps: int = 10
    # Quality-profile entries a personalized user is drawn from (a measured profile names its
    # users, e.g. the demo pack's alice and bob; the synthetic one has a single "personalized").
    personalized_profiles: tuple[str, ...] = (PERSONALIZED_USER,)


DEFAULT_SCENARIO = ScenarioConfig()
_UNKNOWN_CLASS_WEIGHT = 0.25


def scenario_for(quality, costs, base: ScenarioConfig = DEFAULT_SCENARIO) -> ScenarioConfig:
    """``base`` adapted to the profiles a deployment runs with: every device class of ``costs``
    (the base mix's weights, 0.25 for a class it does not know, e.g. a measured ``cpu-demo``) and
    personalized users drawn from the quality profile's own users."""
    known = dict(base.device_mix)
    mix = tuple((name, known.get(name, _UNKNOWN_CLASS_WEIGHT)) for name in costs.devices)
    users = tuple(u for u in quality.users() if u != BASE_USER) or base.personalized_profiles
    return replace(base, device_mix=mix, personalized_profiles=users)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def sample_frame(rng: np.random.Generator, cfg: ScenarioConfig = DEFAULT_SCENARIO,
                 n_users: int | None = None, costs=None) -> tuple[list[UserSpec], FrameContext]:
    """A random frame; ``costs`` (default: the synthetic CostProfile) sets the budget floors."""
    from services.scheduler.decide.costs import CostProfile

    costs = costs or CostProfile()
    if n_users is not None:
        n = n_users
    elif cfg.n_users_log_uniform:
        lo, hi = cfg.n_users
        n = int(min(hi, np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))))
    else:
        n = int(rng.integers(cfg.n_users[0], cfg.n_users[1] + 1))
    names = [name for name, _ in cfg.device_mix]
    probs = np.array([p for _, p in cfg.device_mix], float)
    classes = rng.choice(len(names), size=n, p=probs / probs.sum())
    se = sample_spectral_efficiency(rng, rng.uniform(*cfg.distance_km, n), cfg.channel)
    personalized = rng.random(n) < cfg.personalized_prob
    # (drawn only when there is a choice, so the default scenario's random stream is unchanged)
    many = len(cfg.personalized_profiles) > 1
    profile = rng.integers(0, len(cfg.personalized_profiles), n) if many else np.zeros(n, int)
    lat = _log_uniform(rng, *cfg.latency_budget_s, n)
    energy = _log_uniform(rng, *cfg.energy_budget_j, n)
    unbounded = rng.random(n) < cfg.unbounded_prob
    devs = [costs.device(names[c]) for c in classes]
    local_s = np.array([d.compute_seconds(cfg.min_steps) for d in devs], float).reshape(n)
    local_j = np.array([d.energy_j(cfg.min_steps) for d in devs], float).reshape(n)
    lat = np.maximum(lat, cfg.budget_floor * local_s)
    energy = np.maximum(energy, cfg.budget_floor * local_j)
    users = [
        UserSpec(
            user_id=f"u{i}",
            device_class=names[classes[i]],
            spectral_efficiency=float(se[i]),
            personalized=bool(personalized[i]),
            profile_user=cfg.personalized_profiles[profile[i]] if personalized[i] else BASE_USER,
            latency_budget_s=math.inf if unbounded[i] else float(lat[i]),
            energy_budget_j=math.inf if unbounded[i] else float(energy[i]),
        )
        for i in range(n)
    ]
    ctx = FrameContext(bandwidth_hz=cfg.channel.bandwidth_hz, edge_capacity=float(rng.uniform(*cfg.edge_capacity)))
    return users, ctx
