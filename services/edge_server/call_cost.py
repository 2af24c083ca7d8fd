"""What one more UNet call costs the edge, measured as it serves: a + b·rows over its recent calls,
and the last call of each latent shape.

Requests of different latent shapes cannot share a UNet call, so a request whose shape is not the
batch's main one costs the iteration a whole call's fixed cost ``a`` on top of its rows' ``b``,
and every other request of the iteration waits for it. ``overhead_rows`` = a / b is that fixed
cost in rows of work: a few on a CPU running a small traced UNet, more on a GPU where a small call
is mostly launch overhead, near 0 on a CPU running a large UNet (compute-bound). Where a shape's own
call was measured, ``weight`` uses that call's seconds instead (an odd shape may run eager, with a
larger fixed cost than the traced usual one). The engine paces such a request by its weight
(``batching.due``), so that it costs the others about one usual request. Pure: no torch, no gRPC.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

from tandem.stats import fit_linear

MAX_OVERHEAD_ROWS = 64.0  # a fit beyond this is noise (a GPU's largest batches are about this)
MAX_SHAPES = 32  # shapes whose last call is remembered


class CallCostFit:
    """Least squares over the last ``window`` calls of (rows, seconds); ``overhead_rows`` is 0
    until the calls span at least two batch sizes (no pacing beyond pixels before it knows)."""

    def __init__(self, window: int = 256):
        if window < 2:
            raise ValueError(f"window: must be >= 2, got {window}")
        self._calls: deque[tuple[float, float]] = deque(maxlen=window)
        self._cached: tuple[float, float] | None = (0.0, 0.0)
        self._last: OrderedDict[Hashable, float] = OrderedDict()  # shape -> its last call's seconds

    def observe(self, rows: float, seconds: float, shape: Hashable = None) -> None:
        """One UNet call of ``rows`` requests' worth of pixels that took ``seconds`` (of ``shape``)."""
        if rows > 0 and seconds >= 0:
            self._calls.append((rows, seconds))
            self._cached = None
            if shape is not None:
                self._last[shape] = seconds
                self._last.move_to_end(shape)
                while len(self._last) > MAX_SHAPES:
                    self._last.popitem(last=False)

    def weight(self, shape: Hashable, members: int, pixels: float) -> float:
        """A request's cost per step relative to a usual request when its ``shape`` group of
        ``members`` runs in its own call: its share of that call, in usual rows (the shape's last
        call's seconds over members × b), else its pixels + the fitted fixed cost split among them."""
        b = self.seconds_per_row
        last = self._last.get(shape)
        if last is not None and b > 0:
            return max(pixels, last / (members * b))
        return pixels + self.overhead_rows / members

    @property
    def overhead_rows(self) -> float:
        """a / b: a call's fixed cost in rows of work (0 until the fit is meaningful)."""
        return self._fitted()[0]

    @property
    def seconds_per_row(self) -> float:
        """b: one more row's seconds in a call (0 until the fit is meaningful)."""
        return self._fitted()[1]

    def _fitted(self) -> tuple[float, float]:
        if self._cached is None:
            self._cached = self._fit()
        return self._cached

    def _fit(self) -> tuple[float, float]:
        rows = [r for r, _ in self._calls]
        if len(set(rows)) < 2:
            return 0.0, 0.0
        a, b, _ = fit_linear(rows, [s for _, s in self._calls])
        if b <= 0 or a <= 0:
            return 0.0, 0.0
        return min(a / b, MAX_OVERHEAD_ROWS), b
