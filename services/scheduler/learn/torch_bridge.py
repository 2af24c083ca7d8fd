"""Between the numpy policy and torch (the learning side): extract a trained SB3 actor into a
:class:`SchedulerPolicy`, and rebuild a policy as a torch module. Kept apart from policy.py so the
decision code never imports torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from services.scheduler.decide.features import FEATURE_VERSION, FEATURES, OBS_DIM
from services.scheduler.decide.options import OptionTable
from services.scheduler.decide.policy import PolicyConfig, SchedulerPolicy


def policy_from_sb3(model, options: OptionTable, meta: dict[str, Any] | None = None) -> SchedulerPolicy:
    """Extract the actor of an SB3 (Maskable)PPO MlpPolicy: policy_net layers + action_net."""
    linears = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    acts = [m for m in model.policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)]
    activation = "relu" if acts and isinstance(acts[0], torch.nn.ReLU) else "tanh"
    linears.append(model.policy.action_net)
    weights = {}
    for i, lin in enumerate(linears):
        weights[f"layers.{i}.weight"] = lin.weight.detach().cpu().numpy().astype(np.float32)
        weights[f"layers.{i}.bias"] = lin.bias.detach().cpu().numpy().astype(np.float32)
    config = PolicyConfig(OBS_DIM, len(options), tuple(lin.out_features for lin in linears[:-1]), activation,
                          FEATURES, FEATURE_VERSION, options, dict(meta or {}))
    return SchedulerPolicy(config, weights)


def policy_to_torch(policy: SchedulerPolicy) -> torch.nn.Sequential:
    """The same MLP as a plain ``torch.nn.Sequential`` (for export or batched scoring)."""
    mods: list[torch.nn.Module] = []
    for i, (w, b) in enumerate(policy.layers):
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if i < len(policy.layers) - 1:
            mods.append(torch.nn.Tanh() if policy.config.activation == "tanh" else torch.nn.ReLU())
    return torch.nn.Sequential(*mods)
