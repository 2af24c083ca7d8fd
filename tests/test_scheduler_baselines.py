"""Exact search vs baselines on small frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.scheduler.decide.baselines import BASELINES, greedy_ls
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.exact import brute_force, exact_optimum, undominated
from services.scheduler.decide.options import DEFAULT_OPTIONS, build_option_table
from services.scheduler.decide.problem import FrameProblem
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.decide.scenario import sample_frame

QUALITY = synthetic_profile()
COSTS = CostProfile()


def _problem(seed: int, n: int, options=DEFAULT_OPTIONS) -> FrameProblem:
    users, ctx = sample_frame(np.random.default_rng(seed), n_users=n)
    return FrameProblem.build(users, QUALITY, COSTS, options, ctx)


def test_option_table():
    assert len(DEFAULT_OPTIONS) == 68  # k = 0 sends nothing, so its merge ratios collapse
    small = build_option_table(steps=(10,), split_fractions=(0.0, 1.0), merge_ratios=(0.0, 0.5))
    assert [(o.split, o.merge_ratio) for o in small] == [(0, 0.0), (10, 0.0), (10, 0.5)]


@pytest.mark.parametrize("seed,n", [(0, 1), (1, 2), (2, 2), (3, 3)])
def test_exact_search_equals_brute_force(seed, n):
    options = build_option_table(steps=(10, 20), split_fractions=(0.0, 0.5, 1.0), merge_ratios=(0.0, 0.5))
    p = _problem(seed, n, options)
    _, best = brute_force(p)
    sel, value = exact_optimum(p)
    assert value == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert p.evaluate_batch(sel[None])[0] == pytest.approx(value)


def test_dominance_pruning_keeps_an_optimum():
    p = _problem(9, 2)
    pruned = [undominated(p, i) for i in range(2)]
    grid = np.array(np.meshgrid(*pruned, indexing="ij")).reshape(2, -1).T
    assert p.evaluate_batch(grid).max() == pytest.approx(brute_force(p)[1])


@pytest.mark.parametrize("seed,n", [(10, 2), (11, 3), (12, 4), (13, 4)])
def test_exact_optimum_beats_every_baseline(seed, n):
    p = _problem(seed, n)
    _, best = exact_optimum(p)
    for name, decide in BASELINES.items():
        sel = decide(p)
        assert p.mask[np.arange(n), sel].all(), name  # baselines only pick allowed options
        assert p.evaluate_batch(sel[None])[0] <= best + 1e-9, name


def test_greedy_ls_is_close_to_the_optimum_on_small_frames():
    ratios = []
    for seed in range(12):
        p = _problem(100 + seed, 2 + seed % 3)
        _, best = exact_optimum(p)
        value = p.evaluate_batch(greedy_ls(p)[None])[0]
        ratios.append(value / best if best > 0 else (1.0 if value >= best - 1e-9 else 0.0))
    assert np.mean(ratios) >= 0.97, ratios
    assert min(ratios) >= 0.9, ratios


def test_a_polished_decider_repairs_a_bad_decision_in_one_sweep():
    from services.scheduler.decide.baselines import all_device, polished

    for seed in range(5):
        p = _problem(100 + seed, 6)
        bad = all_device(p)
        fixed = polished(all_device, sweeps=1)(p)
        before, after = p.evaluate_batch(np.stack([bad, fixed]))
        assert after >= before
        assert p.mask[np.arange(p.n_users), fixed].all()
    assert after > before  # all-device is far from the best on the default scenario
    # a visit budget stops the search after that many users: the others keep the decider's choice
    capped = polished(all_device, sweeps=2, max_visits=3)(p)
    np.testing.assert_array_equal(capped[3:], bad[3:])
    assert (capped[:3] != bad[:3]).any()
    # a budget of one frame's users is exactly one sweep
    np.testing.assert_array_equal(polished(all_device, sweeps=5, max_visits=p.n_users)(p), fixed)


def test_the_scheduler_server_rejects_a_negative_polish(capsys):
    from services.scheduler.server import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--polish-sweeps", "-1"])
    assert "--polish-sweeps: out of range, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--polish-visits", "0"])
    assert "--polish-visits: out of range, got 0" in capsys.readouterr().err


def test_the_server_warns_when_the_policy_was_trained_on_other_profiles(tmp_path, caplog):
    from services.scheduler.defaults import DEFAULT_QUALITY, DEMO_COSTS
    from services.scheduler.server import load_decider, parse_args

    synthetic = Path(__file__).resolve().parents[1] / "services" / "scheduler" / "policies" / "synthetic"
    with caplog.at_level("WARNING", logger="tandem.scheduler"):
        load_decider(parse_args(["--policy", str(synthetic), "--quality-profile", str(tmp_path / "none"),
                                 "--cost-profile", "builtin"]))
        assert not caplog.records  # trained on exactly these (the synthetic ones)
        load_decider(parse_args([]))  # the default policy on the default profiles
        assert not caplog.records
        load_decider(parse_args(["--policy", str(synthetic), "--quality-profile", str(DEFAULT_QUALITY),
                                 "--cost-profile", str(DEMO_COSTS)]))
    assert len(caplog.records) == 1 and "trained on other profiles" in caplog.records[0].getMessage()
