"""The edge engine: one loop that serves many requests with one UNet call per iteration.

`EdgeEngine.step()` is schedule → execute → update (as vLLM's EngineCore.step): the batching
policy picks the batch, one `advance` call per latent shape moves every request in it one step
(each at its own step, CFG included), and requests that reached their split point are handed off.
On a CPU the UNet runs as a TorchScript trace (traced.py: the same numbers, less Python per
call). Per-iteration work outside the UNet call is kept small: the requests admitted together
start together (one text-encoder call, cached schedules: conditioning.Starter), and progress
events are thinned to one per `progress_interval_s` per request (the first and the last always go).
A call that raises is retried member by member, so only the request at fault fails. The loop runs
in its own thread; results go to each request's `sink` (a thread-safe callback) as events.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.edge_server.batching import BatchConfig, Batcher, Closed, OwnerQueueFull, QueueFull, buckets, due
from services.edge_server.call_cost import CallCostFit
from services.edge_server.conditioning import Starter
from services.edge_server.memory import release_memory
from services.edge_server.metrics import EdgeMetrics
from tandem.handoff import CodecSpec, encode_handoff
from tandem.packs import ModelPack
from tandem.pipeline import make_handoff
from tandem.request import GenerationRequest
from tandem.resolve import PartialRequest, resolve
from tandem.sampling.denoise import DenoiseState, advance
from tandem.traced import TracedUNet, call_fast

log = logging.getLogger("tandem.edge")

__all__ = ["EdgeEngine", "QueueFull", "OwnerQueueFull", "Closed", "Queued", "Progress", "Finished", "Failed"]


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Finished:
    payload: bytes


@dataclass(frozen=True)
class Failed:
    code: str  # "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNAVAILABLE"
    message: str


Event = Queued | Progress | Finished | Failed
Sink = Callable[[Event], None]


@dataclass(eq=False)
class EngineRequest:
    id: int
    request: GenerationRequest
    codec: CodecSpec
    sink: Sink
    deadline: float | None
    submitted_at: float
    started_at: float | None = None
    state: DenoiseState | None = None
    cancelled: bool = False
    done: bool = False
    position: int = -1
    pixels: float = 1.0  # its pixels relative to the pack's usual image, >= 1
    weight: float = 1.0  # its cost per step relative to a usual request (see batching.due, _pace)
    credit: float = 0.0
    paced: bool = False  # its credit set by its first `_pace`
    reported_at: float = float("-inf")  # when its last Progress event went out
    owner: str = ""  # whose it is: fair turns and per-user caps (batching.Batcher) go by it

    @property
    def finished(self) -> bool:
        return self.done

    @property
    def running(self) -> DenoiseState:
        """The state of an admitted request (the engine steps only those; a failed start is done)."""
        if self.state is None:
            raise RuntimeError(f"request {self.id} was not started")
        return self.state


@dataclass
class EngineStats:
    iterations: int = 0
    unet_calls: int = 0
    max_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)  # UNet calls by batch size
    steps: int = 0  # request-steps run (a batch of n is n steps)


@dataclass(frozen=True)
class EngineLoad:
    queue_depth: int
    running_requests: int
    steps: int


class EdgeEngine:
    def __init__(self, pack: ModelPack, config: BatchConfig = BatchConfig(), metrics: EdgeMetrics | None = None,
                 progress_interval_s: float = 0.1, trace_unet: bool = True):
        self.pack = pack
        self._trace_unet = trace_unet
        self._unet_of: object = None  # the pack's UNet that `_unet` wraps
        self._unet: Any = None
        self._warm = False  # warmed up: traces no new shape
        self.batcher: Batcher[EngineRequest] = Batcher(config)
        self.starter = Starter(pack)
        # A client shows progress to a person (a bar) or times the edge phase from the first
        # event: ten events a second are plenty, and each costs the serving process a message.
        self.progress_interval_s = progress_interval_s
        self._hold_until: float | None = None
        self.metrics = metrics or EdgeMetrics()
        self.stats = EngineStats()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # A request above the pack's own size is paced (batching.due), and leaves its
        # activations in the allocator's pool when it goes.
        self._usual_pixels = pack.default_image_size ** 2
        self.call_cost = CallCostFit()  # what a second UNet call in an iteration costs (`_pace`)
        self._release_pending = False

    @property
    def unet(self) -> Any:
        """The UNet the engine calls: the pack's, traced on a CPU (tandem.traced); wrapped anew if the
        pack's is replaced."""
        if self._unet_of is not self.pack.unet:
            unet = call_fast(self.pack.unet, self.pack.device, self._trace_unet)
            self._unet_of = self.pack.unet
            self._unet = unet.frozen() if self._warm and isinstance(unet, TracedUNet) else unet
        return self._unet

    def warm_up(self) -> None:
        """One step of a request at the pack's defaults through the UNet the engine calls, before it
        serves: a traced UNet traces and checks the default shape here (~0.5 s for the demo pack)
        instead of in the first user's request, and traces no other shape after it. Call before
        `start`."""
        defaults = self.pack.request_defaults()
        every_step_on_the_edge = PartialRequest("warm-up", split=defaults.steps)
        request = resolve(every_step_on_the_edge, defaults, validate=False).request
        started = self.starter.start([request])[0]
        if started.state is not None:
            advance(self.unet, [started.state])
        self._warm = True  # a shape first met from now on runs eager (TracedUNet.frozen)
        self._unet_of = None  # wrapped again, frozen, at the next call (the traces are the pack's)

    # --- client side (any thread) ---------------------------------------------------------

    def submit(self, request: GenerationRequest, codec: CodecSpec, sink: Sink, timeout: float | None = None,
               owner: str = "") -> EngineRequest:
        """Queues a validated request of ``owner`` (the servicer's user key; "" one shared identity).
        Raises QueueFull (OwnerQueueFull beyond the owner's cap) or Closed; never blocks on the model."""
        now = time.monotonic()
        entry = EngineRequest(
            id=next(self._ids),
            request=request,
            codec=codec,
            sink=sink,
            deadline=None if timeout is None else now + timeout,
            submitted_at=now,
            owner=owner,
        )
        with self._wake:
            entry.position = self.batcher.submit(entry)
            self.metrics.queue_depth.set(self.batcher.waiting_count)
            self._wake.notify()
        sink(Queued(entry.position))
        return entry

    def cancel(self, entry: EngineRequest) -> None:
        """Frees the request's slot at the next iteration (the client went away)."""
        with self._wake:
            entry.cancelled = True
            self._wake.notify()

    def close(self) -> None:
        """Stops taking new requests; queued and running ones still finish (drain)."""
        with self._wake:
            self.batcher.close()
            self._wake.notify()

    def load(self) -> EngineLoad:
        """What the scheduler's heartbeat reports."""
        with self._lock:
            return EngineLoad(self.batcher.waiting_count, self.batcher.running_count, self.stats.steps)

    @property
    def busy(self) -> bool:
        with self._lock:
            return not self.batcher.idle

    # --- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            self.batcher.close()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            leftovers = self.batcher.take_all()
        for entry in leftovers:
            self._fail(entry, "UNAVAILABLE", "edge server stopped")

    def _run(self) -> None:
        while True:
            with self._wake:
                while self.batcher.idle and not self._stopping:
                    self._wake.wait(timeout=0.5)
                if self._hold_until is not None and not self._stopping:  # coalescing: a submit wakes it early
                    self._wake.wait(timeout=max(0.0, self._hold_until - time.monotonic()))
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad iteration
                log.exception("engine iteration failed")

    def step(self) -> int:
        """One iteration: schedule → execute → update. Returns the batch size (0 = idle)."""
        with self._lock:
            iteration = self.batcher.next_iteration(time.monotonic())
            self._hold_until = iteration.hold_until
            positions = self.batcher.positions() if iteration.queue_changed else []
            self.metrics.queue_depth.set(self.batcher.waiting_count)
        for entry in iteration.cancelled:
            self._fail(entry, "CANCELLED", "cancelled by the client")
        for entry in iteration.expired:
            self._fail(entry, "DEADLINE_EXCEEDED", "deadline passed on the edge")
        for entry, position in positions:
            if position != entry.position:
                entry.position = position
                entry.sink(Queued(position))
        self._admit(iteration.admitted)
        batch = [e for e in iteration.batch if not e.done]
        stepping = due(self._pace([e for e in batch if e.running.step < e.request.split]))
        if stepping:
            self._execute(stepping)
        for entry in batch:
            if not entry.done and entry.running.step >= entry.request.split:
                self._finish(entry)
        self.metrics.running.set(self.batcher.running_count)
        if self._release_pending:
            self._release_pending = False
            release_memory()
        return len(stepping)

    def _admit(self, entries: list[EngineRequest]) -> None:
        now = time.monotonic()
        for entry in entries:
            entry.started_at = now
            entry.pixels = max(1.0, entry.request.height * entry.request.width / self._usual_pixels)
            self.metrics.queue_seconds.observe(now - entry.submitted_at)
        for entry, started in zip(entries, self.starter.start([e.request for e in entries])):
            entry.state = started.state
            if started.error is not None:
                log.error("could not start request %s: %s", entry.id, started.error)
                self._fail(entry, "INTERNAL", f"could not start: {started.error}")

    def _pace(self, runnable: list[EngineRequest]) -> list[EngineRequest]:
        """Sets each request's weight for `due`: its pixels, plus, outside the iteration's main
        shape group, its share of its own group's UNet call in usual rows (``call_cost.weight``: the
        shape's last call, else the fitted fixed cost split among the group): a lone odd-sized
        request then steps about once per that many iterations, and costs the others about one
        usual request. The main group is the shape the
        most users share (then the most pixels): never one user's many or large requests, which
        would make everyone else pay for that user's call."""
        groups = buckets(runnable, key=_shape_key)
        main = max(groups, key=lambda g: (len({e.owner for e in g}), sum(e.pixels for e in g)), default=[])
        for group in groups:
            shape = _shape_key(group[0])
            for entry in group:
                entry.weight = entry.pixels if group is main else self.call_cost.weight(shape, len(group), entry.pixels)
                if not entry.paced:  # its first step comes at once
                    entry.credit, entry.paced = entry.weight - 1.0, True
        return runnable

    def _execute(self, batch: list[EngineRequest]) -> None:
        for group in buckets(batch, key=_shape_key):
            steps = [e.running.step for e in group]
            error = self._call(group)
            if error is not None:
                self._isolate(group, steps, error)

    def _call(self, group: list[EngineRequest]) -> Exception | None:
        """One UNet call advancing `group` one step; the exception if it raised."""
        began = time.perf_counter()
        try:
            advance(self.unet, [e.running for e in group])
        except Exception as exc:  # noqa: BLE001 - handled by _isolate
            log.exception("UNet call failed for a batch of %d", len(group))
            return exc
        self.stats.iterations += 1
        self.stats.unet_calls += 1
        self.stats.max_batch = max(self.stats.max_batch, len(group))
        self.stats.batch_sizes[len(group)] += 1
        self.stats.steps += len(group)
        seconds = time.perf_counter() - began
        self.call_cost.observe(sum(e.pixels for e in group), seconds, _shape_key(group[0]))
        self.metrics.observe_batch(len(group), seconds)
        for entry in group:
            self._progress(entry)
        return None

    def _progress(self, entry: EngineRequest) -> None:
        """A Progress event after step 1, after the last edge step, and otherwise at most one per
        `progress_interval_s` (the device times the edge phase from the first one)."""
        now = time.monotonic()
        step = entry.running.step
        if step == 1 or step >= entry.request.split or now - entry.reported_at >= self.progress_interval_s:
            entry.reported_at = now
            entry.sink(Progress(step, entry.request.split))

    def _isolate(self, group: list[EngineRequest], steps: list[int], error: Exception) -> None:
        """After a failed call, each member alone, once: only one that fails again is at fault.
        (`advance` may have moved some members before it raised; those are not run twice.)"""
        for entry, step in zip(group, steps):
            if entry.running.step != step:
                self._progress(entry)
                continue
            alone = error if len(group) == 1 else self._call([entry])
            if alone is not None:
                self._fail(entry, "INTERNAL", f"denoising failed: {alone}")

    def _finish(self, entry: EngineRequest) -> None:
        try:
            payload = encode_handoff(make_handoff(entry.running, entry.request), entry.codec)
        except Exception as exc:  # noqa: BLE001
            log.exception("handoff encoding failed for request %s", entry.id)
            self._fail(entry, "INTERNAL", f"handoff encoding failed: {exc}")
            return
        self._release(entry)
        now = time.monotonic()
        self.metrics.edge_seconds.observe(now - (entry.started_at or now))
        self.metrics.handoff_bytes.observe(len(payload))
        entry.sink(Finished(payload))

    def _fail(self, entry: EngineRequest, code: str, message: str) -> None:
        if entry.done:
            return
        self._release(entry)
        entry.sink(Failed(code, message))

    def _release(self, entry: EngineRequest) -> None:
        entry.done = True
        entry.state = None  # free the latents now; the payload is all the client needs
        if entry.request.height * entry.request.width > self._usual_pixels:
            self._release_pending = True


def _shape_key(entry: EngineRequest) -> tuple:
    """Requests that can share a UNet call: the same latent shape and dtype."""
    return (tuple(entry.running.latent.shape), entry.running.latent.dtype)
