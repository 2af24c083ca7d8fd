"""The one percentile every bench reports, so that their p50/p90/p95/p99 figures are comparable:
numpy's default definition, named: method="linear" (Hyndman & Fan type 7, R's default too), which
interpolates between the two nearest ranks (the 95th of 1, 2, 3, 4 is 3.85, not nearest-rank's 4).
Benches and the scheduler import it from here (`from tandem.stats import percentile`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHOD = "linear"


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (q in percent, 0..100) of ``values``; a clear ValueError when there are none."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError(f"percentile {q:g} of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100 (percent), got {q:g}")
    return float(np.percentile(data, q, method="linear"))  # METHOD, spelt out for numpy's overloads


def fit_linear(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b·x and its R² (the a + b·n of a batched step: the scheduler's cost
    profile, the edge's measure of a UNet call's fixed cost)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(xs), xs], 1), ys, rcond=None)
    residual = float(((ys - a - b * xs) ** 2).sum())
    total = float(((ys - ys.mean()) ** 2).sum())
    return float(a), float(b), 1.0 - residual / total if total > 0 else 1.0
