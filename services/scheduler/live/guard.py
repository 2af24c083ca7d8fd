"""The policy guard: checks the trained policy against greedy + local search on a sample of live
frames, and serves greedy + local search instead once the policy has fallen behind.

A policy is only as good as the profiles it generalizes to; this is how the service notices when
it does not. Every ``sample_every``-th frame the policy decided is handed, with the policy's
selection, to one background thread (off the request path: greedy + local search takes ~0.1 s at
100 users), which computes both objectives on the same frame. Over the last ``window`` checked
frames, if the policy's summed objective is more than ``tolerance`` (2 %) below the reference's,
the guard logs one line and falls back: every later frame is decided by the reference, until the
service restarts. A sample that arrives while a check is still running is skipped, so the checks
never cost more than one core's spare time.

    decider = PolicyGuard(polished(policy, 2, 128), GuardConfig(sample_every=10))
    plan_frame(users, quality, costs, decider)           # the policy, or greedy + LS after a fallback
    decider.status()                                      # GuardStatus(checked, ratio, fallback, ...)
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from services.scheduler.decide.baselines import greedy_ls
from services.scheduler.decide.planner import Decider
from services.scheduler.decide.problem import FrameProblem

log = logging.getLogger("tandem.scheduler")
REFERENCE_NAME = "greedy + local search"


@dataclass(frozen=True)
class GuardConfig:
    sample_every: int = 10  # check one frame in this many (0: never)
    window: int = 10  # checked frames the verdict sums over
    tolerance: float = 0.02  # fall back when the policy's objective is this far below the reference's
    background: bool = True  # False: check on the caller's thread (tests, offline runs)

    def __post_init__(self) -> None:
        if self.sample_every < 0 or self.window < 1 or not 0 <= self.tolerance < 1:
            raise ValueError(f"guard: sample_every >= 0, window >= 1 and tolerance in [0, 1) expected, got {self}")


@dataclass(frozen=True)
class GuardStatus:
    checked: int  # frames checked so far
    skipped: int  # sampled frames skipped because a check was still running
    ratio: float  # Σ J(policy) / Σ J(reference) over the window (nan until a frame is checked or if Σ J(ref) <= 0)
    fallback: bool  # serving the reference since the policy fell behind


class PolicyGuard:
    """A decider: the policy's selection, checked on a sample of frames; the reference's after a
    fallback."""

    def __init__(self, policy: Decider, config: GuardConfig = GuardConfig(), reference: Decider = greedy_ls) -> None:
        self.policy, self.reference, self.config = policy, reference, config
        self._window: deque[tuple[float, float]] = deque(maxlen=config.window)
        self._lock = threading.Lock()
        self._frames = self._checked = self._skipped = 0
        self._fallback = False
        self._queue: queue.Queue[tuple[FrameProblem, np.ndarray]] = queue.Queue(maxsize=1)
        self._worker: threading.Thread | None = None

    def __call__(self, problem: FrameProblem) -> np.ndarray:
        if self._fallback:
            return self.reference(problem)
        sel = np.asarray(self.policy(problem), dtype=int)
        self._frames += 1
        every = self.config.sample_every
        if every and problem.n_users and self._frames % every == 0:
            if not self.config.background:
                self.check(problem, sel)
            else:
                self._submit(problem, sel)
        return sel

    def _submit(self, problem: FrameProblem, sel: np.ndarray) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="policy-guard", daemon=True)
            self._worker.start()
        try:
            self._queue.put_nowait((problem, sel))
        except queue.Full:
            with self._lock:
                self._skipped += 1

    def _run(self) -> None:
        while not self._fallback:
            problem, sel = self._queue.get()
            try:
                self.check(problem, sel)
            except Exception:  # a failed check must not stop the guard, nor reach a request
                log.exception("policy guard: a check failed")

    def check(self, problem: FrameProblem, sel: np.ndarray) -> None:
        """Compare the policy's selection ``sel`` with the reference on ``problem``."""
        ref = np.asarray(self.reference(problem), dtype=int)
        j_policy, j_ref = (float(v) for v in problem.evaluate_batch(np.stack([sel, ref])))
        with self._lock:
            self._window.append((j_policy, j_ref))
            self._checked += 1
            policy_sum, ref_sum = (sum(v) for v in zip(*self._window))
            behind = ref_sum - policy_sum > self.config.tolerance * abs(ref_sum)
            trip = len(self._window) == self.config.window and behind and not self._fallback
            if trip:
                self._fallback = True
        if trip:
            ratio = policy_sum / ref_sum if ref_sum > 0 else float("nan")
            log.warning("policy guard: over the last %d checked frames the policy reached %.3fx the objective of %s "
                        "(%.4g vs %.4g; tolerance %.0f%%): serving %s until restart; use a policy trained for these "
                        "profiles", self.config.window, ratio, REFERENCE_NAME, policy_sum, ref_sum,
                        self.config.tolerance * 100, REFERENCE_NAME)

    def status(self) -> GuardStatus:
        with self._lock:
            sums = [sum(v) for v in zip(*self._window)] if self._window else [0.0, 0.0]
            ratio = sums[0] / sums[1] if self._window and sums[1] > 0 else float("nan")
            return GuardStatus(self._checked, self._skipped, ratio, self._fallback)
