"""What one more UNet call costs the edge, measured as it serves: a + b·rows over its recent calls.

Requests of different latent shapes cannot share a UNet call, so a request whose shape is not the
batch's main one costs the iteration a whole call's fixed cost ``a`` on top of its rows' ``b``,
and every other request of the iteration waits for it. ``overhead_rows`` = a / b is that fixed
cost in rows of work: a few on a CPU running a small traced UNet, more on a GPU where a small call
is mostly launch overhead, near 0 on a CPU running a large UNet (compute-bound). The engine paces
such a request by it (``batching.due``), so that it costs the others about one usual request.
Pure: no torch, no gRPC.
"""

from __future__ import annotations

from collections import deque

from tandem.stats import fit_linear

MAX_OVERHEAD_ROWS = 64.0  # a fit beyond this is noise (a GPU's largest batches are about this)


class CallCostFit:
    """Least squares over the last ``window`` calls of (rows, seconds); ``overhead_rows`` is 0
    until the calls span at least two batch sizes (no pacing beyond pixels before it knows)."""

    def __init__(self, window: int = 256):
        if window < 2:
            raise ValueError(f"window: must be >= 2, got {window}")
        self._calls: deque[tuple[float, float]] = deque(maxlen=window)
        self._cached: float | None = 0.0

    def observe(self, rows: float, seconds: float) -> None:
        """One UNet call of ``rows`` requests' worth of pixels that took ``seconds``."""
        if rows > 0 and seconds >= 0:
            self._calls.append((rows, seconds))
            self._cached = None

    @property
    def overhead_rows(self) -> float:
        if self._cached is None:
            self._cached = self._fit()
        return self._cached

    def _fit(self) -> float:
        rows = [r for r, _ in self._calls]
        if len(set(rows)) < 2:
            return 0.0
        a, b, _ = fit_linear(rows, [s for _, s in self._calls])
        if b <= 0 or a <= 0:
            return 0.0
        return min(a / b, MAX_OVERHEAD_ROWS)
