"""Allocator: closed form vs cvxpy agreement, deadlines, infeasibility as a result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.allocator import DeadlineAllocator, allocate, closed_form, meets_deadlines


@pytest.fixture(scope="module")
def solver() -> DeadlineAllocator:
    return DeadlineAllocator()


@pytest.mark.parametrize("n", [1, 2, 5, 37, 100])
def test_closed_form_and_cvxpy_agree(solver, n):
    rng = np.random.default_rng(n)
    w = rng.uniform(0.01, 3.0, n)
    c = rng.uniform(0.001, 1.0, n)
    weights = rng.uniform(0.5, 2.0, n)
    if n > 2:
        w[0] = 0.0  # a user that runs nothing on the edge
    fast = closed_form(w, c, weights)
    slow = solver.solve(w, c, weights)
    assert slow.feasible and slow.solver == "cvxpy"
    assert abs(fast.objective - slow.objective) / fast.objective < 1e-4
    busy = w > 0
    np.testing.assert_allclose(slow.gpu_shares[busy], fast.gpu_shares[busy], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(slow.band_shares, fast.band_shares, rtol=1e-3, atol=1e-5)


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=50), st.floats(1e-3, 10.0))
@settings(max_examples=50, deadline=None)
def test_closed_form_shares_are_valid(work, comm):
    a = closed_form(work, [comm] * len(work))
    assert a.gpu_shares.sum() <= 1 + 1e-9 and a.band_shares.sum() <= 1 + 1e-9
    assert (a.gpu_shares >= 1e-6 * (1 - 1e-9)).all()
    assert np.isfinite(a.objective)


def test_closed_form_is_proportional_to_sqrt_weighted_work():
    a = closed_form([1.0, 4.0, 9.0], [0.0, 0.0, 0.0], weights=[1.0, 1.0, 4.0])
    np.testing.assert_allclose(a.gpu_shares, np.array([1, 2, 6]) / 9, rtol=1e-9)


def test_deadlines_move_shares_to_the_tight_user(solver):
    w, c = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    free = closed_form(w, c)
    assert free.edge_seconds[0] == pytest.approx(2.0)
    res = solver.solve(w, c, deadlines=[1.6, np.inf])
    assert res.feasible, res.status
    assert res.edge_seconds[0] <= 1.6 * (1 + 1e-4)
    assert res.gpu_shares[0] >= 1 / 1.6 - 1e-4
    assert meets_deadlines(res, [0, 0], [1.6, np.inf]).all()


def test_infeasible_budgets_are_reported_not_raised(solver):
    w, c = np.array([1.0, 1.0]), np.array([0.0, 0.0])
    # each needs x >= 2/3: together more than the whole GPU
    res = solver.solve(w, c, deadlines=[1.5, 1.5])
    assert not res.feasible and "infeasible" in res.status
    # local work alone misses the budget
    res = solver.solve(w, c, local=[5.0, 0.0], deadlines=[4.0, np.inf])
    assert not res.feasible and res.status == "infeasible"
    # the same budgets with room are feasible
    assert solver.solve(w, c, deadlines=[2.5, 2.5]).feasible


def test_two_resources_with_deadlines(solver):
    rng = np.random.default_rng(7)
    w, c, local = rng.uniform(0.1, 1, 20), rng.uniform(0.01, 0.3, 20), rng.uniform(0.5, 2, 20)
    free = closed_form(w, c)
    deadlines = (free.latencies + local) * 1.5  # room for the others...
    deadlines[:3] = (free.latencies[:3] + local[:3]) * 0.8  # ...to give to three users in a hurry
    res = solver.solve(w, c, local=local, deadlines=deadlines)
    assert res.feasible, res.status
    assert (res.latencies + local <= deadlines * (1 + 1e-4)).all()
    assert res.objective >= free.objective * (1 - 1e-6)  # deadlines can only cost


def test_allocate_uses_the_fast_path_unless_a_budget_binds(solver):
    w, c = np.array([1.0, 2.0]), np.array([0.1, 0.1])
    assert allocate(w, c, deadlines=[100.0, 100.0], solver=solver).solver == "closed_form"
    assert allocate(w, c, deadlines=[1.5, 100.0], solver=solver).solver == "cvxpy"
