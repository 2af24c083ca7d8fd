"""Continuous (iteration-level) batching policy, free of models and gRPC so it tests alone.

Requests wait in a bounded queue, one FIFO per identity (fairness.FairQueue); at every engine
iteration finished, cancelled and expired requests leave the running set, and free slots (up to
max_batch_size) go to the waiting identities in turn, each its oldest request, so a user with many
requests queued takes one slot per round like everyone else. Per-identity caps bound what one user
holds: requests waiting (beyond it: OwnerQueueFull, RESOURCE_EXHAUSTED) and running (its others
wait while it is at the cap). A request joins a batch at any step and leaves it as soon as it is done.
Only requests of one latent shape can share a UNet call: `buckets` splits a batch into such
groups, and the engine runs every group at every iteration, so no shape waits for another.
`due` paces requests larger than the usual size, so that each takes a usual request's share.

Two admission rules keep batches full without making anyone wait long (see `Batcher.next_iteration`):
an idle engine holds its first arrival for a short coalescing window so that requests arriving
together start together, and a running batch grows by a bounded step cost per iteration.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from services.edge_server.fairness import FairQueue


class Schedulable(Protocol):
    cancelled: bool
    deadline: float | None  # monotonic seconds; None = no deadline
    submitted_at: float  # monotonic seconds

    @property
    def finished(self) -> bool: ...


T = TypeVar("T", bound=Schedulable)


class QueueFull(Exception):
    """The wait queue is at capacity (maps to RESOURCE_EXHAUSTED)."""


class OwnerQueueFull(QueueFull):
    """The caller has as many requests waiting as one identity may (maps to RESOURCE_EXHAUSTED)."""


class Closed(Exception):
    """The engine is draining or stopped and takes no new requests (maps to UNAVAILABLE)."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    # An idle engine holds its waiting requests until none has arrived for `coalesce_s` (0 = start
    # at once), and never longer than `coalesce_max_s` after the first: a lone request waits
    # `coalesce_s`; a burst (requests sent together reach the server some ms apart) starts whole.
    coalesce_s: float = 0.01
    coalesce_max_s: float = 0.05
    # Per iteration, the running batch's predicted step cost a + b·n may grow by this fraction at
    # most (0 = no cap); `fixed_cost` is a/b, the step's fixed cost in requests' worth (the demo
    # pack on one CPU thread: a ≈ 38 ms, b ≈ 5 ms; on a GPU a batch is nearly free: a/b is larger).
    max_growth: float = 0.5
    fixed_cost: float = 8.0
    # Per identity (0 = no cap): requests queued beyond those it may run (max_running_per_owner, or
    # the batch), past which a new one is refused, and requests running, past which its waiting
    # ones let the others' go first. Off here (an engine in a test or a bench is one user); the
    # server turns them on (--max-queued-per-user, --max-running-per-user).
    max_queued_per_owner: int = 0
    max_running_per_owner: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or not 0 <= self.coalesce_s <= self.coalesce_max_s \
                or self.max_growth < 0 or self.fixed_cost < 0 or self.max_queued_per_owner < 0 \
                or self.max_running_per_owner < 0:
            raise ValueError(f"invalid batch config {self}")

    def admissible(self, running: int) -> int:
        """How many newcomers may join a batch of `running` this iteration (free slots permitting).

        The rule: with the step costing a + b·n, admitting k more slows every running request's
        step by the factor 1 + k / (a/b + n); that factor is kept at or below 1 + max_growth, and
        at least one newcomer is always admitted, so nobody waits for a free slot forever. An
        empty batch has nobody to slow down: all may start (the coalescing window gathered them).
        """
        if running == 0 or self.max_growth == 0:
            return self.max_batch_size
        return max(1, int(self.max_growth * (self.fixed_cost + running)))


@dataclass
class Iteration(Generic[T]):
    """What one engine iteration does: run `batch` (of which `admitted` are new); drop the rest."""

    batch: list[T] = field(default_factory=list)
    admitted: list[T] = field(default_factory=list)
    cancelled: list[T] = field(default_factory=list)
    expired: list[T] = field(default_factory=list)
    queue_changed: bool = False
    hold_until: float | None = None  # idle engine in its coalescing window: look again then


def owner_attribute(item: object) -> Hashable:
    """An item's identity: its ``owner`` attribute ("" when it has none: one shared identity)."""
    return getattr(item, "owner", "")


class Batcher(Generic[T]):
    """The edge's admission and batch selection (vLLM calls its counterpart a scheduler; ours is
    the batcher, the scheduler being the planning service). The engine talks to it only through
    these methods. ``owner``: whose an item is (fair turns and per-identity caps go by it)."""

    def __init__(self, config: BatchConfig = BatchConfig(), owner: Callable[[T], Hashable] = owner_attribute):
        self.config = config
        self.owner = owner
        self._waiting: FairQueue[T] = FairQueue(owner)
        self._running: list[T] = []
        self._running_by: Counter[Hashable] = Counter()
        self._closed = False

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def close(self) -> None:
        """No new requests from now on; queued and running ones still finish."""
        self._closed = True

    def take_all(self) -> list[T]:
        """Closes and empties the batcher; returns everything it held (queued first)."""
        self._closed = True
        leftovers = list(self._waiting) + self._running
        self._waiting.clear()
        self._running.clear()
        self._running_by.clear()
        return leftovers

    def submit(self, item: T) -> int:
        """Queues `item`; returns its position (0 = next). Raises QueueFull (OwnerQueueFull when its
        owner has the most requests waiting that one identity may) or Closed."""
        if self._closed:
            raise Closed("server is shutting down")
        if len(self._waiting) >= self.config.max_queue:
            raise QueueFull(f"queue full ({self.config.max_queue} waiting); retry later")
        owner, cap = self.owner(item), self.config.max_queued_per_owner
        if cap:
            waiting, running = self._waiting.count(owner), self._running_by[owner]
            if waiting >= cap + self._startable(running):
                raise OwnerQueueFull(f"{owner} already has {waiting} requests waiting on this edge and {running} "
                                     f"running: the per-user cap (--max-queued-per-user {cap} beyond those it may "
                                     f"run); retry when one of them finishes")
        self._waiting.append(item)
        return self.position(item)

    def _startable(self, running: int) -> int:
        """How many more of an owner's requests may run at once: those do not count as queued (a
        burst that arrives in the coalescing window waits a few ms for its batch, not for a slot)."""
        most = self.config.max_running_per_owner or self.config.max_batch_size
        return max(0, most - running)

    def position(self, item: T) -> int:
        """Where a waiting `item` stands in the turn order (0 = next; -1 when not waiting)."""
        return next((i for i, waiting in enumerate(self._waiting) if waiting is item), -1)

    def running_of(self, owner: Hashable) -> int:
        return self._running_by[owner]

    def waiting_of(self, owner: Hashable) -> int:
        return self._waiting.count(owner)

    def next_iteration(self, now: float) -> Iteration[T]:
        """Drops finished, cancelled and expired requests, admits waiting ones into free slots (as
        many as `BatchConfig.admissible` allows; the waiting identities in turn, each its oldest,
        an identity at its running cap skipped), and returns the batch to run.

        When nothing runs, the newest waiting request arrived less than `coalesce_s` ago, the
        oldest less than `coalesce_max_s` ago and the batch is not full yet, nothing starts:
        `hold_until` says when to look again. So a lone request waits `coalesce_s` for company, no
        request more than `coalesce_max_s`, and a burst starts as one batch (one prompt-encoder
        call, one first step) instead of a lone request and the rest."""
        step: Iteration[T] = Iteration()
        before = len(self._waiting)
        self._running = [r for r in self._running if not r.finished]
        for pool in (self._running, self._waiting):
            for item in list(pool):
                if item.cancelled:
                    step.cancelled.append(item)
                elif item.deadline is not None and now >= item.deadline:
                    step.expired.append(item)
                else:
                    continue
                pool.remove(item)
        self._running_by = Counter(self.owner(r) for r in self._running)
        hold = self._hold_until(now)
        limit = 0 if hold is not None else self.config.admissible(len(self._running))
        cap = self.config.max_running_per_owner
        at_cap = (lambda owner: self._running_by[owner] >= cap) if cap else (lambda owner: False)
        while self._waiting and len(self._running) < self.config.max_batch_size and len(step.admitted) < limit:
            chosen = self._waiting.pop(skip=at_cap)
            if chosen is None:  # every identity waiting is at its running cap
                break
            self._running.append(chosen)
            self._running_by[self.owner(chosen)] += 1
            step.admitted.append(chosen)
        step.batch = list(self._running)
        step.queue_changed = len(self._waiting) != before
        step.hold_until = hold
        return step

    def _hold_until(self, now: float) -> float | None:
        if self._running or not self._waiting or self._closed or len(self._waiting) >= self.config.max_batch_size:
            return None
        if self.config.coalesce_s == 0:
            return None
        oldest = min(item.submitted_at for item in self._waiting.heads())
        newest = max(item.submitted_at for item in self._waiting.tails())
        until = min(oldest + self.config.coalesce_max_s, newest + self.config.coalesce_s)
        return until if now < until else None

    def positions(self) -> list[tuple[T, int]]:
        return [(item, i) for i, item in enumerate(self._waiting)]

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running


def buckets(items: list[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """`items` grouped by `key` (what must match to share a UNet call), each group in its own
    order, groups in the order of their oldest member."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


class Paced(Protocol):
    weight: float  # its cost per step relative to a request of the pack's usual size, >= 1
    credit: float  # iterations earned towards its next step


P = TypeVar("P", bound=Paced)


def due(items: list[P]) -> list[P]:
    """Those of `items` that step this iteration. A request `weight` times the usual size steps
    once per `weight` iterations on average, so it takes a usual request's share of the engine's
    time, not `weight` times it (every iteration it shares would otherwise be that much slower
    for everyone). When none is due, all step: the engine never idles while it has work."""
    chosen = []
    for item in items:
        item.credit += 1.0
        if item.credit >= item.weight - 1e-9:  # weights from a fit: no float dust between steps
            chosen.append(item)
    chosen = chosen or list(items)
    for item in chosen:
        item.credit = max(0.0, item.credit - item.weight)
    return chosen
