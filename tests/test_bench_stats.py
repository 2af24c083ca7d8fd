"""One way to count (issue 31): every bench's percentiles come from tandem/stats.py, numpy's
"linear" definition, so the p50/p90/p95/p99 figures of different benches are comparable."""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
from service_procs import ROOT

from tandem import stats as stats_module

BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def stats():
    return stats_module


@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [5, 1, 4, 2, 3], [0.1] * 7 + [9.0], list(range(100, 0, -3))])
@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 99, 100])
def test_the_helper_is_numpys_linear_percentile(stats, values, q):
    assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q, method="linear"))
    assert stats.percentile(np.asarray(values), q) == stats.percentile(values, q)


def test_linear_interpolates_between_the_nearest_ranks(stats):
    """By hand: the 95th of 1..4 sits at rank 0.95 * 3 = 2.85, between 3 and 4 (nearest rank would say 4)."""
    assert stats.percentile([4, 1, 3, 2], 95) == pytest.approx(3.85)
    assert stats.percentile([7.5], 99) == 7.5


def test_no_values_or_a_fraction_for_a_percent_is_a_clear_error(stats):
    with pytest.raises(ValueError, match="percentile 99 of no values"):
        stats.percentile([], 99)
    with pytest.raises(ValueError, match=r"must be in 0\.\.100 \(percent\), got 101"):
        stats.percentile([1.0], 101)


# A function of its own: one named like a percentile (percentile, quantile, p95, p99, ...), or a
# direct call of numpy's or statistics' own, anywhere in bench/ but the helper.
OWN_NAME = re.compile(r"(.*(percentile|quantile).*|p\d+)")
OWN_CALL = {"percentile", "nanpercentile", "quantile", "nanquantile", "quantiles"}


def _own_percentiles(path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and OWN_NAME.fullmatch(node.name):
            found.append(f"{path.name}:{node.lineno} defines {node.name}()")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in OWN_CALL:
            found.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}()")
    return found


def test_no_bench_counts_percentiles_its_own_way():
    benches = sorted(BENCH.rglob("*.py"))
    assert benches
    own = [line for path in benches for line in _own_percentiles(path)]
    assert not own, "use tandem.stats.percentile: " + "; ".join(own)
