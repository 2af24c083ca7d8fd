"""Per-identity rate limit on Plan: a token bucket per caller, so one caller's flood of plan
requests costs the frames (and everyone else's plans) no more than its share.

Each identity (the servicer's ``owner_of``: the token's user with tokens on, else the request's
user_id, which a caller may claim freely, else its address) has a bucket of ``burst`` tokens,
refilled at ``rate`` per second; a Plan takes one, and without one it is refused
(RESOURCE_EXHAUSTED, with the seconds until the next token). At most ``max_identities`` buckets are
kept (the least recently used forgotten, as full), so a flood of identities bounds its own memory.
Pure logic with an injectable clock; thread-safe (the servicer calls it from the event loop only,
but the bucket map is cheap to guard).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.lru import Lru

PLAN_RATE = 20.0  # plans per second per identity: a device asks one per image
PLAN_BURST = 40  # what a caller may ask at once (a frame of its own devices, a retry storm's start)
MAX_IDENTITIES = 10_000  # as many as the per-user links and margins (a new identity starts full anyway)


@dataclass
class _Bucket:
    tokens: float
    at: float  # the clock when ``tokens`` was counted


class RateLimiter:
    """``rate`` tokens per second up to ``burst`` per identity; ``rate`` 0 = no limit."""

    def __init__(self, rate: float = PLAN_RATE, burst: int = PLAN_BURST, max_identities: int = MAX_IDENTITIES,
                 clock: Callable[[], float] = time.monotonic):
        if not (math.isfinite(rate) and rate >= 0) or burst < 1 or max_identities < 1:
            raise ValueError(f"rate limit: rate >= 0, burst >= 1 and max identities >= 1 expected, "
                             f"got {rate}, {burst}, {max_identities}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: Lru[str, _Bucket] = Lru(max_identities)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, identity: str) -> float:
        """0.0 when ``identity`` may go on (a token taken); else the seconds until it may."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(identity)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
                self._buckets.put(identity, bucket)
            bucket.tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.at) * self.rate)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)
