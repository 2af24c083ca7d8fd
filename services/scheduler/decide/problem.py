"""One frame as arrays: per user and option, quality, GPU work, transfer time, device time and
energy; and the frame objective of a selection (one option per user), vectorized over many
selections at once. Everything else (env, baselines, exact search, planner) evaluates through this.

With GPU work w_i = k_i·g(n_edge) (g: per-request step seconds at the whole available GPU; more
edge users amortize the batch overhead) and transfer time c_i (seconds at the whole band), the
closed-form shares x_i ∝ √w_i, y_i ∝ √c_i give user i the latency

    L_i = g·√k_i·Σ_j√k_j  +  √c_i·Σ_j√c_j  +  local_i

(users on their own link pay their c_i alone: it is part of local_i, not of the shared sum)
and the frame objective J = Σ_i [q_i − λ_lat·L_i − λ_en·E_i] − Σ_{i: L_i > D_i} (P + L_i/D_i − 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import OptionTable
from services.scheduler.decide.quality import QualityProfile
from services.scheduler.decide.scenario import FrameContext, ObjectiveConfig, UserSpec


@dataclass(frozen=True, eq=False)
class FrameEval:
    """A selection evaluated with closed-form shares."""

    objective: float  # J
    utility: float  # Σ u_i (no penalty)
    quality: np.ndarray
    latency: np.ndarray  # L_i
    edge_seconds: np.ndarray
    transfer_seconds: np.ndarray
    local_seconds: np.ndarray  # device steps + decode (+ RTT when the edge is used)
    energy: np.ndarray
    gpu_shares: np.ndarray
    band_shares: np.ndarray
    violations: np.ndarray  # bool: latency over budget
    edge_step_seconds: float  # g(n_edge): GPU seconds per request-step at the whole GPU

    @property
    def n_violations(self) -> int:
        return int(self.violations.sum())


@dataclass(frozen=True, eq=False)
class FrameProblem:
    users: tuple[UserSpec, ...]
    ctx: FrameContext
    options: OptionTable
    objective_cfg: ObjectiveConfig
    quality: np.ndarray  # [N, K]
    edge_steps: np.ndarray  # [K] k
    sqrt_k: np.ndarray  # [K]
    uses_edge: np.ndarray  # [K] bool
    handoff_bytes: np.ndarray  # [K]
    comm: np.ndarray  # [N, K] transfer seconds at the whole shared band (0 for k = 0 and own links)
    sqrt_c: np.ndarray  # [N, K]
    local: np.ndarray  # [N, K] device compute + decode + RTT if k > 0 (+ own_comm)
    energy: np.ndarray  # [N, K]
    deadline: np.ndarray  # [N] (inf: none)
    energy_budget: np.ndarray  # [N]
    mask: np.ndarray  # [N, K] options that can meet the user's budgets alone
    base_value: np.ndarray  # [N, K] q − λ_lat·local − λ_en·E (the separable part of u)
    edge_a: float  # batch overhead seconds per step at the whole available GPU
    edge_b: float  # per-request seconds per step
    max_batch: int
    rtt_s: np.ndarray  # [N] round-trip seconds of an edge round (the user's own estimate, else the profile's)
    device_step_s: np.ndarray  # [N]
    device_power_w: np.ndarray  # [N]
    spectral_efficiency: np.ndarray  # [N]
    personalized: np.ndarray  # [N] bool
    own_comm: np.ndarray  # [N, K] transfer seconds on the user's own link (0 for band users)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_options(self) -> int:
        return len(self.options)

    @classmethod
    def build(cls, users, quality: QualityProfile, costs: CostProfile, options: OptionTable,
              ctx: FrameContext = FrameContext(), objective: ObjectiveConfig = ObjectiveConfig()) -> "FrameProblem":
        users = tuple(users)
        n, k_opts = len(users), len(options)
        steps = np.array([o.steps for o in options], float)
        k = np.array([o.split for o in options], float)
        uses_edge = k > 0
        nbytes = np.array([costs.handoff_bytes(o.steps, o.split, o.codec, o.merge_ratio) for o in options], float)
        q = np.stack([_quality_row(quality, options, u.profile_user, ctx.pair) for u in users]) if n else np.zeros((0, k_opts))
        devs = [costs.device(u.device_class) for u in users]
        step_s = np.array([d.step_s for d in devs], float).reshape(n, 1)
        decode_s = np.array([d.decode_s for d in devs], float).reshape(n, 1)
        power = np.array([d.power_w for d in devs], float).reshape(n, 1)
        compute = (steps - k)[None, :] * step_s + decode_s
        rtt = np.array([costs.rtt_s if u.rtt_s is None else u.rtt_s for u in users], float).reshape(n, 1)
        local = compute + np.where(uses_edge[None, :], rtt, 0.0)
        energy = power * compute
        se = np.array([u.spectral_efficiency for u in users], float).reshape(n, 1)
        transfer = nbytes[None, :] * 8.0 / (se * ctx.bandwidth_hz)
        # A user on its own link takes no share of the band: its transfer time depends on nobody
        # else, so it is separable like the device's own steps.
        own = np.array([u.own_link for u in users], bool).reshape(n, 1)
        own_comm = np.where(own, transfer, 0.0)
        comm = np.where(own, 0.0, transfer)
        local = local + own_comm
        coeff = costs.edge_coefficients(ctx.edge_pack)
        cap = max(ctx.edge_capacity, 1e-6)
        # The larger of two safeties, not both: the headroom (at least this far below any budget)
        # and the user's own measured margin (a quantile of its measured / predicted). Each alone
        # covers a prediction's noise; stacked, they gave up plans that fitted.
        margin = np.array([u.budget_margin for u in users], float)
        aim = np.minimum(1.0 - objective.budget_headroom, 1.0 / (1.0 + margin))
        deadline = np.array([u.latency_budget_s for u in users], float) * aim
        ebudget = np.array([u.energy_budget_j for u in users], float)
        obj = objective
        base = q - obj.latency_weight * local - obj.energy_weight * energy
        # Alone: the only user, the whole GPU (batch 1) and the whole band.
        alone = k[None, :] * (coeff.a_s + coeff.b_s) / cap + comm + local
        mask = (alone <= deadline[:, None]) & (energy <= ebudget[:, None])
        for i in np.flatnonzero(~mask.any(1)):  # nothing fits: keep the least-bad option
            badness = np.maximum(alone[i] / deadline[i], energy[i] / ebudget[i])
            mask[i, np.argmin(badness)] = True
        return cls(users, ctx, options, obj, q, k, np.sqrt(k), uses_edge, nbytes, comm, np.sqrt(comm),
                   local, energy, deadline, ebudget, mask, base, coeff.a_s / cap, coeff.b_s / cap,
                   costs.max_batch, rtt[:, 0], step_s[:, 0], power[:, 0], se[:, 0],
                   np.array([u.personalized for u in users], bool), own_comm)

    # --- objective --------------------------------------------------------------------------
    def edge_step_seconds(self, n_edge):
        """g(n): GPU seconds per request-step at the whole available GPU with n edge users."""
        return self.edge_a / np.minimum(np.maximum(n_edge, 1), self.max_batch) + self.edge_b

    def evaluate_batch(self, sel: np.ndarray) -> np.ndarray:
        """J for each row of ``sel`` ([M, N] option indices)."""
        sel = np.asarray(sel)
        rows = np.arange(self.n_users)
        sk = self.sqrt_k[sel]
        g = self.edge_step_seconds(self.uses_edge[sel].sum(-1))
        s_k = sk.sum(-1)
        sc = self.sqrt_c[rows, sel]
        s_c = sc.sum(-1)
        base = self.base_value[rows, sel].sum(-1)
        lam = self.objective_cfg.latency_weight
        utility = base - lam * (g * s_k**2 + s_c**2)
        if not np.isfinite(self.deadline).any():
            return utility
        lat = (g * s_k)[..., None] * sk + s_c[..., None] * sc + self.local[rows, sel]
        return utility - self._penalty(lat).sum(-1)

    def _penalty(self, lat: np.ndarray) -> np.ndarray:
        over = lat > self.deadline * (1 + 1e-9)
        ratio = np.where(np.isfinite(self.deadline), lat / self.deadline, 0.0)
        return np.where(over, self.objective_cfg.violation_penalty + ratio - 1.0, 0.0)

    def evaluate(self, sel) -> FrameEval:
        sel = np.asarray(sel, dtype=int)
        rows = np.arange(self.n_users)
        sk, sc = self.sqrt_k[sel], self.sqrt_c[rows, sel]
        n_edge = int(self.uses_edge[sel].sum())
        g = float(self.edge_step_seconds(n_edge))
        s_k, s_c = sk.sum(), sc.sum()
        edge = g * sk * s_k
        tx = sc * s_c
        local = self.local[rows, sel]
        lat = edge + tx + local
        q, energy = self.quality[rows, sel], self.energy[rows, sel]
        cfg = self.objective_cfg
        u = q - cfg.latency_weight * lat - cfg.energy_weight * energy
        pen = self._penalty(lat) if self.n_users else np.zeros(0)
        x = sk / s_k if s_k > 0 else np.zeros_like(sk)
        y = sc / s_c if s_c > 0 else np.zeros_like(sc)
        own = self.own_comm[rows, sel]  # reported as transfer, not as device time
        return FrameEval(float(u.sum() - pen.sum()), float(u.sum()), q, lat, edge, tx + own, local - own, energy, x, y,
                         lat > self.deadline * (1 + 1e-9), g)

    def batched_edge_seconds(self, sel) -> np.ndarray:
        """Each user's edge seconds as the edge server runs a frame: its edge users start together
        in one continuous batch, and the j-th step costs a + b·(users with k >= j), each user
        leaving when its k steps are done (0 for users off the edge). The closed form's √k shares
        give the same for equal splits and over-predict mixed ones (k = 3 beside k = 5: 15 % and
        9 % at a CPU edge's a + b·n); the objective keeps the closed form, this is what a plan
        reports. Frames beyond ``max_batch`` edge users queue on the edge: use the closed form."""
        sel = np.asarray(sel, dtype=int)
        k = self.edge_steps[sel]
        on = k > 0
        out = np.zeros(len(sel))
        if not on.any():
            return out
        ks = np.sort(k[on]).astype(int)
        running = len(ks) - np.searchsorted(ks, np.arange(1, ks[-1] + 1), side="left")  # users at step j
        finished_by = np.cumsum(self.edge_a + self.edge_b * running)  # seconds after step j
        out[on] = finished_by[k[on].astype(int) - 1]
        return out

    def work_seconds(self, sel) -> np.ndarray:
        """GPU work w_i (edge seconds at the whole available GPU) of a selection."""
        sel = np.asarray(sel, dtype=int)
        g = self.edge_step_seconds(int(self.uses_edge[sel].sum()))
        return self.edge_steps[sel] * g


def _quality_row(profile: QualityProfile, options: OptionTable, user: str, pair: str | None) -> np.ndarray:
    """Accuracy of every option for ``user`` (cached on the profile: quality is static)."""
    cache = profile.__dict__.setdefault("_rows", {})
    key = (id(options), options.options[0], len(options), user, pair)
    row = cache.get(key)
    if row is None:
        row = np.array([profile.accuracy(o.steps, o.split_fraction, o.merge_ratio, user, pair, o.codec) for o in options])
        row.flags.writeable = False
        cache[key] = row
    return row

