"""The simulated users of bench/soak.py, on one asyncio loop.

Benign users call their device service's Generate as `tandem generate --ue ADDR --scheduler
ADDR` does (services/cli/generate.py): the device service's measured link, a plan for it, the
request with the plan's T, k and codec on the plan's edge, then a Report of the measured phases.
A scheduler that gives no plan leaves the request on the device's defaults, as the CLI does.

Misbehaving users: `burst` (mallory) sends bursts of direct edge streams and Plan calls far
above its share; `odd-size` (oscar) asks a device service for sides the pack or the edge does not
serve; `cancel-storm` (trudy) starts device and edge calls and cancels them within 50-400 ms;
`absurd` (zed) sends plans and reports with absurd numbers, reports for unknown plans and twice.
The misbehaving ones use their own device service (the benign users' devices are theirs alone);
the edges and the scheduler are shared, as in a deployment.

Every call is one Record (bench/soak_report.py).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench.soak_report import BENIGN, DEVICE_CLASS, NO_ANSWER, Record, UserSpec, arrivals, prompt
from services.common.channels import ChannelPool
from services.common.scheduler_client import report, request_plan
from services.common.wire import partial_to_proto
from services.ue_client.client import device_deadline, get_link_estimate
from services.ue_client.transport import EdgeError, fetch_handoff
from tandem.handoff import CodecSpec
from tandem.phases import Phase
from tandem.request import GenerationRequest
from tandem.resolve import PartialRequest
from tandem.v1 import device_pb2, device_pb2_grpc

ODD_SIZES = (72, 8, 36, 200, 96, 12, 128, 16)  # served; below the edge's 16; not a multiple of 8; above 128


def status_of(errors: Sequence[str]) -> str:
    """The status name in an on_error line ("UNAVAILABLE: ..."); "EXCEPTION" for anything else."""
    head = errors[0].split(":", 1)[0] if errors else ""
    return head if head.isupper() and head.replace("_", "").isalpha() else "EXCEPTION"


class Traffic:
    """The users' calls and their records. `t0`: the run's start (time.monotonic())."""

    def __init__(self, t0: float, scheduler: str, devices: Sequence[str], rogue_device: str, edges: Sequence[str]):
        self.t0 = t0
        self.scheduler = scheduler
        self.devices = list(devices)
        self.rogue = rogue_device
        self.edges = list(edges)
        self.records: list[Record] = []
        self.pool = ChannelPool()  # on the running loop: one channel per device service / edge
        self.executor = ThreadPoolExecutor(64, thread_name_prefix="soak-sync")  # the sync scheduler client
        self.tasks: set[asyncio.Task] = set()
        self._seq = 0
        self.last_plan_code = ""

    def now(self) -> float:
        return time.monotonic() - self.t0

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self, timeout: float) -> int:
        """Waits for every open call; those still open after `timeout` are cancelled and stay
        NO_ANSWER (lost). Returns how many were."""
        pending = set(self.tasks)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)
        return len(still)

    async def close(self) -> None:
        await self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def _record(self, user: str, kind: str, phase: str, segment: str, call: str, service: str, **fields) -> Record:
        record = Record(user, kind, phase, segment, call, service, self.now(), **fields)
        self.records.append(record)
        return record

    # --- the calls ------------------------------------------------------------------------------
    async def device_generate(self, address: str, request, edge: str | None, timeout: float,
                              started: asyncio.Event | None = None) -> device_pb2.DeviceResult:
        """DeviceService.Generate as services/ue_client/client.py calls it, on grpc.aio (so a
        caller can cancel it); EdgeError naming the status."""
        message = device_pb2.DeviceServiceGenerateRequest(request=request, edge_address=edge or "",
                                                          edge_timeout_seconds=timeout)
        call = device_pb2_grpc.DeviceServiceStub(self.pool.get(address)).Generate(message,
                                                                                  timeout=device_deadline(timeout))
        try:
            async for response in call:
                if response.WhichOneof("event") == "result":
                    return response.result
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code().name, exc.details() or "") from exc
        finally:
            call.cancel()
        raise EdgeError("DATA_LOSS", "device service ended the stream without a result")

    async def plan(self, record_as: tuple[str, str, str, str], **fields: Any):
        """One Plan call, recorded; the ReceivedPlan or None."""
        user, kind, phase, segment = record_as
        rec = self._record(user, kind, phase, segment, "plan", self.scheduler)
        errors: list[str] = []
        try:
            plan = await self._sync(request_plan, self.scheduler, fields.pop("device_class", DEVICE_CLASS),
                                    timeout=5.0, on_error=errors.append, **fields)
        except BaseException as exc:
            rec.code, rec.detail, rec.ended = ("EXCEPTION" if isinstance(exc, Exception) else NO_ANSWER), repr(exc), self.now()
            raise
        rec.ended = self.now()
        rec.code, rec.detail = ("OK", "") if plan is not None else (status_of(errors), errors[0] if errors else "")
        self.last_plan_code = rec.code
        return plan

    async def report(self, record_as: tuple[str, str, str, str], plan_id: str, seconds: dict[str, float],
                     edge_steps: int, device_steps: int, handoff_bytes: int, fallback: bool) -> bool:
        user, kind, phase, segment = record_as
        rec = self._record(user, kind, phase, segment, "report", self.scheduler)
        errors: list[str] = []
        try:
            ok = await self._sync(report, self.scheduler, plan_id, seconds, edge_steps, device_steps, handoff_bytes,
                                  fallback, timeout=5.0, on_error=errors.append)
        except BaseException as exc:
            rec.code, rec.detail, rec.ended = ("EXCEPTION" if isinstance(exc, Exception) else NO_ANSWER), repr(exc), self.now()
            raise
        rec.ended = self.now()
        rec.code, rec.detail = ("OK", "") if ok else (status_of(errors), errors[0] if errors else "")
        return ok

    async def link(self, device: str) -> tuple[float, float]:
        """The device service's measured link (what the CLI sends with --ue --scheduler); 0, 0 unknown."""
        try:
            estimate = await self._sync(get_link_estimate, device, None, 5.0)
        except EdgeError:
            return 0.0, 0.0
        return estimate.bandwidth_bps, estimate.rtt_s

    # --- benign users ---------------------------------------------------------------------------------
    async def benign_request(self, user: UserSpec, phase: str, segment: str, n: int) -> None:
        size = user.sizes[n % len(user.sizes)]
        text = prompt(random.Random(f"{user.name}-{n}"))
        device = self.devices[user.device]
        tag = (user.name, BENIGN, phase, segment)
        rec = self._record(user.name, BENIGN, phase, segment, "generate", device, size=size)
        try:
            bandwidth, rtt = await self.link(device)
            plan = await self.plan(tag, bandwidth_bps=bandwidth, rtt_s=rtt, personalized_user=user.lora,
                                   latency_budget_s=user.budget_s, prompt_chars=len(text), user_id=user.name)
            rec.plan_code = "OK" if plan is not None else self.last_plan_code
            given = PartialRequest(text, seed=n, height=size, width=size, user=user.lora)
            if plan is not None:
                given = given.with_plan(plan)
                rec.planned, rec.predicted_s = True, plan.predicted_seconds["total"]
            result = await self.device_generate(device, partial_to_proto(given), plan.edge_address if plan else None,
                                                user.edge_timeout_s)
            rec.ended, rec.code, rec.fallback = self.now(), "OK", result.fallback
            rec.measured_s = sum(result.seconds.get(phase.value, 0.0) for phase in Phase)  # what Report sends
            if plan is not None:
                as_planned = not result.fallback and (result.edge_steps, result.device_steps) == (
                    plan.split, plan.steps - plan.split)
                if as_planned and rec.predicted_s > 0:
                    rec.error = abs(rec.measured_s - rec.predicted_s) / rec.predicted_s
                await self.report(tag, plan.plan_id, dict(result.seconds), result.edge_steps, result.device_steps,
                                  result.handoff_bytes, bool(result.fallback))
        except EdgeError as exc:
            rec.code, rec.detail = exc.code, exc.message
        except asyncio.CancelledError:
            rec.code, rec.detail = NO_ANSWER, "still open when the bench stopped waiting"
            raise
        except Exception as exc:  # noqa: BLE001 - any other end is a request without a clear status
            rec.code, rec.detail = "EXCEPTION", repr(exc)
        finally:
            if math.isnan(rec.ended):
                rec.ended = self.now()

    async def open_arrivals(self, users: Sequence[UserSpec], phase: str, seconds: float, seed: int,
                            longer: Callable[[], bool] | None = None, most: float = 0.0) -> None:
        """Every user's arrivals (its pattern, its rate) for `seconds`, and on while `longer()`
        says so (up to `most` seconds); each request a task of its own (open loop: nobody waits
        for an answer before sending the next). The same `seed` gives the same sends (the quiet
        and the soak phases; a longer run continues the same sequence)."""
        start = self.now()
        horizon = max(seconds, most)
        sends = sorted((t, i, user) for i, user in enumerate(users)
                       for t in arrivals(random.Random(seed * 1000 + i), user.pattern, user.rate_hz, horizon))
        counters = {user.name: 0 for user in users}
        for t, _, user in sends:
            await asyncio.sleep(max(0.0, start + t - self.now()))
            if t >= seconds and (longer is None or not longer()):
                break
            counters[user.name] += 1
            self.spawn(self.benign_request(user, phase, "open", seed * 100_000 + counters[user.name]))

    async def backlogged(self, users: Sequence[UserSpec], phase: str, seconds: float, depth: int, seed: int) -> None:
        """Every user keeps `depth` requests waiting for `seconds` (a new one as soon as one ends)."""
        until = self.now() + seconds
        counter = [0]

        async def worker(user: UserSpec) -> None:
            while self.now() < until:
                counter[0] += 1
                await self.benign_request(user, phase, "backlog", seed * 100_000 + 50_000 + counter[0])

        workers = [self.spawn(worker(user)) for user in users for _ in range(depth)]
        await asyncio.sleep(seconds)
        del workers  # they end after their current request; drain() waits for them

    # --- misbehaving users ------------------------------------------------------------------------------
    async def edge_call(self, user: str, kind: str, phase: str, edge: str, size: int, n: int,
                        cancel_after: float | None = None) -> None:
        """A direct edge stream (a client that skips the device service), T=10, k=8."""
        rec = self._record(user, kind, phase, "open", "edge", edge, size=size)
        request = GenerationRequest(prompt(random.Random(n)), steps=10, split=8, seed=n, height=size, width=size,
                                    user=user).validate()
        work = asyncio.ensure_future(fetch_handoff(edge, request, CodecSpec(), timeout=60.0, channels=self.pool))
        await self._settle(rec, work, cancel_after)

    async def device_call(self, user: str, kind: str, phase: str, size: int, n: int,
                          cancel_after: float | None = None) -> None:
        """A request on the misbehaving users' own device service, with the pack's defaults."""
        rec = self._record(user, kind, phase, "open", "generate", self.rogue, size=size)
        given = PartialRequest(prompt(random.Random(n)), seed=n, height=size, width=size)
        work = asyncio.ensure_future(self.device_generate(self.rogue, partial_to_proto(given), None, 20.0))
        result = await self._settle(rec, work, cancel_after)
        if result is not None:
            rec.fallback = result.fallback

    async def _settle(self, rec: Record, work: asyncio.Future, cancel_after: float | None) -> Any:
        """Waits for `work` (cancelled after `cancel_after` s, a cancel storm) and writes its outcome
        into `rec`; returns its result when it succeeded, else None."""
        result = None
        try:
            if cancel_after is not None:
                done, _ = await asyncio.wait({work}, timeout=cancel_after)
                if not done:
                    rec.cancelled = True
                    work.cancel()
            result = await work
            rec.code = "OK"
        except EdgeError as exc:
            rec.code, rec.detail = exc.code, exc.message
        except asyncio.CancelledError:
            if not rec.cancelled:
                work.cancel()
                rec.code, rec.detail = NO_ANSWER, "still open when the bench stopped waiting"
                rec.ended = self.now()
                raise
            rec.code = "CANCELLED"
        except Exception as exc:  # noqa: BLE001
            rec.code, rec.detail = "EXCEPTION", repr(exc)
        finally:
            if math.isnan(rec.ended):
                rec.ended = self.now()
        return result

    async def misbehave(self, phase: str, stop: asyncio.Event, scale: float, seed: int) -> None:
        """The four misbehaving users until `stop`; `scale`: the period between their rounds
        (seconds), shorter in --quick."""
        rng = random.Random(seed)
        await asyncio.gather(self._bursts(phase, stop, scale, rng), self._odd_sizes(phase, stop, rng),
                             self._cancel_storms(phase, stop, scale, rng), self._absurd(phase, stop, rng))

    async def _wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleeps `seconds`; True when `stop` was set meanwhile."""
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds)
            return True
        except TimeoutError:
            return False

    def _n(self) -> int:
        self._seq += 1
        return 9_000_000 + self._seq

    async def _bursts(self, phase: str, stop: asyncio.Event, period: float, rng: random.Random) -> None:
        """mallory: 20 streams at one edge at once (its share is a few), and 50 plans at once
        (the plan rate allows a burst of 40)."""
        k = 0
        while not await self._wait(stop, rng.uniform(0.5, 1.0) * period):
            edge = self.edges[k % len(self.edges)]
            k += 1
            for _ in range(20):
                self.spawn(self.edge_call("mallory", "burst", phase, edge, 64, self._n()))
            for _ in range(50):
                self.spawn(self._quiet_plan(("mallory", "burst", phase, "open"), user_id="mallory",
                                            bandwidth_bps=50e6))

    async def _quiet_plan(self, tag: tuple[str, str, str, str], **fields: Any) -> None:
        try:
            await self.plan(tag, **fields)
        except Exception:  # noqa: BLE001 - recorded by plan()
            pass

    async def _odd_sizes(self, phase: str, stop: asyncio.Event, rng: random.Random) -> None:
        """oscar: odd sizes on its own device service, about one every 5 s."""
        i = 0
        while not await self._wait(stop, rng.expovariate(1 / 5.0)):
            self.spawn(self.device_call("oscar", "odd-size", phase, ODD_SIZES[i % len(ODD_SIZES)], self._n()))
            i += 1

    async def _cancel_storms(self, phase: str, stop: asyncio.Event, period: float, rng: random.Random) -> None:
        """trudy: 8 device calls and 8 edge streams, each cancelled 50-400 ms after it started."""
        while not await self._wait(stop, rng.uniform(0.6, 1.2) * period):
            for j in range(8):
                self.spawn(self.device_call("trudy", "cancel-storm", phase, 64, self._n(),
                                            cancel_after=rng.uniform(0.05, 0.4)))
                self.spawn(self.edge_call("trudy", "cancel-storm", phase, self.edges[j % len(self.edges)], 64,
                                          self._n(), cancel_after=rng.uniform(0.05, 0.4)))

    async def _absurd(self, phase: str, stop: asyncio.Event, rng: random.Random) -> None:
        """zed: one absurd plan or report about every 1.5 s, in turn."""
        tag = ("zed", "absurd", phase, "open")
        absurd_phases = ({"queue": 3000.0, "edge_steps": 3000.0, "transfer": 3000.0, "device_steps": 3000.0,
                          "decode": 3000.0},  # in bounds, absurd
                         {"queue": 1e-6, "edge_steps": 1e-6, "transfer": 1e-6, "device_steps": 1e-6, "decode": 1e-6},
                         {"queue": math.nan, "edge_steps": 0.1},  # refused
                         {"edge_steps": 1e308})  # refused
        i = 0
        while not await self._wait(stop, rng.uniform(1.0, 2.0)):
            i += 1
            step = i % 7
            try:
                if step == 0:
                    await self.plan(tag, user_id="zed", rtt_s=1e300)  # refused
                elif step == 1:
                    await self.plan(tag, user_id="zed", latency_budget_s=1e-300, bandwidth_bps=1.0, rtt_s=9.9)
                elif step == 2:
                    await self.plan(tag, user_id="zed", spectral_efficiency=math.inf)  # refused
                elif step == 3:
                    await self.report(tag, f"no-such-plan-{i}", {"edge_steps": 0.1}, 8, 2, 1000, False)
                else:
                    plan = await self.plan(tag, user_id="zed", bandwidth_bps=50e6)
                    if plan is not None:
                        seconds = absurd_phases[(i // 7 + step) % len(absurd_phases)]
                        await self.report(tag, plan.plan_id, seconds, 0, 0, 1000, False)
                        if step == 6:  # the same plan again
                            await self.report(tag, plan.plan_id, seconds, 0, 0, 1000, False)
            except Exception:  # noqa: BLE001 - recorded by plan() / report()
                pass
