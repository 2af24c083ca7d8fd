"""Fair admission on the edge: the wait queue is one FIFO per identity, served round-robin.

Whose a request is (the identity) is the servicer's business (limits.user_key: with tokens on,
the token's user; without, the user the request claims, which anyone can claim; without either,
the caller's host). Here an identity is any hashable key. When free batch slots are filled, the
identities with waiting requests take turns: each gives its oldest waiting request, then goes to
the back of the line. So one identity with 20 requests queued and three with one each: the three
start before the first one's second, and when every identity keeps requests waiting, each starts
(and so completes) the same number, whatever the length of its backlog.

Pure logic (no gRPC, no torch, no clock), not thread-safe: the batcher serializes calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiting items, one FIFO per ``owner(item)``, taken round-robin among owners."""

    def __init__(self, owner: Callable[[T], Hashable]):
        self.owner = owner
        self._queues: dict[Hashable, deque[T]] = {}  # owners with waiting items, in turn order
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def count(self, owner: Hashable) -> int:
        """How many of ``owner``'s items wait."""
        queue = self._queues.get(owner)
        return len(queue) if queue is not None else 0

    @property
    def owners(self) -> int:
        """How many identities have items waiting."""
        return len(self._queues)

    def append(self, item: T) -> None:
        """Queues ``item`` behind its owner's others; a new owner takes its turn after those waiting."""
        self._queues.setdefault(self.owner(item), deque()).append(item)
        self._size += 1

    def pop(self, skip: Callable[[Hashable], bool] = lambda owner: False) -> T | None:
        """The oldest item of the first owner in turn that ``skip`` does not rule out (an owner at
        its running cap, say), which then goes to the back of the line; None when none qualifies."""
        for owner, queue in self._queues.items():
            if skip(owner):
                continue
            item = queue.popleft()
            del self._queues[owner]
            if queue:
                self._queues[owner] = queue  # re-inserted: the back of the line
            self._size -= 1
            return item
        return None

    def remove(self, item: T) -> None:
        """Takes ``item`` out (cancelled, expired); its owner keeps its turn."""
        owner = self.owner(item)
        queue = self._queues[owner]
        queue.remove(item)
        self._size -= 1
        if not queue:
            del self._queues[owner]

    def clear(self) -> None:
        self._queues.clear()
        self._size = 0

    def heads(self) -> Iterator[T]:
        """Each owner's oldest waiting item."""
        return (queue[0] for queue in self._queues.values())

    def tails(self) -> Iterator[T]:
        """Each owner's newest waiting item."""
        return (queue[-1] for queue in self._queues.values())

    def __iter__(self) -> Iterator[T]:
        """Every waiting item in the order ``pop`` would give them (nobody skipped): the first of
        each owner in turn, then the second of each, and so on."""
        queues = list(self._queues.values())
        depth = max((len(q) for q in queues), default=0)
        for index in range(depth):
            for queue in queues:
                if index < len(queue):
                    yield queue[index]
