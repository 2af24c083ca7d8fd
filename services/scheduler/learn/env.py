"""Gymnasium environment: one episode = one frame; one step = one user's option.

Observation: :data:`services.scheduler.decide.features.FEATURES`; action: Discrete(K) over the option
table; ``action_masks()`` marks the options that can meet the user's budgets alone (for
MaskablePPO). Rewards are shaped by telescoping: after each step the reward is the change in the
utility Σu of the users decided so far (closed-form shares among them), so the episode's return is
the frame's utility; ``info["cost"]`` is the change in the number of users over their latency
budget (for a PID-Lagrangian). ``reward_mode="penalized"`` rewards the change in the penalized
frame objective J instead. The last step's info holds the frame's objective, utility, violations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.features import OBS_CLIP, OBS_DIM, SequentialState
from services.scheduler.decide.options import DEFAULT_OPTIONS, OptionTable
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.quality import QualityProfile, synthetic_profile
from services.scheduler.decide.scenario import DEFAULT_SCENARIO, ObjectiveConfig, ScenarioConfig, sample_frame

if TYPE_CHECKING:
    from services.scheduler.learn.families import ProfileDraw

REWARD_MODES = ("utility", "penalized")


class SchedulerEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, scenario: ScenarioConfig = DEFAULT_SCENARIO, quality: QualityProfile | None = None,
                 costs: CostProfile | None = None, options: OptionTable = DEFAULT_OPTIONS,
                 objective: ObjectiveConfig = ObjectiveConfig(), reward_mode: str = "utility",
                 profiles: Sequence["ProfileDraw"] = ()) -> None:
        """``profiles``: when given, every episode draws one of them (its quality, costs and
        scenario) instead of using ``scenario``/``quality``/``costs``."""
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.scenario = scenario
        self.quality = quality or synthetic_profile()
        self.costs = costs or CostProfile()
        self.options = options
        self.objective = objective
        self.reward_mode = reward_mode
        self.profiles = tuple(profiles)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (OBS_DIM,), np.float32)
        self.action_space = spaces.Discrete(len(options))
        self.state: SequentialState | None = None
        self._last = (0.0, 0, 0.0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        scenario, quality, costs = self.scenario, self.quality, self.costs
        if self.profiles:
            draw = self.profiles[int(self.np_random.integers(len(self.profiles)))]
            scenario, quality, costs = draw.scenario, draw.quality, draw.costs
        options = options or {}
        users = options.get("users")
        if users is None:
            users, ctx = sample_frame(self.np_random, scenario, costs=costs)
        else:
            ctx = options["ctx"]
        problem = FrameProblem.build(users, quality, costs, self.options, ctx, self.objective)
        self.state = SequentialState(problem)
        self._last = (0.0, 0, 0.0)
        return self.state.observation(), {"n_users": problem.n_users}

    @property
    def problem(self) -> FrameProblem:
        assert self.state is not None, "call reset() first"
        return self.state.problem

    def action_masks(self) -> np.ndarray:
        assert self.state is not None, "call reset() first"
        if self.state.done:
            return np.ones(len(self.options), dtype=bool)
        return self.state.action_mask().copy()

    def step(self, action):
        state = self.state
        assert state is not None and not state.done, "call reset() first"
        action = int(action)
        masked = not bool(state.action_mask()[action])
        state.commit(action)
        utility, violations, objective = state.decided_objective()
        d_util = utility - self._last[0]
        d_cost = float(violations - self._last[1])
        d_obj = objective - self._last[2]
        self._last = (utility, violations, objective)
        reward = d_util if self.reward_mode == "utility" else d_obj
        info: dict[str, Any] = {"cost": d_cost, "masked_action": masked}
        terminated = state.done
        if terminated:
            n = state.problem.n_users
            info.update(frame_objective=objective, frame_utility=utility, violations=violations,
                        n_users=n, violation_rate=violations / max(n, 1))
        return state.observation(), float(reward), terminated, False, info
