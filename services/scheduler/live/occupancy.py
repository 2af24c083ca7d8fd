"""Who shared an edge with whom: the batch a request's edge steps really ran in, and how many
requests are on an edge when a new plan is made.

An edge batches every request it runs at once (continuous batching), so a step costs
``a + b·n`` with ``n`` the requests on the edge at that step, whatever frame planned them. The
scheduler sees frames, not the edge: two devices planned a few ms apart are two frames of one
user each, yet their steps share a batch. On a CPU edge ``b`` dominates (the SD-geometry pack:
a = 5 ms, b = 27 ms), so a report calibrated at batch 1 that ran at batch 2 says the edge is 1.7x
slower than it is, and the next request that runs alone is predicted 1.7x too slow.

:class:`EdgeOccupancy` keeps the spans that reports measured (start and end of a request's edge
steps, in the scheduler's clock) and gives a span's batch: 1 + the time-weighted number of other
spans on the same edge. A span is placed back from the report's arrival by the device's measured
phases after the edge (transfer, device steps, decode); the report's own delay (the device's image
encoding, the call) is about the same for every request, so it shifts spans alike and their
overlaps stay. Each other user counts at most once in a span's batch, so one user's reports (a
flood of long, made-up spans) can make another's batch at most one request larger. Pure logic;
the caller passes the clock and serializes calls.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HORIZON_S = 60.0  # spans older than this (by end, behind the newest) are forgotten
MAX_SPANS = 4096


@dataclass(frozen=True, slots=True)
class EdgeSpan:
    """One request's edge steps: on ``edge`` from ``start`` to ``end`` (the scheduler's clock)."""

    edge: str
    start: float
    end: float
    owner: str = ""  # whose report measured it

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def overlap(self, other: "EdgeSpan") -> float:
        if other.edge != self.edge:
            return 0.0
        return max(0.0, min(self.end, other.end) - max(self.start, other.start))


class EdgeOccupancy:
    def __init__(self, horizon_s: float = HORIZON_S, max_spans: int = MAX_SPANS):
        self.horizon_s = horizon_s
        self._spans: deque[EdgeSpan] = deque(maxlen=max_spans)
        self._newest = float("-inf")  # the latest end of any span added (the horizon's reference)

    def __len__(self) -> int:
        return len(self._spans)

    def spans(self) -> list[EdgeSpan]:
        """The spans kept, oldest first (what a restarted scheduler adds back)."""
        return list(self._spans)

    def add(self, span: EdgeSpan) -> None:
        if not span.seconds > 0:
            return
        self._spans.append(span)
        self._newest = max(self._newest, span.end)
        while self._spans and self._spans[0].end < self._newest - self.horizon_s:
            self._spans.popleft()

    def batch(self, span: EdgeSpan) -> float:
        """1 + the time-weighted number of other requests on ``span``'s edge during it (span
        itself counted once even when it was added)."""
        if not span.seconds > 0:
            return 1.0
        shared: dict[str, float] = {}
        for other in self._spans:
            if other is not span and (overlap := span.overlap(other)) > 0:
                shared[other.owner] = shared.get(other.owner, 0.0) + overlap / span.seconds
        return 1.0 + sum(min(share, 1.0) for share in shared.values())
