"""The edge servers the scheduler routes to: heartbeats in, least-loaded live edge out.

An edge is live while its last heartbeat is younger than ``ttl_s``. Its load is the requests it
reported (queued + running) plus the plans routed to it since that heartbeat, so a burst of
frames between two heartbeats still spreads out. Configured (static) edges that never heartbeat
are used only when no edge is live. No gRPC here; the clock is injectable for tests.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class EdgeLoad:
    """One heartbeat."""

    address: str
    queue_depth: int = 0
    running_requests: int = 0
    steps_per_second: float = 0.0


@dataclass
class _Entry:
    load: EdgeLoad
    seen_at: float
    routed_since: int = 0  # plans routed here since the last heartbeat

    @property
    def score(self) -> int:
        return self.load.queue_depth + self.load.running_requests + self.routed_since


class TooManyEdges(Exception):
    """A heartbeat from a new edge while ``max_edges`` are live."""


MAX_EDGES = 64


class EdgeRegistry:
    def __init__(self, ttl_s: float = 5.0, static: Iterable[str] = (), clock: Callable[[], float] = time.monotonic,
                 max_edges: int = MAX_EDGES):
        if not ttl_s > 0:
            raise ValueError(f"edge ttl must be > 0 s, got {ttl_s}")
        if max_edges < 1:
            raise ValueError(f"max edges must be >= 1, got {max_edges}")
        self.ttl_s = ttl_s
        self.max_edges = max_edges
        self.static = tuple(static)
        self._clock = clock
        self._edges: dict[str, _Entry] = {}
        self._static_turn = 0
        self._lock = threading.Lock()  # heartbeats on the event loop, routing on the frame thread

    def heartbeat(self, load: EdgeLoad) -> None:
        """Raises TooManyEdges for a new edge when ``max_edges`` are live (known ones always beat)."""
        with self._lock:
            if load.address not in self._edges:
                self._prune()
                if len(self._edges) >= self.max_edges:
                    raise TooManyEdges(f"{len(self._edges)} edges are live already (--max-edges {self.max_edges})")
            self._edges[load.address] = _Entry(load, self._clock())

    def _prune(self) -> None:
        now = self._clock()
        for address in [a for a, e in self._edges.items() if now - e.seen_at > self.ttl_s]:
            del self._edges[address]

    def live(self) -> list[EdgeLoad]:
        with self._lock:
            self._prune()
            return [e.load for e in self._edges.values()]

    def route(self, n: int) -> list[str]:
        """Addresses for ``n`` plans that use an edge, each to the least-loaded live edge at that
        moment (ties: faster edge, then address); "" for each when no edge is known."""
        with self._lock:
            self._prune()
            if not self._edges:
                return [self._next_static() for _ in range(n)]
            out = []
            for _ in range(n):
                address, entry = min(self._edges.items(),
                                     key=lambda kv: (kv[1].score, -_finite(kv[1].load.steps_per_second), kv[0]))
                entry.routed_since += 1
                out.append(address)
            return out

    def sole_address(self) -> str:
        """The edge a step run without a routed plan (a k = 0 plan run on the edge anyway) must
        have run on: the only live edge, else, with none live, the only configured one (the
        address route() gives plans then); "" when there are several or none."""
        with self._lock:
            self._prune()
            if self._edges:
                return next(iter(self._edges)) if len(self._edges) == 1 else ""
            return self.static[0] if len(self.static) == 1 else ""

    def export(self, wall_now: float) -> list[dict]:
        """The live edges heard by heartbeat, each with its last load and when it was heard (in
        wall-clock seconds, ``wall_now`` being now): a scheduler restarted within their TTL routes
        to them at once, before their next heartbeat reaches it."""
        with self._lock:
            self._prune()
            offset = wall_now - self._clock()
            return [{"address": e.load.address, "queue_depth": e.load.queue_depth,
                     "running_requests": e.load.running_requests, "steps_per_second": e.load.steps_per_second,
                     "seen_at": e.seen_at + offset} for e in self._edges.values()]

    def restore(self, entries: list[tuple[EdgeLoad, float]], wall_now: float) -> None:
        """Takes back what :meth:`export` gave (as (load, seen at) pairs, checked by the caller):
        those still within their TTL are live until it ends or they beat again, up to ``max_edges``."""
        with self._lock:
            offset = self._clock() - wall_now
            for load, seen_at in entries:
                if len(self._edges) < self.max_edges and load.address not in self._edges:
                    self._edges[load.address] = _Entry(load, min(seen_at + offset, self._clock()))
            self._prune()

    def _next_static(self) -> str:
        if not self.static:
            return ""
        self._static_turn = (self._static_turn + 1) % len(self.static)
        return self.static[self._static_turn - 1]


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
