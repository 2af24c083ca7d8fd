"""A policy for profiles it never saw: the randomized profile families it trains on, the profile's
summary in the observation (feature version 2), older policies still loading, and training on
the families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from services.scheduler.decide.features import FEATURES, OBS_DIM, STATIC_FEATURES, SequentialState
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.policy import PolicyFormatError, SchedulerPolicy
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.scenario import sample_frame
from services.scheduler.learn.env import SchedulerEnv
from services.scheduler.learn.families import ProfileFamily

POLICIES = Path(__file__).resolve().parents[1] / "services" / "scheduler" / "policies"


@pytest.fixture(scope="module")
def family():
    return ProfileFamily.around_defaults()


def frame(draw, seed: int = 0, n: int | None = None) -> FrameProblem:
    users, ctx = sample_frame(np.random.default_rng(seed), draw.scenario, n_users=n, costs=draw.costs)
    return FrameProblem.build(users, draw.quality, draw.costs, DEFAULT_OPTIONS, ctx)


def test_draws_are_seeded_and_varied(family):
    a, b = family.pool(3, 6), family.pool(3, 6)
    assert [d.costs.to_dict() for d in a] == [d.costs.to_dict() for d in b]
    assert [d.quality.to_dict() for d in a] == [d.quality.to_dict() for d in b]
    other = family.pool(4, 6)
    assert [d.costs.to_dict() for d in a] != [d.costs.to_dict() for d in other]
    edges = {round(d.costs.edge_coefficients().a_s, 6) for d in a}
    assert len(edges) == 6  # every draw its own edge
    for d in a:  # every draw is a usable profile: frames build, every option has a finite quality in [0, 1]
        p = frame(d, n=12)
        assert np.isfinite(p.quality).all() and (0 <= p.quality).all() and (p.quality <= 1).all()
        assert set(u.device_class for u in p.users) <= set(d.costs.devices)


def test_the_observation_carries_the_profiles_summary(family):
    d1, d2 = family.pool(5, 2)
    users, ctx = sample_frame(np.random.default_rng(0), d1.scenario, n_users=8, costs=d1.costs)
    s1 = SequentialState(FrameProblem.build(users, d1.quality, d1.costs, DEFAULT_OPTIONS, ctx))
    col = {name: i for i, name in enumerate(STATIC_FEATURES)}
    a1 = d1.costs.edge_coefficients().a_s / max(ctx.edge_capacity, 1e-6)
    assert s1.static_obs[0, col["log_edge_a"]] == pytest.approx(np.log(a1 / 0.025))
    p = s1.problem
    device_only = [i for i, o in enumerate(DEFAULT_OPTIONS) if o.split == 0]
    assert s1.static_obs[:, col["q_device"]] == pytest.approx(p.quality[:, device_only].max(1))
    assert s1.static_obs[:, col["q_best"]] == pytest.approx(p.quality.max(1))
    # Same users, another profile: the summary differs, the user features do not.
    users2 = [u for u in users if u.device_class in d2.costs.devices] or users[:0]
    if users2:
        s2 = SequentialState(FrameProblem.build(users2, d2.quality, d2.costs, DEFAULT_OPTIONS, ctx))
        assert s2.static_obs[0, col["log_edge_a"]] != s1.static_obs[0, col["log_edge_a"]]
    obs = s1.observation()
    assert obs.shape == (OBS_DIM,) and np.isfinite(obs).all() and len(FEATURES) == OBS_DIM


@pytest.mark.parametrize("name", ["default-unconstrained", "synthetic"])  # default was retrained with version 2
def test_committed_version_1_policies_still_load_and_read_their_own_columns(name, family):
    policy = SchedulerPolicy.load(POLICIES / name, DEFAULT_OPTIONS)
    assert policy.config.feature_version == 1 and policy.config.obs_dim < OBS_DIM
    for seed, draw in enumerate(family.pool(6, 3)):
        p = frame(draw, seed, n=15)
        np.testing.assert_array_equal(policy(p), policy.decide_reference(p))


def test_a_policy_of_an_unknown_feature_version_or_feature_says_retrain(tmp_path):
    source = POLICIES / "default"
    for key, value, needle in [("feature_version", 99, "v99"), ("features", None, "unknown: mystery")]:
        target = tmp_path / key
        shutil.copytree(source, target)
        config = json.loads((target / "config.json").read_text())
        if key == "features":
            config["features"][0] = "mystery"
        else:
            config[key] = value
        (target / "config.json").write_text(json.dumps(config))
        with pytest.raises(PolicyFormatError, match="retrain") as info:
            SchedulerPolicy.load(target)
        assert needle in str(info.value)


def test_the_env_draws_a_profile_per_episode(family):
    pool = family.pool(7, 4)
    env = SchedulerEnv(profiles=pool)
    seen = set()
    for seed in range(12):
        env.reset(seed=seed)
        seen.add(env.problem.edge_b)
    assert len(seen) > 1


def test_training_on_families_saves_a_general_policy(tmp_path, family):
    from services.scheduler.learn.train import train

    meta = train(steps=256, seed=0, out=tmp_path, n_envs=2, n_steps=128, hidden=16, quiet=True,
                 profiles=tuple(family.pool(8, 3)), checkpoint_every=128)
    assert meta["families"]["profiles"] == 3
    policy = SchedulerPolicy.load(tmp_path, DEFAULT_OPTIONS)
    assert policy.config.features == FEATURES and policy.config.meta["families"]
    assert SchedulerPolicy.load(tmp_path / "checkpoint", DEFAULT_OPTIONS).config.features == FEATURES
    p = frame(family.pool(9, 1)[0], n=10)
    np.testing.assert_array_equal(policy(p), policy.decide_reference(p))


def _local_search_by_enumeration(problem: FrameProblem, sel: np.ndarray) -> np.ndarray:
    """1-opt as it was written before the utility bound: every allowed option of every user
    evaluated on the whole frame."""
    sel = np.array(sel, dtype=int)
    current = float(problem.evaluate_batch(sel[None])[0])
    allowed = [np.flatnonzero(m) for m in problem.mask]
    while True:
        improved = False
        for i in range(problem.n_users):
            cand = np.repeat(sel[None], len(allowed[i]), 0)
            cand[:, i] = allowed[i]
            values = problem.evaluate_batch(cand)
            best = int(np.argmax(values))
            if values[best] > current + 1e-12 * max(1.0, abs(current)):
                sel[i], current, improved = allowed[i][best], float(values[best]), True
        if not improved:
            return sel


def test_local_search_with_the_utility_bound_moves_exactly_as_enumeration(family):
    from services.scheduler.decide.baselines import best_alone, local_search, random_choice

    draws = family.pool(10, 4)
    for seed, draw in enumerate(draws * 3):
        p = frame(draw, seed)
        for start in (best_alone(p), random_choice(p, seed)):
            np.testing.assert_array_equal(local_search(p, start), _local_search_by_enumeration(p, start))


def test_the_committed_general_policy_serves_without_the_trained_elsewhere_warning(caplog, family):
    from services.scheduler.live.guard import PolicyGuard
    from services.scheduler.server import load_decider, parse_args

    general = SchedulerPolicy.load(POLICIES / "general", DEFAULT_OPTIONS)
    assert general.config.features == FEATURES and general.config.meta["families"]["profiles"] == 512
    with caplog.at_level("WARNING", logger="tandem.scheduler"):
        decider = load_decider(parse_args(["--policy", str(POLICIES / "general")]))
    assert not caplog.records and isinstance(decider, PolicyGuard)
    p = frame(family.pool(11, 1)[0], n=20)
    np.testing.assert_array_equal(general(p), general.decide_reference(p))
