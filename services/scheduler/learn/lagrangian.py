"""PID Lagrangian multiplier (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL by PID
Lagrangian Methods"): λ follows the constraint error with proportional, integral and derivative
terms, which damps the oscillation of the plain (integral-only) Lagrangian update.

The training loop calls :meth:`update` once per rollout with the rollout's mean cost per step and
shapes rewards as (r − λ·c) / (1 + λ).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PIDLagrangian:
    cost_limit: float
    kp: float = 1.0
    ki: float = 0.5
    kd: float = 0.5
    lambda_init: float = 0.5
    lambda_max: float = 100.0
    d_delay: int = 1  # derivative over this many updates

    def __post_init__(self) -> None:
        self.integral = self.lambda_init
        self.lam = self.lambda_init
        self._history: list[float] = []

    def update(self, mean_cost: float) -> float:
        error = mean_cost - self.cost_limit
        self.integral = max(0.0, self.integral + self.ki * error)
        previous = self._history[-self.d_delay] if len(self._history) >= self.d_delay else mean_cost
        derivative = max(0.0, mean_cost - previous)
        self._history.append(mean_cost)
        self._history = self._history[-self.d_delay:]
        self.lam = min(self.lambda_max, max(0.0, self.kp * error + self.integral + self.kd * derivative))
        return self.lam

    def shape(self, reward: float, cost: float) -> float:
        return (reward - self.lam * cost) / (1.0 + self.lam)
