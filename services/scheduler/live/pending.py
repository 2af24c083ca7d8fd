"""Plans awaiting their report, bounded per user and in total, so no user can push out another's.

A user over its quota forgets its own oldest plan. When the whole table is full, the plan
forgotten is the oldest of the user holding the most (the latest of those to get there: a flood
of fresh identities evicts itself, not the users already waiting). O(1) per operation.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class PendingPlans(Generic[T]):
    def __init__(self, max_total: int, max_per_owner: int):
        if max_total < 1 or max_per_owner < 1:
            raise ValueError(f"pending-plan caps must be >= 1, got {max_total} and {max_per_owner}")
        self.max_total = max_total
        self.max_per_owner = max_per_owner
        self._items: dict[str, tuple[str, T]] = {}
        self._by_owner: dict[str, dict[str, None]] = {}  # owner -> its plan ids, oldest first
        self._owners_with: dict[int, dict[str, None]] = {}  # n -> owners holding n plans (arrival order)
        self._most = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    def count(self, owner: str) -> int:
        return len(self._by_owner.get(owner, ()))

    def items(self) -> list[tuple[str, str, T]]:
        """(plan id, owner, value) of every plan, the oldest first: adding them back in this order
        to an empty table gives the same table (what a restarted scheduler does)."""
        return [(plan_id, owner, value) for plan_id, (owner, value) in self._items.items()]

    def get(self, plan_id: str) -> T | None:
        item = self._items.get(plan_id)
        return item[1] if item is not None else None

    def add(self, plan_id: str, owner: str, value: T) -> None:
        if self.count(owner) >= self.max_per_owner:
            self._evict_oldest(owner)
        self._items[plan_id] = (owner, value)
        self._by_owner.setdefault(owner, {})[plan_id] = None
        self._recount(owner, self.count(owner) - 1)
        while len(self._items) > self.max_total:
            self._evict_oldest(next(reversed(self._owners_with[self._most])))

    def pop(self, plan_id: str) -> T | None:
        item = self._items.pop(plan_id, None)
        if item is None:
            return None
        owner, value = item
        plans = self._by_owner[owner]
        del plans[plan_id]
        if not plans:
            del self._by_owner[owner]
        self._recount(owner, len(plans) + 1)
        return value

    def _evict_oldest(self, owner: str) -> None:
        self.pop(next(iter(self._by_owner[owner])))
        self.evicted += 1

    def _recount(self, owner: str, before: int) -> None:
        now = self.count(owner)
        if before:
            bucket = self._owners_with[before]
            del bucket[owner]
            if not bucket:
                del self._owners_with[before]
        if now:
            self._owners_with.setdefault(now, {})[owner] = None
        self._most = max(self._most, now)
        while self._most and self._most not in self._owners_with:
            self._most -= 1
