"""The trained scheduling policy as plain data: an MLP actor (safetensors weights, no pickle) and
a JSON config (observation features, action count, option table). Inference is a few small matrix
products per user (numpy only; services/scheduler/learn/torch_bridge.py converts to and from torch modules).

    policy = SchedulerPolicy.load("services/scheduler/policies/default")
    selection = policy(problem)          # one option index per user, masked, greedy

Loading a file whose config does not match this code (features, option table, shapes) raises
:class:`PolicyFormatError` saying what differs. A policy of an older feature version (one whose
static features are a subset of today's, by name, with the same dynamic features) still loads:
it reads its own columns of the observation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.scheduler.decide.features import (
    DYNAMIC_FEATURES,
    FEATURE_VERSION,
    FEATURES,
    OBS_DIM,
    STATIC_FEATURES,
    SUPPORTED_FEATURE_VERSIONS,
    SequentialState,
)
from services.scheduler.decide.options import OptionTable
from services.scheduler.decide.problem import FrameProblem

POLICY_FORMAT = "tandem.scheduler.policy"
POLICY_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "actor.safetensors"
ACTIVATIONS = ("tanh", "relu")


class PolicyFormatError(ValueError):
    """A saved policy that this code cannot use (wrong format, features, options or shapes)."""


@dataclass(frozen=True)
class PolicyConfig:
    obs_dim: int
    n_actions: int
    hidden: tuple[int, ...]
    activation: str
    features: tuple[str, ...]
    feature_version: int
    options: OptionTable
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "obs_dim": self.obs_dim,
                "n_actions": self.n_actions, "hidden": list(self.hidden), "activation": self.activation,
                "features": list(self.features), "feature_version": self.feature_version,
                "options": self.options.to_list(), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any) -> "PolicyConfig":
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise PolicyFormatError(f"not a scheduler policy config (format {POLICY_FORMAT!r} expected)")
        if d.get("version") != POLICY_VERSION:
            raise PolicyFormatError(f"policy config version {d.get('version')!r}, this code reads {POLICY_VERSION}")
        try:
            return cls(int(d["obs_dim"]), int(d["n_actions"]), tuple(int(h) for h in d["hidden"]),
                       str(d["activation"]), tuple(str(f) for f in d["features"]), int(d["feature_version"]),
                       OptionTable.from_list(d["options"]), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyFormatError(f"malformed policy config: {type(exc).__name__}: {exc}") from exc

    def check(self, options: OptionTable | None = None) -> None:
        """Raise PolicyFormatError unless this config fits the current code (and ``options``)."""
        problems = []
        static, dynamic = self.features[:-len(DYNAMIC_FEATURES)], self.features[-len(DYNAMIC_FEATURES):]
        unknown = sorted(set(static) - set(STATIC_FEATURES))
        if (self.feature_version not in SUPPORTED_FEATURE_VERSIONS or dynamic != DYNAMIC_FEATURES or unknown
                or len(set(static)) != len(static)):
            problems.append(f"features (v{self.feature_version}, {len(self.features)}"
                            + (f"; unknown: {', '.join(unknown[:5])}" if unknown else "")
                            + f") differ from this code's (v{FEATURE_VERSION}, {len(FEATURES)}; "
                            f"it reads versions {', '.join(map(str, SUPPORTED_FEATURE_VERSIONS))}): retrain the policy")
        if self.obs_dim != len(self.features):
            problems.append(f"obs_dim {self.obs_dim} != {len(self.features)} features")
        if self.n_actions != len(self.options):
            problems.append(f"n_actions {self.n_actions} != {len(self.options)} options in its table")
        if options is not None and options != self.options:
            problems.append(f"option table ({len(self.options)} options) differs from the one given ({len(options)})")
        if self.activation not in ACTIVATIONS:
            problems.append(f"unknown activation {self.activation!r}")
        if problems:
            raise PolicyFormatError("policy does not match: " + "; ".join(problems))


class SchedulerPolicy:
    def __init__(self, config: PolicyConfig, weights: dict[str, np.ndarray]) -> None:
        config.check()
        self.config = config
        # Which columns of today's observation this policy reads (all of them, in order, for a
        # policy of the current feature version).
        static = config.features[:-len(DYNAMIC_FEATURES)]
        self.static_columns = np.array([STATIC_FEATURES.index(f) for f in static], dtype=int)
        self.columns = np.concatenate([self.static_columns, np.arange(len(STATIC_FEATURES), OBS_DIM)])
        sizes = (config.obs_dim, *config.hidden, config.n_actions)
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w, b = weights.get(f"layers.{i}.weight"), weights.get(f"layers.{i}.bias")
            if w is None or b is None:
                raise PolicyFormatError(f"policy weights lack layers.{i}")
            if w.shape != (fan_out, fan_in) or b.shape != (fan_out,):
                raise PolicyFormatError(f"layers.{i} has shape {w.shape}/{b.shape}, config says "
                                        f"({fan_out}, {fan_in})/({fan_out},)")
            self.layers.append((np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)))
        extra = set(weights) - {f"layers.{i}.{p}" for i in range(len(self.layers)) for p in ("weight", "bias")}
        if extra:
            raise PolicyFormatError(f"policy weights have unexpected tensors: {sorted(extra)}")
        self._act = np.tanh if config.activation == "tanh" else (lambda h: np.maximum(h, 0.0))

    # --- inference --------------------------------------------------------------------------
    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, np.float32)
        for w, b in self.layers[:-1]:
            h = self._act(w @ h + b) if h.ndim == 1 else self._act(h @ w.T + b)
        w, b = self.layers[-1]
        return w @ h + b if h.ndim == 1 else h @ w.T + b

    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> int:
        """The greedy action for one observation of today's features (:data:`FEATURES`)."""
        logits = self.logits(np.asarray(obs)[..., self.columns])
        if mask is not None:
            logits = np.where(mask, logits, -np.inf)
        return int(np.argmax(logits))

    def __call__(self, problem: FrameProblem) -> np.ndarray:
        """Decide every user of ``problem`` in order (the Decider interface).

        Same decisions as ``act(state.observation(), mask)`` per user (tested), computed faster:
        the first layer's product with the static part of every user's observation (user and
        frame features) is one matrix product up front, leaving only the dynamic features and the
        small layers per user.
        """
        if problem.options != self.config.options:
            raise PolicyFormatError("the frame's option table differs from the policy's")
        if len(self.layers) < 2:  # no hidden layer: nothing to fold
            return self.decide_reference(problem)
        state = SequentialState(problem)
        if state.done:
            return state.sel
        (w1, b1), rest = self.layers[0], self.layers[1:]
        n_static = len(self.static_columns)
        static = state.static_obs[:, self.static_columns].astype(np.float32)
        first = static @ w1[:, :n_static].T + b1  # [N, hidden]
        w1_dynamic = np.ascontiguousarray(w1[:, n_static:])
        masked_out = np.where(problem.mask, np.float32(0), np.float32(-np.inf))  # added to the logits
        act = self._act
        (w_out, b_out), hidden = rest[-1], rest[:-1]
        while not state.done:
            t = state.t
            h = act(first[t] + w1_dynamic @ state.dynamic_features().astype(np.float32))
            for w, b in hidden:
                h = act(w @ h + b)
            state.commit(int(np.argmax(w_out @ h + b_out + masked_out[t])))
        return state.sel

    def decide_reference(self, problem: FrameProblem) -> np.ndarray:
        """The plain loop (full observation, :meth:`act`) that ``__call__`` must agree with."""
        state = SequentialState(problem)
        while not state.done:
            state.commit(self.act(state.observation(), state.action_mask()))
        return state.sel

    # --- files --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (w, b) in enumerate(self.layers):
            tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = w, b
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": POLICY_FORMAT})
        (out / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path, options: OptionTable | None = None) -> "SchedulerPolicy":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        try:
            config = PolicyConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        except FileNotFoundError:
            raise PolicyFormatError(f"{directory}: no {CONFIG_FILE}") from None
        except json.JSONDecodeError as exc:
            raise PolicyFormatError(f"{directory / CONFIG_FILE}: not JSON: {exc}") from exc
        config.check(options)
        try:
            weights = load_file(str(directory / WEIGHTS_FILE))
        except FileNotFoundError:
            raise PolicyFormatError(f"{directory}: no {WEIGHTS_FILE}") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise PolicyFormatError(f"{directory / WEIGHTS_FILE}: unreadable: {exc}") from exc
        return cls(config, weights)

    @classmethod
    def random_init(cls, options: OptionTable, hidden=(64, 64), seed: int = 0) -> "SchedulerPolicy":
        """An untrained policy (tests, benchmarks of the inference path)."""
        rng = np.random.default_rng(seed)
        sizes = (OBS_DIM, *hidden, len(options))
        weights = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            weights[f"layers.{i}.weight"] = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32)
            weights[f"layers.{i}.bias"] = np.zeros(b, np.float32)
        return cls(PolicyConfig(OBS_DIM, len(options), tuple(hidden), "tanh", FEATURES, FEATURE_VERSION, options), weights)
