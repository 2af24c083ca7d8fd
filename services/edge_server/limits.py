"""Per-user cap on concurrent Generate streams, so that one user cannot fill the edge's queue
and starve the others (the queue itself is bounded, so nobody hangs, but it would not be fair).

Pure bookkeeping on the event loop's thread (no lock needed, no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamLimiter:
    max_per_user: int  # 0 = no cap
    active: dict[str, int] = field(default_factory=dict)

    def try_acquire(self, user: str) -> bool:
        count = self.active.get(user, 0)
        if self.max_per_user and count >= self.max_per_user:
            return False
        self.active[user] = count + 1
        return True

    def release(self, user: str) -> None:
        count = self.active.get(user, 0) - 1
        if count > 0:
            self.active[user] = count
        else:
            self.active.pop(user, None)


def user_key(claimed_user: str, peer: str, token_user: str | None = None) -> str:
    """Who a request counts against (its stream slot, its turn in the fair queue, the per-user
    caps): with tokens on, the token's user (so leaving `user` empty does not escape the cap);
    else the request's user, which a caller may claim freely (without tokens a user who sends
    each request under a new name is many users: turn tokens on where that matters); else the
    caller's host ("ipv4:10.0.0.7:51234" -> "host 10.0.0.7")."""
    if token_user:
        return f"user {token_user}"
    if claimed_user:
        return f"user {claimed_user}"
    host = peer.split(":", 1)[1].rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return f"host {host}"
