"""Quality profiles: image quality (accuracy) of a plan as a function of (T, k/T, r), per pack
pair and per user, measured offline by the demo pack's evaluator (or synthetic until then).

JSON format::

    {"synthetic": false,                      # optional; true marks made-up numbers
     "random_weights": false,                 # optional; true: the packs' weights are random, so
                                              # there is no quality: every point is the same (flat)
     "metric": "evaluator accuracy",          # optional free text
     "pairs": {"<large>+<small>": {"users": {"<user or base>": {"points": [
         {"steps": 20, "split_fraction": 0.5, "merge_ratio": 0.0, "accuracy": 0.81}, ...]}}}}}

Points of one user should cover a grid (every combination of the steps, split fractions and merge
ratios that occur); missing grid nodes are filled from the nearest measured point. Between grid
nodes the accuracy is interpolated multilinearly; outside, it is clamped to the nearest edge.
A user without an entry uses "base".

A profile with ``random_weights`` (tandem-onboard on packs whose manifests say ``random: true``) is
a statement that the pair has no quality to measure: its points must all be equal and its codec
losses 0, so every option scores the same and a planner ranks options by their costs alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.decide.ranges import check, load_json, ranged
from tandem.codec.spec import ENCODINGS as CODECS

BASE_CODEC = "fp16"  # the codec a profile's points are measured with
PRICED_CODECS = tuple(c for c in CODECS if c != BASE_CODEC)  # those a profile may price (codec_loss)

BASE_USER = "base"


class QualityProfileError(ValueError):
    """A quality profile file that does not follow the format."""


@dataclass(frozen=True)
class QualityPoint:
    steps: int = ranged(1)
    split_fraction: float = ranged(0, 1)
    merge_ratio: float = ranged(0, 1, below=True)
    accuracy: float = ranged(-1, 1)  # an evaluator's accuracy is in [0, 1], the SSIM fidelity in [-1, 1]


@dataclass(frozen=True, eq=False)
class _Grid:
    steps: np.ndarray
    fractions: np.ndarray
    ratios: np.ndarray
    values: np.ndarray  # [len(steps), len(fractions), len(ratios)]

    @classmethod
    def from_points(cls, points: tuple[QualityPoint, ...]) -> "_Grid":
        steps = np.array(sorted({float(p.steps) for p in points}))
        fracs = np.array(sorted({p.split_fraction for p in points}))
        ratios = np.array(sorted({p.merge_ratio for p in points}))
        values = np.full((len(steps), len(fracs), len(ratios)), np.nan)
        for p in points:
            values[np.searchsorted(steps, p.steps), np.searchsorted(fracs, p.split_fraction),
                   np.searchsorted(ratios, p.merge_ratio)] = p.accuracy
        if np.isnan(values).any():  # fill holes from the nearest measured point (normalized axes)
            coords = np.array([[p.steps, p.split_fraction, p.merge_ratio] for p in points], float)
            acc = np.array([p.accuracy for p in points])
            span = np.maximum(coords.max(0) - coords.min(0), 1e-9)
            for idx in zip(*np.nonzero(np.isnan(values))):
                here = np.array([steps[idx[0]], fracs[idx[1]], ratios[idx[2]]])
                values[idx] = acc[np.argmin((((coords - here) / span) ** 2).sum(1))]
        return cls(steps, fracs, ratios, values)

    def __call__(self, steps: float, fraction: float, ratio: float) -> float:
        out = self.values
        for axis_values, x in ((self.steps, steps), (self.fractions, fraction), (self.ratios, ratio)):
            i, w = _bracket(axis_values, x)
            out = out[i] * (1 - w) + out[min(i + 1, len(axis_values) - 1)] * w
        return float(out)


def _bracket(axis: np.ndarray, x: float) -> tuple[int, float]:
    if len(axis) == 1 or x <= axis[0]:
        return 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 1, 0.0
    i = int(np.searchsorted(axis, x, side="right")) - 1
    return i, float((x - axis[i]) / (axis[i + 1] - axis[i]))


@dataclass(frozen=True, eq=False)
class QualityProfile:
    """Accuracy per (pair, user) as interpolating grids."""

    points: Mapping[str, Mapping[str, tuple[QualityPoint, ...]]]
    synthetic: bool = False
    metric: str = "accuracy"
    # Accuracy a handoff codec loses against the points' own (fp16), measured (tandem-onboard
    # --codecs): only codecs measured here are offered to the planner, priced by their loss.
    codec_loss: Mapping[str, float] = ranged(0, default_factory=dict)
    # The packs' weights are random (their manifests say so): there is no quality, and the points
    # say none (all equal), so options are ranked by their costs alone.
    random_weights: bool = False
    _grids: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise QualityProfileError("quality profile has no pairs")
        for codec in self.codec_loss:
            if codec not in PRICED_CODECS:
                raise QualityProfileError(f"codec_loss: unknown codec {codec!r} (known: {', '.join(PRICED_CODECS)})")
        check(self, "", QualityProfileError)  # codec_loss (the points below, each named by its JSON key)
        for pair, users in self.points.items():
            if not users:
                raise QualityProfileError(f"pair {pair!r} has no users")
            for user, pts in users.items():
                if not pts:
                    raise QualityProfileError(f"pair {pair!r} user {user!r} has no points")
                for i, point in enumerate(pts):
                    check(point, f"pairs.{pair}.users.{user}.points[{i}]", QualityProfileError)
                self._grids[(pair, user)] = _Grid.from_points(tuple(pts))
        if self.random_weights:
            values = {p.accuracy for users in self.points.values() for pts in users.values() for p in pts}
            if len(values) > 1 or any(loss != 0 for loss in self.codec_loss.values()):
                raise QualityProfileError("random_weights: a profile for random weights has no quality to rank "
                                          "options by: its points must all be equal and its codec losses 0")

    @property
    def has_quality(self) -> bool:
        """False for a profile of random weights: its accuracy is the same for every option."""
        return not self.random_weights

    @property
    def pairs(self) -> tuple[str, ...]:
        return tuple(self.points)

    @property
    def default_pair(self) -> str:
        return next(iter(self.points))

    def users(self, pair: str | None = None) -> tuple[str, ...]:
        return tuple(self.points[pair or self.default_pair])

    def resolve_user(self, user: str, pair: str | None = None) -> str:
        users = self.points[self._pair(pair)]
        if user in users:
            return user
        if BASE_USER in users:
            return BASE_USER
        raise QualityProfileError(f"pair {self._pair(pair)!r} has no user {user!r} and no {BASE_USER!r}")

    @property
    def codecs(self) -> tuple[str, ...]:
        """The handoff codecs this profile prices: fp16 and those with a measured loss."""
        return (BASE_CODEC, *sorted(self.codec_loss))

    def accuracy(self, steps: float, split_fraction: float, merge_ratio: float,
                 user: str = BASE_USER, pair: str | None = None, codec: str = BASE_CODEC) -> float:
        pair = self._pair(pair)
        value = self._grids[(pair, self.resolve_user(user, pair))](steps, split_fraction, merge_ratio)
        if codec == BASE_CODEC or split_fraction <= 0:  # k = 0 sends nothing: no codec applies
            return value
        if codec not in self.codec_loss:
            raise QualityProfileError(f"quality profile has no measured loss for codec {codec!r} "
                                      f"(it prices {', '.join(self.codecs)})")
        return value - self.codec_loss[codec]

    def _pair(self, pair: str | None) -> str:
        if pair is None:
            return self.default_pair
        if pair not in self.points:
            raise QualityProfileError(f"quality profile has no pair {pair!r}; it has {', '.join(self.points)}")
        return pair

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "synthetic": self.synthetic,
            **({"random_weights": True} if self.random_weights else {}),
            "metric": self.metric,
            "pairs": {pair: {"users": {user: {"points": [
                {"steps": p.steps, "split_fraction": p.split_fraction, "merge_ratio": p.merge_ratio,
                 "accuracy": p.accuracy} for p in pts]} for user, pts in users.items()}}
                for pair, users in self.points.items()},
            **({"codec_loss": dict(self.codec_loss)} if self.codec_loss else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "QualityProfile":
        try:
            pairs = data["pairs"]
            points = {
                str(pair): {
                    str(user): tuple(_point(p) for p in entry["points"])
                    for user, entry in body["users"].items()
                }
                for pair, body in pairs.items()
            }
            codec_loss = {str(c): float(v) for c, v in dict(data.get("codec_loss", {})).items()}
            random_weights = data.get("random_weights", False)
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
            raise QualityProfileError(f"malformed quality profile: {type(exc).__name__}: {exc}") from exc
        if not isinstance(random_weights, bool):
            raise QualityProfileError(f"random_weights = {random_weights!r}: must be true or false")
        return cls(points, bool(data.get("synthetic", False)), str(data.get("metric", "accuracy")), codec_loss,
                   random_weights)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "QualityProfile":
        """The profile at ``path``; a bad one raises QualityProfileError, one line naming the file."""
        return load_json(path, cls.from_dict, QualityProfileError)


def _point(p: Any) -> QualityPoint:
    """Steps as written: the profile's check refuses 2.5, NaN or inf (int() truncates or overflows)."""
    return QualityPoint(p["steps"], float(p["split_fraction"]), float(p["merge_ratio"]), float(p["accuracy"]))


# --- random weights: no quality ---------------------------------------------------------------
RANDOM_WEIGHTS_METRIC = ("none: the packs' weights are random (their manifests say random: true), so their images "
                         "are noise and there is no quality to measure; every option scores the same and the "
                         "scheduler plans by cost alone")


def random_weights_profile(pair: str, users: tuple[str, ...] = (BASE_USER,),
                           codecs: tuple[str, ...] = ()) -> QualityProfile:
    """The quality profile of a pair with random weights: it says there is none. One point per
    user (accuracy 0 for every option: flat), and each of ``codecs`` priced at no loss, so a
    planner that chooses codecs ranks them by their bytes alone."""
    flat = (QualityPoint(1, 0.0, 0.0, 0.0),)
    return QualityProfile({pair: {user: flat for user in users}}, metric=RANDOM_WEIGHTS_METRIC,
                          codec_loss={codec: 0.0 for codec in codecs}, random_weights=True)


# --- synthetic default ------------------------------------------------------------------------
SYNTHETIC_PAIR = "large+small"
PERSONALIZED_USER = "personalized"


def synthetic_accuracy(steps: float, split_fraction: float, merge_ratio: float, personalized: bool) -> float:
    """Made-up but shaped like the papers: more steps and more large-model steps help; a personal
    style (LoRA on the device) needs >= 40% of the steps on the device; merging costs a little,
    more when the merged latent is closer to the final image."""
    f, r = split_fraction, merge_ratio
    steps_term = 1.0 - math.exp(-steps / 9.0)
    acc = steps_term * (0.70 + 0.25 * f)
    if personalized:
        style = min(1.0, (1.0 - f) / 0.4)
        acc *= 0.55 + 0.45 * style
    if f > 0:
        acc -= (0.03 * r + 0.05 * r * r) * (1.0 + f)
    return round(acc, 6)


SYNTHETIC_FRACTIONS: tuple[float, ...] = tuple(n / 20 for n in range(21))


def synthetic_profile(
    steps: tuple[int, ...] = (5, 10, 15, 20, 25, 30, 50),
    fractions: tuple[float, ...] = SYNTHETIC_FRACTIONS,
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
) -> QualityProfile:
    """The default profile (marked synthetic) with users "base" and "personalized"."""
    users = {
        name: tuple(QualityPoint(t, f, r, synthetic_accuracy(t, f, r, name == PERSONALIZED_USER))
                    for t in steps for f in fractions for r in ratios)
        for name in (BASE_USER, PERSONALIZED_USER)
    }
    return QualityProfile({SYNTHETIC_PAIR: users}, synthetic=True, metric="synthetic accuracy")


def load_or_synthetic(path: str | Path | None) -> QualityProfile:
    """The measured profile at ``path`` when there is one, else the synthetic default
    (``profile.synthetic`` tells which; callers should say so in their output)."""
    if path is not None and Path(path).exists():
        return QualityProfile.load(path)
    return synthetic_profile()
