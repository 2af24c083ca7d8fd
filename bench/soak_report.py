"""The pure parts of bench/soak.py: who the simulated users are, when they send, the chaos
schedule, what one request's record says, and the targets of issue 29 evaluated from the
records into the one table the bench prints. No network, no processes, no clock: the tests
(tests/test_soak_bench.py) run all of it on synthetic records.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.stats import percentile

# --- the users ----------------------------------------------------------------------------------

DEVICE_CLASS = "cpu-demo"  # the class the demo cost profile measured (services/scheduler/profiles/demo_cpu.json)
BENIGN = "benign"
MISBEHAVING = ("burst", "odd-size", "cancel-storm", "absurd")
PROMPT_WORDS = (("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
                ("circle", "square", "triangle"), ("left", "right", "top", "bottom", "center"))


@dataclass(frozen=True)
class UserSpec:
    """One simulated benign user: a person's app calling a device service's Generate as
    `tandem generate --ue --scheduler` does (link estimate, plan, generate, report)."""

    name: str
    device: int  # index of the benign device service it calls
    sizes: tuple[int, ...]  # image sides, one request after another
    lora: str | None = None  # the demo pack's users: alice, bob
    budget_s: float = 0.0  # latency budget sent with the plan request (0: none)
    rate_hz: float = 0.25  # mean requests per second while the arrivals are open
    pattern: str = "poisson"  # or "bursts": the same mean rate in bursts of BURST requests
    timeout_s: float = 20.0  # the edge deadline it asks the device service for

    @property
    def edge_timeout_s(self) -> float:
        """What the app gives the edge: twice its budget (the device then finishes alone), else its default."""
        return max(2.0, 2 * self.budget_s) if self.budget_s else self.timeout_s


BURST = 3


def benign_users(devices: int = 3, rate_hz: float = 0.25) -> list[UserSpec]:
    """Two users per benign device service, the same pair of request costs on every device (a
    small-image user cycling 32 and 48 px, a 64 px user), so that when all are backlogged every
    device has the same work and equal shares are what a fair system gives. LoRA users (the
    demo pack's alice and bob), latency budgets and bursty arrivals vary across them."""
    budgets = (1.5, 0.0, 3.0, 2.0, 0.0, 1.0)
    loras = ("alice", None, "bob", None, None, None)
    names = ("alice", "carol", "bob", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "kim", "leo")
    users = []
    for i in range(2 * devices):
        small = i % 2 == 0
        users.append(UserSpec(
            name=names[i % len(names)] + ("" if i < len(names) else str(i)), device=i // 2,
            sizes=(32, 48) if small else (64,), lora=loras[i % len(loras)], budget_s=budgets[i % len(budgets)],
            rate_hz=rate_hz, pattern="bursts" if i % 3 == 2 else "poisson"))
    return users


def arrivals(rng: random.Random, pattern: str, rate_hz: float, duration_s: float) -> list[float]:
    """Send times in [0, duration_s): a Poisson process at `rate_hz`, or bursts of BURST requests
    50 ms apart whose starts are a Poisson process at rate_hz / BURST (the same mean rate)."""
    if rate_hz <= 0 or duration_s <= 0:
        return []
    if pattern not in ("poisson", "bursts"):
        raise ValueError(f"unknown arrival pattern {pattern!r}")
    size = BURST if pattern == "bursts" else 1
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate_hz / size)
        if t >= duration_s:
            return sorted(times)  # a burst may start before the last one's tail
        times += [t + 0.05 * j for j in range(size) if t + 0.05 * j < duration_s]


def prompt(rng: random.Random) -> str:
    colour, shape, place = (rng.choice(words) for words in PROMPT_WORDS)
    background = rng.choice([c for c in PROMPT_WORDS[0] if c != colour])
    return f"a {colour} {shape} at the {place} on a {background} background"


# --- the chaos schedule -----------------------------------------------------------------------------

ACTIONS = ("sigstop", "kill9", "restart", "reshape")


@dataclass(frozen=True)
class ChaosEvent:
    """`at`: seconds into the soak's open segment; `hold`: SIGSTOP until SIGCONT, kill -9 until
    the restart, a reshaped link until it is restored (0 for a restart: it is back when healthy)."""

    at: float
    action: str
    target: str
    hold: float = 0.0

    @property
    def label(self) -> str:
        what = {"sigstop": "SIGSTOP/SIGCONT", "kill9": "kill -9 + restart", "restart": "restart",
                "reshape": "link reshaped"}[self.action]
        return f"{what} {self.target}"


def chaos_schedule(open_s: float, shaped_links: bool) -> list[ChaosEvent]:
    """The soak's chaos, planned over its open segment (`open_s` seconds): an edge killed -9
    and restarted on its address after a while, a device service restarted, the other edge
    stopped (SIGSTOP) and continued, with the testbed's shaped links one link slowed down and
    restored, and last the scheduler restarted (it restores its --state-file; its next 20
    plans are compared with the 20 before). The restarts of the edge and the device come first,
    so that the new processes are measured after a warm-up of their own."""
    if open_s <= 0:
        raise ValueError("the open segment must last some time")
    events = [
        ChaosEvent(0.05 * open_s, "kill9", "edge0", max(4.0, 0.05 * open_s)),
        ChaosEvent(0.25 * open_s, "restart", "dev1"),
        ChaosEvent(0.45 * open_s, "sigstop", "edge1", max(3.0, 0.04 * open_s)),
    ]
    if shaped_links:
        events.append(ChaosEvent(0.55 * open_s, "reshape", "edge0", max(3.0, 0.06 * open_s)))
    events.append(ChaosEvent(0.70 * open_s, "restart", "scheduler"))
    return events


# --- records -------------------------------------------------------------------------------------------

# A request ends answered (an image, OK), or with one of these statuses, which name what happened
# and leave the caller knowing it; anything else (UNKNOWN, INTERNAL, DATA_LOSS, a deadline the
# service let pass, an exception, or no end at all) is a request without an answer.
CLEAR_STATUSES = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "PERMISSION_DENIED",
                            "UNAUTHENTICATED", "FAILED_PRECONDITION", "NOT_FOUND", "OUT_OF_RANGE"})
NO_ANSWER = "NO_ANSWER"  # still open when the bench stopped waiting for it


@dataclass
class Record:
    """One call as its caller saw it. Times are seconds since the run's start."""

    user: str
    kind: str  # "benign" or one of MISBEHAVING
    phase: str  # "warm-up", "quiet", "soak"
    segment: str  # "open" (arrivals) or "backlog" (every benign user keeps requests waiting)
    call: str  # "generate" (device service), "edge" (an edge directly), "plan", "report"
    service: str  # the device service, edge or scheduler called
    started: float
    ended: float = math.nan
    code: str = NO_ANSWER  # "OK", a gRPC status name, or "EXCEPTION"
    detail: str = ""
    fallback: str = ""  # the device's reason when it finished alone
    cancelled: bool = False  # the caller cancelled it (cancel storms)
    planned: bool = False  # a scheduler's plan drove it
    plan_code: str = ""  # the Plan call's status ("" when none was asked)
    predicted_s: float = math.nan  # the plan's predicted total
    error: float = math.nan  # |measured - predicted| / predicted, as planned (no fallback, the plan's split)
    measured_s: float = math.nan  # the device's phase timers summed (what Report sends): latency less the waits
    size: int = 0

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def outcome(self) -> str:
        """ok, fallback (an image the device finished alone), status (a clear one), cancelled
        (by its caller) or lost (no answer, no clear status)."""
        if self.code == "OK":
            return "fallback" if self.fallback else "ok"
        if self.cancelled and self.code == "CANCELLED":
            return "cancelled"
        return "status" if self.code in CLEAR_STATUSES else "lost"


def fallback_reason(text: str) -> str:
    """The device's fallback sentence as a short reason: the edge's status, a rejected
    handoff, or no edge."""
    if not text:
        return ""
    if text.startswith("edge failed (") and ":" in text:
        return "edge " + text[len("edge failed ("):].split(":", 1)[0].split(" ", 1)[0]
    if text.startswith("edge handoff rejected"):
        return "handoff rejected"
    if text.startswith("no edge"):
        return "no edge"
    return text.split("(", 1)[0].strip()[:40]


@dataclass(frozen=True)
class ChaosRecord:
    """What the chaos runner did: the event, when it began (signal sent) and when the target was
    back (healthy again, SIGCONT sent, the link restored); NaN when it did not run."""

    event: ChaosEvent
    began: float
    recovered: float
    note: str = ""


@dataclass(frozen=True)
class Instance:
    """One process of a service (a restart makes a new one): its RSS counts from `warm_at`."""

    name: str
    service: str
    started: float
    warm_at: float
    ended: float = math.nan  # killed or stopped before the end (NaN: alive at the end)


@dataclass
class Check:
    what: str
    measured: str
    target: str = "—"
    ok: bool | None = None  # None: a figure shown, no target (or not measurable here, said in `measured`)
    timing: bool = False  # a latency target: a shared machine's load moves it (bench.soak --timing-targets)


# --- the targets ----------------------------------------------------------------------------------

P99_RATIO = 1.5
SHARE_TOLERANCE = 0.20
RSS_GROWTH = 0.10
PREDICTION_POINTS = 5.0
PLANS_COMPARED = 20


def lost_requests(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.outcome == "lost"]


def in_flight(records: Iterable[Record], begin: float, end: float) -> list[Record]:
    """Requests open at some moment of [begin, end] (a chaos event's window)."""
    return [r for r in records if r.call in ("generate", "edge") and r.started <= end
            and (math.isnan(r.ended) or r.ended >= begin)]


def slowest(records: Iterable[Record], chaos: Sequence[ChaosRecord], phase: str = "soak",
            count: int = 3) -> list[tuple[Record, str]]:
    """The `count` slowest answered benign requests of `phase`'s arrivals (what its p99 is made
    of), each with the chaos events it was in flight across ("" when none): the table then says
    which fault made the tail."""
    answered = [r for r in records if r.kind == BENIGN and r.phase == phase and r.segment == "open"
                and r.call == "generate" and r.code == "OK"]
    tail = sorted(answered, key=lambda r: r.latency, reverse=True)[:count]
    return [(r, ", ".join(c.event.label for c in chaos if not math.isnan(c.began)
                          and r.started <= c.recovered and r.ended >= c.began)) for r in tail]


def benign_latencies(records: Iterable[Record], phase: str) -> list[float]:
    return [r.latency for r in records if r.kind == BENIGN and r.phase == phase and r.segment == "open"
            and r.call == "generate" and r.code == "OK"]


def shares(records: Iterable[Record], phase: str, users: Sequence[str], window: tuple[float, float]) -> dict[str, float]:
    """Each benign user's completed images (ended inside `window`) over all of theirs, as a
    multiple of the equal share (1.0 = exactly 1/len(users))."""
    done = backlog_completions(records, phase, window)
    total = sum(done[u] for u in users)
    return {u: (done[u] / total * len(users) if total else 0.0) for u in users}


def backlog_completions(records: Iterable[Record], phase: str, window: tuple[float, float]) -> Counter:
    """Images each benign user got from the requests it sent while backlogged, done inside `window`."""
    return Counter(r.user for r in records if r.kind == BENIGN and r.phase == phase and r.segment == "backlog"
                   and r.call == "generate" and r.code == "OK" and window[0] <= r.ended <= window[1])


def prediction_windows(records: Iterable[Record], restart: ChaosRecord,
                       phase: str = "soak") -> tuple[list[Record], list[Record]]:
    """The PLANS_COMPARED as-planned benign plans of the soak's arrivals reported last before
    the scheduler went down and first after it was back."""
    planned = sorted((r for r in records if r.kind == BENIGN and r.phase == phase and r.segment == "open"
                      and r.call == "generate" and not math.isnan(r.error)), key=lambda r: r.started)
    before = [r for r in planned if r.ended < restart.began][-PLANS_COMPARED:]
    after = [r for r in planned if r.started >= restart.recovered][:PLANS_COMPARED]
    return before, after


def prediction_errors(records: Iterable[Record], restart: ChaosRecord, phase: str = "soak") -> tuple[list[float], list[float]]:
    """Those plans' relative errors |measured - predicted| / predicted."""
    before, after = prediction_windows(records, restart, phase)
    return [r.error for r in before], [r.error for r in after]


def rss_growth(samples: Sequence[tuple[float, str, int]], instance: Instance, end: float) -> tuple[int, int] | None:
    """(RSS at the first sample from the instance's warm-up point, RSS at its last sample up to
    `end`), or None when it has no sample after its warm-up."""
    own = [(t, rss) for t, name, rss in samples if name == instance.name]
    warm = [rss for t, rss in own if t >= instance.warm_at]
    last = [rss for t, rss in own if t <= end]
    if not warm or not last or own[-1][0] < instance.warm_at:
        return None
    return warm[0], last[-1]


def second_half_growth(samples: Sequence[tuple[float, str, int]], instance: Instance, end: float) -> float | None:
    """RSS growth over the second half of the instance's measured span (from its warm-up point
    to its last sample): near 0 when the growth was a high-water mark reached early, not a leak."""
    own = [(t, rss) for t, name, rss in samples if name == instance.name and instance.warm_at <= t <= end]
    if len(own) < 4:
        return None
    middle = (own[0][0] + own[-1][0]) / 2
    second = [rss for t, rss in own if t >= middle]
    return (second[-1] - second[0]) / second[0]


def evaluate(records: Sequence[Record], chaos: Sequence[ChaosRecord], instances: Sequence[Instance],
             samples: Sequence[tuple[float, str, int]], end: float, benign: Sequence[str],
             backlog: dict[str, tuple[float, float]]) -> list[Check]:
    """Every target of the issue as rows of the table (and the figures around them).
    `backlog`: per phase, the window where every benign user was backlogged."""
    checks: list[Check] = []
    outcomes = Counter(r.outcome for r in records)
    checks.append(Check("calls by outcome (all users, all phases)",
                        ", ".join(f"{k} {outcomes[k]}" for k in ("ok", "fallback", "status", "cancelled", "lost"))))
    reasons = Counter(fallback_reason(r.fallback) for r in records if r.outcome == "fallback")
    if reasons:
        checks.append(Check("fallbacks by reason", ", ".join(f"{k} {v}" for k, v in reasons.most_common(6))))
    statuses = Counter(f"{r.kind} {r.call} {r.code}" for r in records if r.outcome == "status")
    if statuses:
        checks.append(Check("clear statuses", ", ".join(f"{k} {v}" for k, v in statuses.most_common(8))))
    lost = lost_requests(records)
    example = f" (e.g. {lost[0].kind} {lost[0].call} {lost[0].code}: {lost[0].detail[:60]})" if lost else ""
    checks.append(Check("calls without an answer or a clear status", f"{len(lost)} of {len(records)}{example}",
                        "0", not lost))
    for c in chaos:
        if math.isnan(c.began):
            checks.append(Check(f"lost across {c.event.label}", f"not run ({c.note})", "0", None))
            continue
        window = in_flight(records, c.began, c.recovered)
        kinds = Counter(r.outcome for r in window)
        lost_here = kinds["lost"]
        checks.append(Check(f"lost across {c.event.label} (t={c.began:.0f}-{c.recovered:.0f} s)",
                            f"{lost_here} of {len(window)} in flight (ok {kinds['ok']}, fallback {kinds['fallback']}, "
                            f"status {kinds['status']}, cancelled {kinds['cancelled']})", "0", lost_here == 0))
    quiet, soak = benign_latencies(records, "quiet"), benign_latencies(records, "soak")
    if quiet and soak:
        q99, s99 = percentile(quiet, 99), percentile(soak, 99)
        ratio = s99 / q99 if q99 > 0 else math.inf
        checks.append(Check("benign p50 quiet / soak (open arrivals)",
                            f"{statistics.median(quiet):.2f} s / {statistics.median(soak):.2f} s "
                            f"(n {len(quiet)} / {len(soak)})"))
        checks.append(Check("benign p99 soak vs quiet", f"{s99:.2f} s vs {q99:.2f} s = {ratio:.2f}x",
                            f"<= {P99_RATIO:g}x", ratio <= P99_RATIO, timing=True))
        tail = slowest(records, chaos)
        checks.append(Check("slowest benign requests in the soak", "; ".join(
            f"{r.latency:.2f} s ({r.user}, {r.size} px{', fallback' if r.fallback else ''}"
            f"{', no plan' if r.plan_code and r.plan_code != 'OK' else ''}: "
            + (f"in flight across {during})" if during else "no chaos event)") for r, during in tail)))
        waits = {p: [r.latency - r.measured_s for r in records if r.kind == BENIGN and r.phase == p and r.segment == "open"
                     and r.call == "generate" and r.code == "OK" and not math.isnan(r.measured_s)] for p in ("quiet", "soak")}
        if waits["quiet"] and waits["soak"]:
            checks.append(Check("benign time outside the device's phase timers, p50 quiet / soak",
                                f"{statistics.median(waits['quiet']):.2f} s / {statistics.median(waits['soak']):.2f} s "
                                "(link estimate, plan, waiting for the device's turn)"))
    else:
        checks.append(Check("benign p99 soak vs quiet", f"no answered requests (quiet {len(quiet)}, soak {len(soak)})",
                            f"<= {P99_RATIO:g}x", False, timing=True))
    for phase in ("quiet", "soak"):
        if phase not in backlog:
            continue
        share = shares(records, phase, benign, backlog[phase])
        worst = max(share.values(), key=lambda s: abs(s - 1.0)) if share else 0.0
        counts = backlog_completions(records, phase, backlog[phase])
        text = (f"{min(share.values()):.2f}-{max(share.values()):.2f}x of equal ("
                + ", ".join(f"{u} {counts[u]}" for u in benign) + ")")
        if phase == "soak":
            checks.append(Check("benign shares, all backlogged (soak)", text,
                                f"{1 - SHARE_TOLERANCE:.1f}-{1 + SHARE_TOLERANCE:.1f}x",
                                abs(worst - 1.0) <= SHARE_TOLERANCE + 1e-9))
        else:
            checks.append(Check("benign shares, all backlogged (quiet, for reference)", text))
    for instance in instances:
        figures = rss_growth(samples, instance, end)
        killed = not math.isnan(instance.ended)
        where = "after warm-up" if instance.name == instance.service else "after its restart's warm-up"
        if figures is None:
            checks.append(Check(f"RSS {instance.name}", f"not measured: no sample {where}"
                                + (" (it was stopped first)" if killed else ""), f"<= +{RSS_GROWTH:.0%}", None))
            continue
        warm, last = figures
        growth = (last - warm) / warm
        text = f"{warm / 2**20:.0f} -> {last / 2**20:.0f} MiB ({growth:+.1%}) {where}"
        half = second_half_growth(samples, instance, end)
        if half is not None:
            text += f"; {half:+.1%} over the second half of that span"
        if killed:
            checks.append(Check(f"RSS {instance.name}", text + f", until it was stopped at {instance.ended:.0f} s"))
        else:
            checks.append(Check(f"RSS {instance.name}", text, f"<= +{RSS_GROWTH:.0%}", growth <= RSS_GROWTH))
    restarts = [c for c in chaos if c.event.action == "restart" and c.event.target == "scheduler"]
    for c in restarts:
        if math.isnan(c.began):
            continue
        before, after = prediction_errors(records, c)
        if len(before) < 5 or len(after) < 5:
            checks.append(Check("median prediction error after the scheduler's restart",
                                f"too few as-planned plans (before {len(before)}, after {len(after)})",
                                f"within {PREDICTION_POINTS:g} points", None))
            continue
        predicted = {w: [r.predicted_s for r in ws] for w, ws in zip(("before", "after"), prediction_windows(records, c))}
        checks.append(Check("median predicted total, the same plans before / after the restart",
                            f"{statistics.median(predicted['before']):.2f} s / {statistics.median(predicted['after']):.2f} s "
                            "(what the restored state predicts)"))
        b, a = statistics.median(before) * 100, statistics.median(after) * 100
        checks.append(Check("median prediction error after the scheduler's restart",
                            f"{a:.1f}% (next {len(after)}) vs {b:.1f}% (last {len(before)} before): {a - b:+.1f} points",
                            f"within {PREDICTION_POINTS:g} points", abs(a - b) <= PREDICTION_POINTS, timing=True))
    return checks


def render(checks: Sequence[Check], assert_timing: bool = True) -> str:
    """The one table (markdown). Without `assert_timing` a missed latency target reads "missed
    (reported)": shown, not failed (see `failed`)."""
    lines = ["| check | measured | target | result |", "|---|---|---|---|"]
    for c in checks:
        result = "" if c.ok is None and c.target == "—" else {True: "pass", False: "**FAIL**", None: "n/a"}[c.ok]
        if c.ok is False and c.timing and not assert_timing:
            result = "missed (reported)"
        lines.append(f"| {c.what} | {c.measured} | {c.target} | {result} |")
    return "\n".join(lines)


def failed(checks: Iterable[Check], assert_timing: bool = True) -> list[Check]:
    """The targets missed; without `assert_timing`, the latency ones are left out (a CI machine's
    other load moves them: they are reported, and measured at rest for RELIABILITY.md)."""
    return [c for c in checks if c.ok is False and (assert_timing or not c.timing)]
