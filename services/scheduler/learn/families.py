"""Randomized profile families: seeded draws of (quality profile, cost profile, scenario) around
the measured demo-pack profiles and the synthetic SD-scale ones, to train one policy that serves
profiles it has never seen (the observation carries the profile's summary, see
:mod:`services.scheduler.decide.features`).

A draw varies what differs between deployments:

* cost: the edge's a + b·n (each ×⅓..×3 around its base), the device classes (the base's, each
  scaled ×½..×2, some dropped, sometimes a new one from 10 ms to 2 s per step), the round trip,
  the batch cap and the latent size (handoff bytes);
* quality: either a base measured profile warped (a power curve and a level, a little noise per
  grid node) or a parametric curve shaped like the synthetic one with random constants (how fast
  quality saturates in T, what the small model alone reaches, how early the large model's steps
  pay off, how much a personal style needs device steps, what merging costs);
* link mix and users: the band, the users' distances, the device mix, budgets and the share of
  personalized users.

    family = ProfileFamily.around_defaults()
    draw = family.draw(np.random.default_rng(7))        # ProfileDraw(quality, costs, scenario, name)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from services.scheduler.decide.channel import ChannelConfig
from services.scheduler.decide.costs import CostProfile, DeviceClass, EdgeCoefficients, LatentShape
from services.scheduler.decide.quality import (
    BASE_USER,
    PERSONALIZED_USER,
    SYNTHETIC_FRACTIONS,
    QualityPoint,
    QualityProfile,
    synthetic_profile,
)
from services.scheduler.decide.scenario import DEFAULT_SCENARIO, ScenarioConfig, scenario_for

GRID_STEPS = (5, 10, 15, 20, 25, 30, 50)
GRID_RATIOS = (0.0, 0.25, 0.5, 0.75)
LATENTS = (LatentShape(4, 8, 8), LatentShape(4, 32, 32), LatentShape(4, 64, 64), LatentShape(4, 96, 96))


@dataclass(frozen=True, eq=False)
class ProfileDraw:
    quality: QualityProfile
    costs: CostProfile
    scenario: ScenarioConfig
    name: str


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclass(frozen=True, eq=False)
class ProfileFamily:
    """Draws around ``bases``: (quality, costs) pairs, e.g. the measured demo and the synthetic."""

    bases: tuple[tuple[QualityProfile, CostProfile], ...]
    parametric_prob: float = 0.5  # share of draws with a parametric quality curve
    new_class_prob: float = 0.5

    @classmethod
    def around_defaults(cls) -> "ProfileFamily":
        from services.scheduler.defaults import DEFAULT_QUALITY, DEMO_COSTS

        bases = [(synthetic_profile(), CostProfile())]
        if DEFAULT_QUALITY.is_file() and DEMO_COSTS.is_file():
            bases.append((QualityProfile.load(DEFAULT_QUALITY), CostProfile.load(DEMO_COSTS)))
        return cls(tuple(bases))

    def draw(self, rng: np.random.Generator) -> ProfileDraw:
        base_q, base_c = self.bases[int(rng.integers(len(self.bases)))]
        costs = _draw_costs(rng, base_c, self.new_class_prob)
        parametric = rng.random() < self.parametric_prob
        quality = _parametric_quality(rng) if parametric else _warped_quality(rng, base_q)
        scenario = _draw_scenario(rng, quality, costs)
        name = f"{'parametric' if parametric else 'warped'} quality, {len(costs.devices)} device classes"
        return ProfileDraw(quality, costs, scenario, name)

    def pool(self, seed: int, size: int) -> list[ProfileDraw]:
        rng = np.random.default_rng(seed)
        return [self.draw(rng) for _ in range(size)]


def _draw_costs(rng: np.random.Generator, base: CostProfile, new_class_prob: float) -> CostProfile:
    edge = base.edge_coefficients()
    a = edge.a_s * _log_uniform(rng, 1 / 3, 3)
    b = edge.b_s * _log_uniform(rng, 1 / 3, 3)
    devices = {name: DeviceClass(d.step_s * (s := _log_uniform(rng, 0.5, 2)), d.decode_s * s * _log_uniform(rng, 0.7, 1.4),
                                 d.power_w * _log_uniform(rng, 0.5, 2))
               for name, d in base.devices.items() if rng.random() < 0.75}
    if not devices or rng.random() < new_class_prob:
        step = _log_uniform(rng, 0.01, 2.0)
        devices[f"class-{int(rng.integers(1000))}"] = DeviceClass(step, step * rng.uniform(1.0, 3.0),
                                                                  _log_uniform(rng, 3.0, 60.0))
    return CostProfile(edge={"large": EdgeCoefficients(a, b)}, devices=devices,
                       latent=LATENTS[int(rng.integers(len(LATENTS)))] if rng.random() < 0.5 else base.latent,
                       rtt_s=base.rtt_s * _log_uniform(rng, 0.5, 4.0), max_batch=int(rng.choice([8, 16, 32, 64])),
                       synthetic=True)


def _grid_profile(users: dict[str, object], metric: str) -> QualityProfile:
    points = {name: tuple(QualityPoint(t, f, r, float(np.clip(fn(t, f, r), 0.0, 1.0)))  # type: ignore[operator]
                          for t in GRID_STEPS for f in SYNTHETIC_FRACTIONS for r in GRID_RATIOS)
              for name, fn in users.items()}
    return QualityProfile({"large+small": points}, synthetic=True, metric=metric)


def _parametric_quality(rng: np.random.Generator) -> QualityProfile:
    """synthetic_accuracy's shape with random constants."""
    tau = rng.uniform(2.0, 14.0)  # steps to saturate
    top = rng.uniform(0.6, 1.0)  # the large model's quality
    small = rng.uniform(0.25, 0.9)  # the small model alone, relative to the large
    early = _log_uniform(rng, 0.2, 1.5)  # < 1: the first large steps pay off most
    style_need = rng.uniform(0.2, 0.7)  # device share a personal style needs
    style_floor = rng.uniform(0.1, 0.8)  # quality left with no device steps
    merge = _log_uniform(rng, 0.2, 4.0)

    def curve(personalized: bool):
        def acc(t: float, f: float, r: float) -> float:
            q = top * (1 - math.exp(-t / tau)) * (small + (1 - small) * f ** early)
            if personalized:
                q *= style_floor + (1 - style_floor) * min(1.0, (1 - f) / style_need)
            return q - (merge * (0.03 * r + 0.05 * r * r) * (1 + f) if f > 0 else 0.0)
        return acc

    return _grid_profile({BASE_USER: curve(False), PERSONALIZED_USER: curve(True)}, "parametric family draw")


def _warped_quality(rng: np.random.Generator, base: QualityProfile) -> QualityProfile:
    """The base profile's points through a random power curve and level, with a little noise."""
    gamma, level, noise = _log_uniform(rng, 0.5, 2.0), rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.03)
    pair = base.default_pair
    points = {user: tuple(replace(p, accuracy=float(np.clip(level * max(p.accuracy, 0.0) ** gamma
                                                            + rng.normal(0.0, noise), 0.0, 1.0)))
                          for p in pts)
              for user, pts in base.points[pair].items()}
    return QualityProfile({pair: points}, synthetic=True, metric="warped family draw")


def _draw_scenario(rng: np.random.Generator, quality: QualityProfile, costs: CostProfile) -> ScenarioConfig:
    base = scenario_for(quality, costs, DEFAULT_SCENARIO)
    mix = tuple((name, float(w)) for (name, _), w in zip(base.device_mix, rng.dirichlet(np.ones(len(base.device_mix)))))
    far = _log_uniform(rng, 0.3, 3.0)
    lo_budget = _log_uniform(rng, 2.5, 8.0)
    return replace(base, device_mix=mix, distance_km=(0.05, far),
                   channel=ChannelConfig(bandwidth_hz=_log_uniform(rng, 5e6, 40e6)),
                   personalized_prob=rng.uniform(0.0, 0.7),
                   latency_budget_s=(lo_budget, lo_budget * _log_uniform(rng, 3.0, 8.0)),
                   edge_capacity=(rng.uniform(0.2, 0.5), 1.0))
