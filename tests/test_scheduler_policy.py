"""Saved policy: round trip, mismatched files, inference; the PID Lagrangian; the planner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.features import OBS_DIM
from services.scheduler.decide.options import DEFAULT_OPTIONS, build_option_table
from services.scheduler.decide.planner import Plan, plan_frame, schedule_frame
from services.scheduler.decide.policy import PolicyFormatError, SchedulerPolicy
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.decide.scenario import UserSpec, sample_frame, scenario_for
from services.scheduler.defaults import DEFAULT_QUALITY, DEMO_COSTS, load_profiles, profile_ids
from services.scheduler.learn.lagrangian import PIDLagrangian

SHIPPED = Path(__file__).resolve().parents[1] / "services" / "scheduler" / "policies" / "default"
QUALITY = synthetic_profile()
COSTS = CostProfile()


def test_policy_round_trip(tmp_path):
    policy = SchedulerPolicy.random_init(DEFAULT_OPTIONS, hidden=(32, 16), seed=1)
    policy.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "actor.safetensors"}
    back = SchedulerPolicy.load(tmp_path, DEFAULT_OPTIONS)
    obs = np.random.default_rng(0).standard_normal((5, OBS_DIM)).astype(np.float32)
    np.testing.assert_array_equal(back.logits(obs), policy.logits(obs))
    torch = pytest.importorskip("torch")
    from services.scheduler.learn.torch_bridge import policy_to_torch

    with torch.no_grad():
        np.testing.assert_allclose(policy_to_torch(back)(torch.from_numpy(obs)).numpy(), policy.logits(obs), atol=1e-5)
    mask = np.zeros(len(DEFAULT_OPTIONS), bool)
    mask[[3, 7]] = True
    assert back.act(obs[0], mask) in (3, 7)


def test_mismatched_policy_files_raise_clear_errors(tmp_path):
    policy = SchedulerPolicy.random_init(DEFAULT_OPTIONS, hidden=(8,))
    policy.save(tmp_path)
    other = build_option_table(steps=(10, 20))
    with pytest.raises(PolicyFormatError, match="option table"):
        SchedulerPolicy.load(tmp_path, other)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [("features", ["x"] * OBS_DIM, "features"), ("obs_dim", OBS_DIM + 1, "obs_dim"),
                                ("version", 99, "version"), ("format", "pickle", "not a scheduler policy")]:
        broken = dict(config, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(PolicyFormatError, match=message):
            SchedulerPolicy.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden=[9])))  # weights are 8 wide
    with pytest.raises(PolicyFormatError, match="shape"):
        SchedulerPolicy.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "actor.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PolicyFormatError, match="unreadable"):
        SchedulerPolicy.load(tmp_path)
    with pytest.raises(PolicyFormatError, match="no config.json"):
        SchedulerPolicy.load(tmp_path / "missing")


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no trained policy shipped")
def test_shipped_policy_decides_100_users_within_their_masks():
    """Its speed is measured in bench/scheduler_quality.py, not here."""
    policy = SchedulerPolicy.load(SHIPPED, DEFAULT_OPTIONS)
    users, ctx = sample_frame(np.random.default_rng(0), n_users=100)
    problem = FrameProblem.build(users, QUALITY, COSTS, DEFAULT_OPTIONS, ctx)
    sel = policy(problem)
    assert sel.shape == (100,)
    assert problem.mask[np.arange(100), sel].all()


@pytest.mark.parametrize("hidden", [(64, 64), (32, 16, 8), (12,), ()])
def test_fast_inference_decides_like_the_reference_loop(hidden):
    """__call__ folds the static features into one product up front; the decisions must not change."""
    policy = SchedulerPolicy.random_init(DEFAULT_OPTIONS, hidden=hidden, seed=len(hidden))
    quality, costs = load_profiles(DEFAULT_QUALITY, DEMO_COSTS)
    rng = np.random.default_rng(5)
    for n, (q, c) in zip([1, 3, 40, 100, 64], [(QUALITY, COSTS), (quality, costs)] * 3):
        users, ctx = sample_frame(rng, scenario_for(q, c), n_users=n, costs=c)
        problem = FrameProblem.build(users, q, c, DEFAULT_OPTIONS, ctx)
        np.testing.assert_array_equal(policy(problem), policy.decide_reference(problem))


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no trained policy shipped")
@pytest.mark.parametrize("device_class", ["cpu-demo", "laptop-gpu", "phone", "cpu"])
def test_the_service_decider_plans_a_lone_user_optimally(device_class):
    """The service's default decider (shipped policy + one sweep for small frames) on the default
    profiles: a frame of one user, base or personalized, gets the exact optimum."""
    from services.scheduler.decide.baselines import polished
    from services.scheduler.decide.exact import exact_optimum
    from services.scheduler.defaults import POLISH_SWEEPS, POLISH_VISITS

    quality, costs = load_profiles(DEFAULT_QUALITY, DEMO_COSTS)
    decider = polished(SchedulerPolicy.load(SHIPPED, DEFAULT_OPTIONS), POLISH_SWEEPS, POLISH_VISITS)
    for user in ("base", "alice", "bob"):
        spec = UserSpec("u", device_class, 5.0, personalized=user != "base", profile_user=user)
        problem = FrameProblem.build([spec], quality, costs, DEFAULT_OPTIONS)
        _, best = exact_optimum(problem)
        got = problem.evaluate(decider(problem))
        assert got.objective == pytest.approx(best, abs=1e-9), (device_class, user)
        if user != "base":  # the LoRA only runs on the device: some late steps stay there
            assert got.quality[0] > 0.9


def test_pid_lagrangian_follows_the_constraint():
    pid = PIDLagrangian(cost_limit=0.02, lambda_init=0.0)
    for _ in range(5):
        pid.update(0.2)
    high = pid.lam
    assert high > 0
    for _ in range(50):
        pid.update(0.0)
    assert pid.lam < high
    assert pid.shape(1.0, 1.0) == pytest.approx((1.0 - pid.lam) / (1.0 + pid.lam))


@pytest.mark.parametrize("decider", ["greedy_ls", "best_fixed_split", "all_device", "random"])
def test_plan_frame_returns_consistent_plans(decider):
    users, ctx = sample_frame(np.random.default_rng(2), n_users=15)
    plans = plan_frame(users, QUALITY, COSTS, decider, ctx=ctx)
    assert [p.user_id for p in plans] == [u.user_id for u in users]
    assert all(isinstance(p, Plan) for p in plans)
    assert sum(p.gpu_share for p in plans) <= 1 + 1e-6 and sum(p.band_share for p in plans) <= 1 + 1e-6
    for p in plans:
        assert type(p.meets_budget) is bool
        assert 0 <= p.split <= p.steps
        assert p.latency_seconds == pytest.approx(p.edge_seconds + p.transfer_seconds + p.device_seconds)
        if p.split == 0:
            assert p.edge_seconds == p.transfer_seconds == p.gpu_share == 0 and p.handoff_bytes == 0
        else:
            assert p.gpu_share > 0 and p.handoff_bytes > 0


def test_plan_frame_repairs_shares_with_the_deadline_solver():
    # Two identical edge-only users; closed-form shares give both 2× the single-user time; user 0's
    # budget only fits if it gets more of the GPU, which user 1 (no budget) can give.
    costs = CostProfile(devices={"phone": COSTS.device("phone")})
    edge_only = build_option_table(steps=(20,), split_fractions=(1.0,), merge_ratios=(0.0,))
    mk = lambda i, d: UserSpec(f"u{i}", "phone", 5.0, latency_budget_s=d)  # noqa: E731
    probe = schedule_frame([mk(0, math.inf), mk(1, math.inf)], QUALITY, costs, "greedy_ls", options=edge_only)
    shared = probe.plans[0].latency_seconds
    decision = schedule_frame([mk(0, 0.8 * shared), mk(1, math.inf)], QUALITY, costs, "greedy_ls", options=edge_only)
    assert decision.evaluation.violations[0]  # the closed form misses it...
    assert decision.allocation is not None and decision.allocation.feasible  # ...the solver fixes it
    assert decision.plans[0].meets_budget and decision.plans[0].latency_seconds <= 0.8 * shared * (1 + 1e-3)
    assert decision.plans[0].gpu_share > decision.plans[1].gpu_share
    impossible = schedule_frame([mk(0, 0.3 * shared), mk(1, 0.3 * shared)], QUALITY, costs, "greedy_ls",
                                options=edge_only)
    assert impossible.allocation is not None and not impossible.allocation.feasible
    assert not any(p.meets_budget for p in impossible.plans)


def test_plan_frame_rejects_unknown_deciders():
    users, _ = sample_frame(np.random.default_rng(0), n_users=2)
    with pytest.raises(ValueError, match="unknown decider"):
        plan_frame(users, QUALITY, COSTS, "oracle")


def test_training_smoke_saves_a_loadable_policy(tmp_path):
    pytest.importorskip("sb3_contrib")
    from services.scheduler.learn.train import train

    meta = train(steps=256, seed=0, out=tmp_path, n_envs=2, n_steps=128, hidden=16, quiet=True)
    assert meta["mode"] == "lagrangian" and meta["cost_limit"] == 0.02
    policy = SchedulerPolicy.load(tmp_path, DEFAULT_OPTIONS)
    assert policy.config.hidden == (16, 16) and policy.config.meta["steps"] == 256
    assert (meta["quality_profile"], meta["cost_profile"]) == (meta["quality_profile_id"], meta["cost_profile_id"]) \
        == ("synthetic", "builtin")
    users, ctx = sample_frame(np.random.default_rng(1), n_users=7)
    problem = FrameProblem.build(users, QUALITY, COSTS, DEFAULT_OPTIONS, ctx)
    assert problem.mask[np.arange(7), policy(problem)].all()


def test_training_scenario_follows_the_measured_profiles():
    quality, costs = load_profiles(DEFAULT_QUALITY, DEMO_COSTS)
    scenario = scenario_for(quality, costs)
    assert dict(scenario.device_mix).keys() == costs.devices.keys()  # incl. the measured cpu-demo
    assert set(scenario.personalized_profiles) == set(quality.users()) - {"base"} == {"alice", "bob"}
    users, _ = sample_frame(np.random.default_rng(0), scenario, n_users=200, costs=costs)
    assert {u.profile_user for u in users if u.personalized} == {"alice", "bob"}
    assert {u.profile_user for u in users if not u.personalized} == {"base"}
    assert "cpu-demo" in {u.device_class for u in users}
    # the synthetic profiles keep the default scenario (and its random stream)
    assert scenario_for(QUALITY, COSTS).personalized_profiles == ("personalized",)
    quality, costs = load_profiles("synthetic", "builtin")
    assert quality.synthetic and costs.synthetic
    assert profile_ids("synthetic", "builtin") == ("synthetic", "builtin")
    assert profile_ids(DEFAULT_QUALITY, DEMO_COSTS)[0].startswith("sha256:")


def test_the_shipped_policy_was_trained_on_the_shipped_profiles():
    """A re-measured cost or quality profile needs the default policy retrained
    (python -m services.scheduler.learn.train, services/scheduler/README.md): else the scheduler
    warns at every start that its policy was trained on other profiles."""
    meta = SchedulerPolicy.load(SHIPPED).config.meta
    assert (meta["quality_profile_id"], meta["cost_profile_id"]) == profile_ids(DEFAULT_QUALITY, DEMO_COSTS)
