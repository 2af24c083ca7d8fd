"""Train the scheduling policy: MaskablePPO (sb3-contrib) on :class:`SchedulerEnv` with a PID
Lagrangian on the latency-budget violations, then save the actor without pickle.

    OMP_NUM_THREADS=1 python -m services.scheduler.learn.train --steps 2500000 --seed 0 --out services/scheduler/policies/default/
    OMP_NUM_THREADS=1 python -m services.scheduler.learn.train --mode unconstrained --steps 600000 --seed 0 \
        --out services/scheduler/policies/default-unconstrained/    # plain PPO reward (λ = 0)
    ... --quality-profile synthetic --cost-profile builtin --steps 800000 --out .../policies/synthetic/
    ... --families 512 --steps 1500000 --out .../policies/general/   # one policy for any profile

It trains on the profiles the service runs with by default (the demo pack's measured quality and
cost profiles; ``--quality-profile``/``--cost-profile`` for others): frames of the default scenario
with every device class of the cost profile and the quality profile's personalized users. With
``--families N`` it trains on N randomized profiles drawn around the demo and synthetic ones
(:mod:`services.scheduler.learn.families`), one per episode, for a policy that needs no retraining.

Rewards are (r − λ·c) / (1 + λ) with r the change in utility and c the change in violations per
step; λ is updated once per rollout from the rollout's violations per user (cost limit, default
0.02 = 2% of users over budget). Prints one progress line per rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.quality import QualityProfile, synthetic_profile
from services.scheduler.decide.scenario import ScenarioConfig, scenario_for
from services.scheduler.defaults import BUILTIN, DEFAULT_QUALITY, default_cost_profile, display_path, load_profiles, profile_ids
from services.scheduler.learn.env import SchedulerEnv
from services.scheduler.learn.families import ProfileDraw, ProfileFamily
from services.scheduler.learn.lagrangian import PIDLagrangian
from services.scheduler.learn.torch_bridge import policy_from_sb3

MODES = ("lagrangian", "unconstrained", "penalized")


class _LambdaHolder:
    def __init__(self, lam: float) -> None:
        self.lam = lam


def _make_env(seed: int, mode: str, holder: _LambdaHolder, scenario: ScenarioConfig, quality: QualityProfile,
              costs: CostProfile, profiles: tuple[ProfileDraw, ...] = ()):
    import gymnasium as gym

    class LagrangianReward(gym.Wrapper):
        def step(self, action):
            obs, reward, term, trunc, info = self.env.step(action)
            info["raw_reward"] = reward
            if mode == "lagrangian":
                reward = (reward - holder.lam * info["cost"]) / (1.0 + holder.lam)
            return obs, reward, term, trunc, info

        def action_masks(self):
            return self.env.action_masks()

    def thunk():
        env = LagrangianReward(SchedulerEnv(scenario, quality, costs,
                                            reward_mode="penalized" if mode == "penalized" else "utility",
                                            profiles=profiles))
        env.reset(seed=seed)
        return env

    return thunk


def train(steps: int, seed: int, out: Path, mode: str = "lagrangian", cost_limit: float = 0.02,
          n_envs: int = 8, n_steps: int = 256, lr: float = 3e-4, hidden: int = 128, quiet: bool = False,
          quality: QualityProfile | None = None, costs: CostProfile | None = None,
          profile_names: tuple[str, str] = ("synthetic", "builtin"),
          ids: tuple[str, str] = ("synthetic", "builtin"), profiles: tuple[ProfileDraw, ...] = (),
          checkpoint_every: int = 0) -> dict:
    """Train and save to ``out``; with ``profiles``, every episode draws one of them. With
    ``checkpoint_every``, the actor so far is saved to ``out``/checkpoint every that many steps."""
    import torch
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.set_num_threads(1)
    pid = PIDLagrangian(cost_limit) if mode == "lagrangian" else None
    holder = _LambdaHolder(pid.lam if pid else 0.0)
    quality = quality or synthetic_profile()
    costs = costs or CostProfile()
    scenario = scenario_for(quality, costs)
    venv = DummyVecEnv([_make_env(seed * 1000 + i, mode, holder, scenario, quality, costs, profiles)
                        for i in range(n_envs)])
    model = MaskablePPO(
        "MlpPolicy", venv, n_steps=n_steps, batch_size=256, n_epochs=10, learning_rate=lr, gamma=1.0,
        gae_lambda=0.95, ent_coef=0.01, seed=seed, device="cpu", verbose=0,
        policy_kwargs={"net_arch": {"pi": [hidden, hidden], "vf": [hidden, hidden]}, "activation_fn": torch.nn.Tanh},
    )
    history: list[dict] = []
    next_checkpoint = [checkpoint_every]

    class Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.t0 = time.time()
            self._reset()

        def _reset(self) -> None:
            self.costs = 0.0
            self.decisions = 0
            self.frames: list[tuple[float, int, int, float]] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                self.costs += info["cost"]
                self.decisions += 1
                if "frame_utility" in info:
                    self.frames.append((info["frame_utility"], info["violations"], info["n_users"],
                                        info["frame_objective"]))
            return True

        def _on_rollout_end(self) -> None:
            rate = self.costs / max(self.decisions, 1)  # violations per user decided
            if pid is not None:
                holder.lam = pid.update(rate)
            f = np.array(self.frames) if self.frames else np.zeros((1, 4))
            row = {"steps": int(self.num_timesteps), "seconds": round(time.time() - self.t0, 1),
                   "utility_per_user": float(f[:, 0].sum() / max(f[:, 2].sum(), 1)),
                   "objective_per_user": float(f[:, 3].sum() / max(f[:, 2].sum(), 1)),
                   "violation_rate": float(f[:, 1].sum() / max(f[:, 2].sum(), 1)), "lambda": holder.lam}
            history.append(row)
            if checkpoint_every and row["steps"] >= next_checkpoint[0]:
                next_checkpoint[0] += checkpoint_every
                policy_from_sb3(self.model, DEFAULT_OPTIONS, {"checkpoint_steps": row["steps"], "mode": mode}).save(
                    Path(out) / "checkpoint")
            if not quiet:
                fps = row["steps"] / max(row["seconds"], 1e-9)
                print(f"[{mode}] steps {row['steps']:>8} ({fps:,.0f}/s)  utility/user {row['utility_per_user']:.3f}  "
                      f"J/user {row['objective_per_user']:.3f}  violations {row['violation_rate']:.3%}  "
                      f"λ {holder.lam:.3f}", flush=True)
            self._reset()

    model.learn(total_timesteps=steps, callback=Progress())
    last = history[-10:]
    meta = {"algorithm": "MaskablePPO" + (" + PID-Lagrangian" if pid else ""), "mode": mode, "steps": steps,
            "seed": seed, "cost_limit": cost_limit if pid else None, "lambda": holder.lam,
            "final_violation_rate": float(np.mean([r["violation_rate"] for r in last])) if last else None,
            "final_utility_per_user": float(np.mean([r["utility_per_user"] for r in last])) if last else None,
            "scenario": {"base": "services.scheduler.decide.scenario.DEFAULT_SCENARIO",
                         "device_mix": [list(m) for m in scenario.device_mix],
                         "personalized_profiles": list(scenario.personalized_profiles)},
            "quality_profile": profile_names[0], "cost_profile": profile_names[1],
            "quality_profile_id": ids[0], "cost_profile_id": ids[1]}
    if profiles:  # each episode's scenario comes from its profile draw, not the base scenario above
        meta["families"] = {"profiles": len(profiles), "family": "services.scheduler.learn.families.ProfileFamily.around_defaults"}
        meta["scenario"] = {"per_draw": "services.scheduler.learn.families (scenario_for each draw, randomized)"}
    policy = policy_from_sb3(model, DEFAULT_OPTIONS, meta)
    policy.save(out)
    (Path(out) / "train_log.json").write_text(json.dumps({"meta": meta, "history": history}, indent=0))
    if not quiet:
        print(f"saved {out}/config.json and {out}/actor.safetensors", flush=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler.learn.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/scheduler-policy"),
                        help="output directory (runs/scheduler-policy; the shipped one is policies/default)")
    parser.add_argument("--mode", choices=MODES, default="lagrangian")
    parser.add_argument("--cost-limit", type=float, default=0.02, help="violations per user (lagrangian)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--quality-profile", default=str(DEFAULT_QUALITY),
                        help="quality profile JSON or 'synthetic' (default: the demo pack's)")
    parser.add_argument("--cost-profile", default=default_cost_profile(),
                        help=f"cost profile JSON or {BUILTIN!r} (default: the demo pack's measured one)")
    parser.add_argument("--families", type=int, default=0, metavar="N",
                        help="train on N randomized profiles around the demo and synthetic ones (a general policy)")
    parser.add_argument("--family-seed", type=int, default=1, help="seed of the randomized profiles")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="save the actor so far to OUT/checkpoint every STEPS steps")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        import sb3_contrib  # noqa: F401
    except ImportError:
        print("training needs sb3-contrib: pip install sb3-contrib", file=sys.stderr)
        return 2
    try:
        quality, costs = load_profiles(args.quality_profile, args.cost_profile)
    except (OSError, ValueError) as exc:
        print(f"cannot load profiles: {exc}", file=sys.stderr)
        return 2
    names = ("synthetic" if quality.synthetic else display_path(args.quality_profile),
             "builtin" if costs.synthetic else display_path(args.cost_profile))
    ids = profile_ids(args.quality_profile, args.cost_profile)
    profiles: tuple[ProfileDraw, ...] = ()
    if args.families < 0:
        print(f"--families must be >= 0, got {args.families}", file=sys.stderr)
        return 2
    if args.families:
        profiles = tuple(ProfileFamily.around_defaults().pool(args.family_seed, args.families))
        label = f"families({args.families}, seed {args.family_seed})"
        names = ids = (label, label)
    if not args.quiet:
        print(f"quality profile: {names[0]}; cost profile: {names[1]}", flush=True)
    train(args.steps, args.seed, args.out, args.mode, args.cost_limit, args.n_envs, quiet=args.quiet,
          quality=quality, costs=costs, profile_names=names, ids=ids, profiles=profiles,
          checkpoint_every=args.checkpoint_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
