"""The edge servers the scheduler routes to: heartbeats in, for each plan the live edge where its
edge steps would finish first out (decide/routing.py: each edge's own measured speed and its load).

An edge is live while its last heartbeat is younger than ``ttl_s``, until it says it is leaving
(the heartbeat a draining edge sends at once): then it gets no new plan, before its TTL ends, until
it beats again without saying so (restarted). Its load is the requests it reported (queued +
running) plus the plans routed to it since that heartbeat, so a burst of frames between two
heartbeats still spreads out. Its speed: the decayed sums of the work its heartbeats measured.
Configured (static) edges that never heartbeat are used only when no edge is live (one that said
it is leaving is skipped until it beats again). No gRPC here; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.scheduler.decide import routing
from services.scheduler.decide.routing import EdgeView, Speed, StepModel


@dataclass(frozen=True)
class EdgeLoad:
    """One heartbeat."""

    address: str
    queue_depth: int = 0
    running_requests: int = 0
    steps_per_second: float = 0.0
    leaving: bool = False  # the edge is draining: route nothing new to it
    # The work its UNet did over the heartbeat's interval (routing.Speed): 0, 0, 0 when none.
    interval_iterations: int = 0
    interval_steps: int = 0
    interval_busy_s: float = 0.0


@dataclass
class _Entry:
    load: EdgeLoad
    seen_at: float
    routed_since: int = 0  # plans routed here since the last heartbeat
    speed: Speed = field(default_factory=Speed)

    @property
    def score(self) -> int:
        return self.load.queue_depth + self.load.running_requests + self.routed_since

    def view(self) -> EdgeView:
        return EdgeView(self.load.address, self.score, self.speed, self.load.steps_per_second)


class TooManyEdges(Exception):
    """A heartbeat from a new edge while ``max_edges`` are live."""


MAX_EDGES = 64


class EdgeRegistry:
    def __init__(self, ttl_s: float = 5.0, static: Iterable[str] = (), clock: Callable[[], float] = time.monotonic,
                 max_edges: int = MAX_EDGES, policy: str = "finish"):
        if not ttl_s > 0:
            raise ValueError(f"edge ttl must be > 0 s, got {ttl_s}")
        if max_edges < 1:
            raise ValueError(f"max edges must be >= 1, got {max_edges}")
        if policy not in routing.ROUTERS:
            raise ValueError(f"unknown routing policy {policy!r}; expected one of {', '.join(routing.ROUTERS)}")
        self.ttl_s = ttl_s
        self.max_edges = max_edges
        self.static = tuple(static)
        self.policy = policy  # "finish"; the others are the bench's baselines (routing.ROUTERS)
        self._clock = clock
        self._edges: dict[str, _Entry] = {}
        self._left: set[str] = set()  # configured edges that said they are leaving (and not beaten since)
        self._static_turn = 0
        self._turn = 0  # round robin's (a baseline)
        self._lock = threading.Lock()  # heartbeats on the event loop, routing on the frame thread

    def heartbeat(self, load: EdgeLoad) -> None:
        """Raises TooManyEdges for a new edge when ``max_edges`` are live (known ones always beat).
        A leaving edge is dropped at once (never refused: it only takes itself out)."""
        with self._lock:
            if load.leaving:
                self._edges.pop(load.address, None)
                if load.address in self.static:
                    self._left.add(load.address)
                return
            self._left.discard(load.address)
            entry = self._edges.get(load.address)
            if entry is None:
                self._prune()
                if len(self._edges) >= self.max_edges:
                    raise TooManyEdges(f"{len(self._edges)} edges are live already (--max-edges {self.max_edges})")
            speed = entry.speed if entry is not None else Speed()
            speed = speed.observe(load.interval_iterations, load.interval_steps, load.interval_busy_s)
            self._edges[load.address] = _Entry(load, self._clock(), speed=speed)

    def _prune(self) -> None:
        now = self._clock()
        for address in [a for a, e in self._edges.items() if now - e.seen_at > self.ttl_s]:
            del self._edges[address]

    def live(self) -> list[EdgeLoad]:
        with self._lock:
            self._prune()
            return [e.load for e in self._edges.values()]

    def route(self, steps: int | Sequence[int], model: StepModel | None = None) -> list[str]:
        """Addresses for plans that use an edge (``steps``: each plan's edge steps k, or how many
        plans), each to the live edge where it would finish first (routing.route with this
        registry's policy; ``model``: the cost model's a + b·n, default the built-in profile's),
        the frame's earlier plans counted on their edges; "" for each when no edge is known."""
        steps = [1] * steps if isinstance(steps, int) else list(steps)
        with self._lock:
            self._prune()
            if not self._edges:
                return [self._next_static() for _ in steps]
            out = routing.route([e.view() for e in self._edges.values()], steps, model or StepModel(), self.policy,
                                self._turn)
            self._turn += len(steps)
            for address in out:
                self._edges[address].routed_since += 1
            return out

    def speeds(self, model: StepModel | None = None) -> dict[str, float]:
        """Each live edge's measured seconds over the model's (1: not measured yet)."""
        with self._lock:
            self._prune()
            return {a: e.speed.scale(model or StepModel()) for a, e in self._edges.items()}

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
        usable = [a for a in self.static if a not in self._left]
        if not usable:
            return ""
        self._static_turn = (self._static_turn + 1) % len(usable)
        return usable[self._static_turn - 1]
