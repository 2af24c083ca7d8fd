"""A bounded map that forgets its least recently used key: the one home of "at most N of these"
for caches of user input (the edge's prompt embeddings) and per-identity state (the device's
links per edge, the scheduler's links and margins per user, its recently reported plans), so a
flood of new keys bounds its own memory. Pure logic, not thread-safe (callers serialize)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when absent."""
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value without counting as a use (reading an estimate is not using it)."""
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        """Stores ``value`` as the most recently used, forgetting the least recent beyond ``size``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def newest(self) -> K | None:
        return next(reversed(self._items), None)

    def items(self) -> Iterator[tuple[K, V]]:
        """Least recently used first."""
        return iter(self._items.items())
