"""One gRPC channel per target for the life of a process, instead of one per call.

A new channel pays a TCP handshake, HTTP/2's settings exchange (gRPC waits for the server's)
and, with TLS, a TLS handshake before its first byte: two round trips more per call in plaintext,
three with TLS (bench/channels.py), most of a one-second budget on a 150 ms link. A pooled
channel pays them once; keepalive pings keep its idle connection alive through NATs and notice a
dead one, and gRPC reconnects it by itself (backoff capped at `max_reconnect_backoff_ms`), so a
restarted server serves the next call.

Channels are keyed by (address, TLS identity, extra options); the bearer token is per-call
metadata, so it is not part of the key. ChannelPool holds grpc.aio channels, which belong to the
event loop they were made on: a pool is bound to the loop running when it is made (a thread with
its own loop needs its own pool, or hands its calls to `pool.loop`). SyncChannelPool holds grpc's
threaded channels, usable from any thread. Both close every channel on `close()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from services.common.security import ClientSecurity, aio_channel, sync_channel

Option = tuple[str, Any]
ChannelKey = tuple[str, tuple[bytes | None, ...] | None, tuple[Option, ...]]

# The largest single message a pooled channel takes (the edge sends 256 KiB handoff chunks); the
# per-request handoff cap is the stream reader's (services/ue_client/transport.py), since one
# channel serves requests of every size.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

CLIENT_OPTIONS: tuple[Option, ...] = (
    ("grpc.keepalive_time_ms", 20_000),  # under common NAT / mobile idle timeouts (30 s and up)
    ("grpc.keepalive_timeout_ms", 10_000),  # no ack in 10 s: the connection is dead, reconnect
    ("grpc.keepalive_permit_without_calls", 1),  # an idle pooled connection is the one to keep
    ("grpc.http2.max_pings_without_data", 0),  # else pings stop after 2 on an idle connection
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 5_000),  # a restarted server is back in use within ~5 s
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

# What a server must allow for CLIENT_OPTIONS' idle pings: by default it answers pings on a
# connection without calls (or more often than every 5 min) with GOAWAY "too_many_pings".
SERVER_KEEPALIVE_OPTIONS: tuple[Option, ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


def client_options(extra: Iterable[Option] = ()) -> list[Option]:
    """CLIENT_OPTIONS with `extra` in place of any of the same name."""
    return list({**dict(CLIENT_OPTIONS), **dict(extra)}.items())


def channel_key(address: str, security: ClientSecurity | None, options: Sequence[Option] = ()) -> ChannelKey:
    identity = (security.ca, security.cert, security.key) if security is not None and security.tls else None
    return address, identity, tuple(options)


class ChannelPool:
    """grpc.aio channels, one per key, made on first use; made (and used) inside one event loop."""

    def __init__(self, options: Iterable[Option] = ()):
        self.loop = asyncio.get_running_loop()
        self._options = tuple(options)  # on top of CLIENT_OPTIONS, for every channel
        self._channels: dict[ChannelKey, grpc.aio.Channel] = {}
        self._closed = False

    def get(self, address: str, security: ClientSecurity | None = None,
            options: Sequence[Option] = ()) -> grpc.aio.Channel:
        if asyncio.get_running_loop() is not self.loop:
            raise RuntimeError("a ChannelPool serves only the event loop it was made on")
        if self._closed:
            raise RuntimeError("the ChannelPool is closed")
        key = channel_key(address, security, options)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = aio_channel(address, security, client_options((*self._options, *options)))
        return channel

    def __len__(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        """Closes every channel (calls still on them are cancelled); later `get`s raise."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> ChannelPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class SyncChannelPool:
    """grpc's threaded channels, one per key, made on first use; thread-safe."""

    def __init__(self, options: Iterable[Option] = ()):
        self._options = tuple(options)
        self._channels: dict[ChannelKey, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str, security: ClientSecurity | None = None,
            options: Sequence[Option] = ()) -> grpc.Channel:
        key = channel_key(address, security, options)
        with self._lock:
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = sync_channel(address, security,
                                                             client_options((*self._options, *options)))
            return channel

    def __len__(self) -> int:
        return len(self._channels)

    def close(self) -> None:
        """Closes every channel; a later `get` opens a new one (a process may close at exit only)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
