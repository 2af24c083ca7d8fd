"""A link's rate and round trip as both sides estimate it from measured edge rounds: the device
from the handoffs it receives (services/ue_client/link.py), the scheduler from each user's reports
(services/scheduler/decide/calibration.py). Torch-free.

Each quantity is the median of its last ``WINDOW`` samples, claimed from ``MIN_SAMPLES`` on: a
median of 5 follows a changed link after 3 new samples, and one absurd sample never moves it.
Physically impossible samples are dropped. A rate is taken only from a handoff of at least
``MIN_RATE_BYTES``: a smaller one's arrival time is the network stacks', not the link's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median
from typing import TypeGuard

MIN_RATE_BYTES = 16 * 1024
WINDOW = 5
MIN_SAMPLES = 2
MIN_BPS, MAX_BPS = 1e3, 1e12
MAX_RTT_S = 10.0  # the longest round trip a device may claim or a report may teach


@dataclass(frozen=True)
class LinkEstimate:
    """A link's estimated rate and round trip; 0 means not known (yet)."""

    bandwidth_bps: float = 0.0
    rtt_s: float = 0.0
    rate_samples: int = 0
    rtt_samples: int = 0

    @property
    def known(self) -> bool:
        return self.bandwidth_bps > 0 or self.rtt_s > 0

    def describe(self) -> str:
        """e.g. ``9.7 Mbit/s, rtt 41 ms (measured, 5 handoffs)``."""
        rate = f"{self.bandwidth_bps / 1e6:.3g} Mbit/s" if self.bandwidth_bps > 0 else "rate unknown"
        rtt = f"rtt {self.rtt_s * 1e3:.0f} ms" if self.rtt_s > 0 else "rtt unknown"
        return f"{rate}, {rtt} (measured, {max(self.rate_samples, self.rtt_samples)} handoffs)"


def rate_bps(nbytes: int, seconds: float) -> float | None:
    """Bits per second of ``nbytes`` in ``seconds``; None when the handoff cannot tell."""
    if nbytes < MIN_RATE_BYTES or not seconds > 0:
        return None
    return nbytes * 8.0 / seconds


class LinkWindow:
    """The recent samples of one link."""

    def __init__(self, rates: Iterable[float] = (), rtts: Iterable[float] = ()):
        self.rates: deque[float] = deque((r for r in rates if ok_rate(r)), maxlen=WINDOW)
        self.rtts: deque[float] = deque((r for r in rtts if ok_rtt(r)), maxlen=WINDOW)

    def add(self, nbytes: int, seconds: float, rtt_s: float | None) -> int:
        """One round: ``nbytes`` took ``seconds``; its round trip ``rtt_s`` (None: not measured).
        Returns how many of its samples were impossible and dropped."""
        dropped = 0
        rate = rate_bps(nbytes, seconds)
        if rate is not None:
            if ok_rate(rate):
                self.rates.append(rate)
            else:
                dropped += 1
        if rtt_s is not None:
            if ok_rtt(rtt_s):
                self.rtts.append(rtt_s)
            else:
                dropped += 1
        return dropped

    def estimate(self) -> LinkEstimate:
        rate = median(self.rates) if len(self.rates) >= MIN_SAMPLES else 0.0
        rtt = median(self.rtts) if len(self.rtts) >= MIN_SAMPLES else 0.0
        return LinkEstimate(rate, rtt, len(self.rates), len(self.rtts))


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ok_rate(bps: float) -> bool:
    return is_number(bps) and math.isfinite(bps) and MIN_BPS <= bps <= MAX_BPS


def ok_rtt(seconds: float) -> bool:
    return is_number(seconds) and math.isfinite(seconds) and 0 < seconds <= MAX_RTT_S
