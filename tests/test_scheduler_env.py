"""The RL environment: gymnasium's checker, seeded determinism, telescoping rewards, masks."""

from __future__ import annotations

import numpy as np
from gymnasium.utils.env_checker import check_env

from services.scheduler.decide.features import OBS_DIM
from services.scheduler.decide.scenario import ScenarioConfig
from services.scheduler.learn.env import SchedulerEnv


def _rollout(env: SchedulerEnv, seed: int, policy_seed: int = 0):
    rng = np.random.default_rng(policy_seed)
    obs, _ = env.reset(seed=seed)
    trace, done, info = [obs], False, {}
    rewards, costs = [], []
    while not done:
        action = rng.choice(np.flatnonzero(env.action_masks()))
        obs, reward, done, _, info = env.step(action)
        trace.append(obs)
        rewards.append(reward)
        costs.append(info["cost"])
    return np.array(trace), np.array(rewards), np.array(costs), info


def test_env_passes_the_gymnasium_checker():
    env = SchedulerEnv(ScenarioConfig(n_users=(1, 30)))
    check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (OBS_DIM,)


def test_env_is_seeded_deterministic():
    a = _rollout(SchedulerEnv(), seed=3)
    b = _rollout(SchedulerEnv(), seed=3)
    c = _rollout(SchedulerEnv(), seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_rewards_telescope_to_the_frame_utility_and_costs_to_violations():
    env = SchedulerEnv()
    for seed in range(3):
        _, rewards, costs, info = _rollout(env, seed, policy_seed=seed)
        ev = env.problem.evaluate(env.state.sel)
        assert rewards.sum() == np.float64(rewards.sum())
        np.testing.assert_allclose(rewards.sum(), ev.utility, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(info["frame_objective"], ev.objective, rtol=1e-9, atol=1e-9)
        assert costs.sum() == ev.n_violations == info["violations"]
    penalized = SchedulerEnv(reward_mode="penalized")
    _, rewards, _, info = _rollout(penalized, 1)
    np.testing.assert_allclose(rewards.sum(), info["frame_objective"], rtol=1e-9, atol=1e-9)


def test_masks_cover_each_users_budget_alone():
    env = SchedulerEnv()
    env.reset(seed=5)
    p = env.problem
    assert p.mask.any(1).all()
    alone = p.edge_steps * p.edge_step_seconds(1) + p.comm + p.local
    ok = (alone <= p.deadline[:, None]) & (p.energy <= p.energy_budget[:, None])
    assert (p.mask == ok)[ok.any(1)].all()
    assert env.action_masks().dtype == bool and env.action_masks().shape == (len(p.options),)
