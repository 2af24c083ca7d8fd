"""Frame batching: requests that arrive within a short window are decided together.

The first request of a frame opens it and starts the window; the frame closes when the window
ends or it reaches ``max_size``. ``decide`` gets the frame's items in arrival order and returns
one result per item; it runs in a worker thread (the event loop keeps accepting requests) and
frames are decided one at a time, in order, so ``decide`` may keep state. No gRPC here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class FrameConfig:
    window_s: float = 0.020
    max_size: int = 64

    def __post_init__(self) -> None:
        if not self.window_s >= 0:
            raise ValueError(f"frame window must be >= 0 s, got {self.window_s}")
        if self.max_size < 1:
            raise ValueError(f"max frame size must be >= 1, got {self.max_size}")


async def _in_thread(fn: Callable[[], Result]) -> Result:
    return await asyncio.to_thread(fn)


class FrameCollector(Generic[Item, Result]):
    """``await collector.submit(item)`` → this item's result, decided jointly with its frame."""

    def __init__(self, decide: Callable[[Sequence[Item]], Sequence[Result]], config: FrameConfig = FrameConfig(),
                 run: Callable[[Callable[[], Sequence[Result]]], Awaitable[Sequence[Result]]] = _in_thread):
        self._decide = decide
        self._run = run  # how decide is called off the loop (tests may run it inline)
        self.config = config
        self._pending: list[tuple[Item, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._turn: asyncio.Lock | None = None  # created on the loop that uses it
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.config.max_size:
            self._close_frame()
        elif self._timer is None:
            self._timer = loop.call_later(self.config.window_s, self._close_frame)
        return await future  # a caller that goes away cancels only its own future

    def _close_frame(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        frame, self._pending = self._pending, []
        if frame:
            task = asyncio.get_running_loop().create_task(self._decide_frame(frame))
            self._tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._tasks.discard)

    async def _decide_frame(self, frame: list[tuple[Item, asyncio.Future]]) -> None:
        if self._turn is None:
            self._turn = asyncio.Lock()
        items = [item for item, _ in frame]
        async with self._turn:
            try:
                results = await self._run(lambda: self._decide(items))
                if len(results) != len(items):
                    raise RuntimeError(f"decide returned {len(results)} results for {len(items)} items")
            except Exception as exc:  # noqa: BLE001 - every caller of the frame hears about it
                for _, future in frame:
                    if not future.done():
                        future.set_exception(exc)
                return
        for (_, future), result in zip(frame, results):
            if not future.done():
                future.set_result(result)

    async def drain(self) -> None:
        """Closes the open frame and waits until every frame is decided (for shutdown and tests)."""
        self._close_frame()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
