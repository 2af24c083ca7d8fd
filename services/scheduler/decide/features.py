"""Deciding a frame one user at a time: the running state, the observation of the user to decide,
and the objective of the users decided so far. Shared by the RL environment and the trained
policy at inference, so both see exactly the same features.

Observation (FEATURES, all O(1)): this user (device speed and power, channel, personalization,
budgets, transfer cost, how many options fit its budgets), the frame (size, edge capacity, band,
means of the user features), the load committed so far (edge users, Σ√k, Σ√c, the marginal edge
and transfer latency this user would see now) and what is still to come (users remaining and the
load they would bring at their best option alone).

Version 2 adds the profile's summary, so one policy can serve profiles it was not trained on:
per user, the shape of its quality row (best, all-device and all-edge quality, the split fraction
of its best option alone, the edge's speed-up over its device) and per frame, the edge's cost
coefficients, the round trip, the batch cap and the mean quality gap the edge closes. A policy
saved with version 1 names a subset of these features (the same definitions), so it still loads:
the policy picks its own columns by name.
"""

from __future__ import annotations

import math

import numpy as np

from services.scheduler.decide.baselines import best_alone
from services.scheduler.decide.problem import FrameProblem

FEATURE_VERSION = 2
SUPPORTED_FEATURE_VERSIONS = (1, 2)
USER_FEATURES = ("log_step", "log_power", "log_se", "personalized", "log_deadline", "has_deadline",
                 "log_energy_budget", "has_energy_budget", "log_comm", "allowed_fraction",
                 "q_best", "q_device", "q_edge", "alone_fraction", "log_edge_speedup")
FRAME_FEATURES = ("log_n", "edge_capacity", "log_bandwidth", "mean_log_step", "mean_personalized",
                  "mean_log_se", "mean_log_deadline",
                  "log_edge_a", "log_edge_b", "log_rtt", "log_max_batch", "mean_edge_gain")
DYNAMIC_FEATURES = ("decided", "edge_users", "sum_sqrt_k", "sum_sqrt_c", "marginal_edge", "marginal_tx",
                    "rest_log_step", "rest_personalized", "rest_sqrt_k", "rest_sqrt_c")
STATIC_FEATURES = USER_FEATURES + FRAME_FEATURES  # observation = static part + dynamic part
FEATURES = STATIC_FEATURES + DYNAMIC_FEATURES
OBS_DIM = len(FEATURES)
_STATIC_DIM = len(STATIC_FEATURES)
OBS_CLIP = 10.0
_SQRT_K_SCALE = 5.0  # √25


class SequentialState:
    """Running state while a frame's users are decided in order 0..N-1."""

    def __init__(self, problem: FrameProblem) -> None:
        p = self.problem = problem
        n = p.n_users
        self.sel = np.full(n, -1, dtype=int)
        self.t = 0
        edge_opts = p.uses_edge
        comm_ref = p.comm[:, edge_opts].mean(1) if edge_opts.any() and n else np.full(n, 1e-3)
        self.comm_ref = np.maximum(comm_ref, 1e-6)
        deadline = np.where(np.isfinite(p.deadline), np.minimum(p.deadline, 120.0), 120.0)
        ebudget = np.where(np.isfinite(p.energy_budget), np.minimum(p.energy_budget, 2000.0), 2000.0)
        alone = best_alone(p)
        rows = np.arange(n)
        quality = _quality_summary(p)  # [N, 3]: best, all-device, all-edge
        edge_alone = p.edge_a + p.edge_b  # seconds per step of a lone request
        user = np.stack([
            np.log(p.device_step_s / 0.3), np.log(p.device_power_w / 10.0), np.log(p.spectral_efficiency / 1.5),
            p.personalized.astype(float), np.log(deadline / 10.0), np.isfinite(p.deadline).astype(float),
            np.log(ebudget / 100.0), np.isfinite(p.energy_budget).astype(float),
            np.log(self.comm_ref / 0.05), p.mask.mean(1),
            quality[:, 0], quality[:, 1], quality[:, 2], p.edge_steps[alone] / _option_steps(p)[alone],
            np.log(p.device_step_s / max(edge_alone, 1e-9)),
        ], 1) if n else np.zeros((0, len(USER_FEATURES)))
        frame = np.array([
            np.log(max(n, 1) / 20.0), p.ctx.edge_capacity, np.log(p.ctx.bandwidth_hz / 10e6),
            user[:, 0].mean() if n else 0.0, user[:, 3].mean() if n else 0.0,
            user[:, 2].mean() if n else 0.0, user[:, 4].mean() if n else 0.0,
            math.log(max(p.edge_a, 1e-6) / 0.025), math.log(max(p.edge_b, 1e-6) / 0.0075),
            math.log(max(float(p.rtt_s.mean()) if n else 0.02, 1e-4) / 0.02), math.log(p.max_batch / 32.0),
            float((quality[:, 0] - quality[:, 1]).mean()) if n else 0.0,
        ])
        # The user and frame parts of every user's observation, clipped (they never change).
        static = np.concatenate([user, np.broadcast_to(frame, (n, len(frame)))], 1) if n else np.zeros((0, _STATIC_DIM))
        self.static_obs = np.minimum(np.maximum(static, -OBS_CLIP), OBS_CLIP)
        self._alone_sqrt_k = p.sqrt_k[alone]
        self._alone_sqrt_c = p.sqrt_c[rows, alone]
        self._c_norm = float(np.sqrt(self.comm_ref.mean())) if n else 1.0
        self._sqrt_comm_ref = np.sqrt(self.comm_ref).tolist()
        # Suffix sums (what is still to come after user t).
        self._rest_step = np.concatenate([np.cumsum(user[::-1, 0])[::-1], [0.0]]) if n else np.zeros(1)
        self._rest_pers = np.concatenate([np.cumsum(user[::-1, 3])[::-1], [0.0]]) if n else np.zeros(1)
        self._rest_sk = np.concatenate([np.cumsum(self._alone_sqrt_k[::-1])[::-1], [0.0]]) if n else np.zeros(1)
        self._rest_sc = np.concatenate([np.cumsum(self._alone_sqrt_c[::-1])[::-1], [0.0]]) if n else np.zeros(1)
        # as Python floats: dynamic_features reads one element of each per decision
        self._rest_step, self._rest_pers = self._rest_step.tolist(), self._rest_pers.tolist()
        self._rest_sk, self._rest_sc = self._rest_sk.tolist(), self._rest_sc.tolist()
        self.n_edge = 0
        self.s_k = 0.0
        self.s_c = 0.0

    @property
    def done(self) -> bool:
        return self.t >= self.problem.n_users

    def action_mask(self) -> np.ndarray:
        return self.problem.mask[self.t]

    def observation(self) -> np.ndarray:
        if self.t >= self.problem.n_users:  # terminal observation: nothing left to decide
            return np.zeros(OBS_DIM, dtype=np.float32)
        return np.concatenate([self.static_obs[self.t], self.dynamic_features()]).astype(np.float32)

    def dynamic_features(self) -> np.ndarray:
        """The DYNAMIC_FEATURES of user t (clipped, float64): scalar arithmetic, as this runs once
        per user and decision (numpy's per-call overhead would dominate)."""
        p, t, n = self.problem, self.t, self.problem.n_users
        g_next = p.edge_a / min(max(self.n_edge + 1, 1), p.max_batch) + p.edge_b  # = p.edge_step_seconds
        rest = n - t - 1
        dyn = (
            t / n, self.n_edge / n, self.s_k / (_SQRT_K_SCALE * n), self.s_c / (self._c_norm * n),
            math.log1p(g_next * self.s_k * _SQRT_K_SCALE), math.log1p(self.s_c * self._sqrt_comm_ref[t]),
            self._rest_step[t + 1] / rest if rest else 0.0, self._rest_pers[t + 1] / rest if rest else 0.0,
            self._rest_sk[t + 1] / (_SQRT_K_SCALE * n), self._rest_sc[t + 1] / (self._c_norm * n),
        )
        return np.array([min(max(x, -OBS_CLIP), OBS_CLIP) for x in dyn])

    def commit(self, option: int) -> None:
        p, t = self.problem, self.t
        self.sel[t] = option
        self.n_edge += int(p.uses_edge[option])
        self.s_k += float(p.sqrt_k[option])
        self.s_c += float(p.sqrt_c[t, option])
        self.t += 1

    def decided_objective(self) -> tuple[float, int, float]:
        """(utility, violations, penalized objective) of the users decided so far, as if alone."""
        p, m = self.problem, self.t
        if m == 0:
            return 0.0, 0, 0.0
        rows = np.arange(m)
        sel = self.sel[:m]
        sk, sc = p.sqrt_k[sel], p.sqrt_c[rows, sel]
        g = float(p.edge_step_seconds(self.n_edge))
        lat = g * sk * self.s_k + sc * self.s_c + p.local[rows, sel]
        cfg = p.objective_cfg
        utility = float(p.base_value[rows, sel].sum() - cfg.latency_weight * (g * self.s_k**2 + self.s_c**2))
        d = p.deadline[:m]
        over = lat > d * (1 + 1e-9)
        pen = np.where(over, cfg.violation_penalty + np.where(np.isfinite(d), lat / d, 0.0) - 1.0, 0.0).sum()
        return utility, int(over.sum()), utility - float(pen)


def _option_steps(problem: FrameProblem) -> np.ndarray:
    return np.array([o.steps for o in problem.options], float)


def _quality_summary(problem: FrameProblem) -> np.ndarray:
    """[N, 3] per user: the best quality of any option, of the all-device options (k = 0) and of
    the all-edge ones (k = T); 0 where the table has no such option."""
    k, steps = problem.edge_steps, _option_steps(problem)
    q = problem.quality
    out = np.zeros((problem.n_users, 3))
    if problem.n_users:
        out[:, 0] = q.max(1)
        for col, kind in ((1, k == 0), (2, k == steps)):
            if kind.any():
                out[:, col] = q[:, kind].max(1)
    return out
