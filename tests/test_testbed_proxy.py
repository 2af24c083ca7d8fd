"""The testbed's delaying proxy (tools/testbed/delay_proxy.py), as a process on loopback: bytes pass
intact and in order both ways, every round trip takes at least twice the one-way delay, and the
delay is a queue (chunks are read while earlier ones wait), not a pause that serializes the link."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tools.testbed.delay_proxy import _read_side

DELAY_MS = 60


@contextmanager
def echo_server() -> Iterator[int]:
    """A loopback TCP server that echoes every connection's bytes back until it closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@contextmanager
def delay_proxy(target_port: int, delay_ms: float, *extra: str) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "tools.testbed.delay_proxy", "--listen", "127.0.0.1:0",
                             "--target", f"127.0.0.1:{target_port}", "--delay-ms", str(delay_ms), *extra],
                            stdout=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()  # "delay proxy 127.0.0.1:PORT -> ..."
        yield int(banner.split()[2].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(10)


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = conn.recv(min(1 << 16, n - got))
        assert data, f"connection closed after {got} of {n} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def test_round_trips_take_at_least_twice_the_delay_and_bytes_arrive_intact():
    with echo_server() as port, delay_proxy(port, DELAY_MS) as proxy_port:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as conn:
            for i in range(3):
                message = bytes([i]) * 1000
                began = time.perf_counter()
                conn.sendall(message)
                assert recv_exactly(conn, len(message)) == message
                assert time.perf_counter() - began >= 2 * DELAY_MS / 1e3


def test_with_handshake_a_new_connection_pays_the_tcp_handshakes_round_trip_once():
    """The proxy accepts at once; with --handshake the client's first bytes still arrive as if
    sent after a SYN / SYN-ACK round trip, and the connection's later round trips cost one RTT."""
    with echo_server() as port, delay_proxy(port, DELAY_MS, "--handshake") as proxy_port:
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as conn:
            conn.sendall(b"a" * 1000)  # at once, as a client whose connect() returned
            assert recv_exactly(conn, 1000) == b"a" * 1000
            first = time.perf_counter() - began
            began = time.perf_counter()
            conn.sendall(b"b" * 1000)
            assert recv_exactly(conn, 1000) == b"b" * 1000
            later = time.perf_counter() - began
    assert first >= 4 * DELAY_MS / 1e3 and 2 * DELAY_MS / 1e3 <= later < first


def test_a_bulk_transfer_arrives_whole_and_in_order_both_ways():
    payload = bytes(range(256)) * 8192  # 2 MiB, many chunks: any reordering or loss shows
    with echo_server() as port, delay_proxy(port, DELAY_MS) as proxy_port:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            echoed = recv_exactly(conn, len(payload))
            sender.join()
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # the half-close travelled through, and back
    assert echoed == payload


def test_chunks_are_read_while_earlier_ones_wait_so_the_delay_never_cuts_the_rate():
    """Nothing drains the queue here: a proxy that waited out each chunk's delay before reading the
    next would still hold the first; this one has read them all, each due `delay` after it came."""
    delay_s = 30.0  # far longer than the test: no chunk is due yet

    async def scenario() -> tuple[list[float], list[tuple[float, bytes]]]:
        reader = asyncio.StreamReader()
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(_read_side(reader, queue, delay_s))
        fed = []
        for i in range(5):
            fed.append(time.monotonic())
            reader.feed_data(bytes([i]) * 100)
            await asyncio.sleep(0)  # the read side takes it
        reader.feed_eof()
        await task  # finished reading with nothing written
        return fed, [queue.get_nowait() for _ in range(queue.qsize())]

    fed, queued = asyncio.run(scenario())
    assert [data for _, data in queued] == [bytes([i]) * 100 for i in range(5)] + [b""]  # in order, EOF last
    for arrived, (due, _) in zip(fed, queued):
        assert due >= arrived + delay_s  # each due a full delay after it arrived


@pytest.mark.parametrize("argv,named", [(["--listen", "127.0.0.1", "--target", "127.0.0.1:1", "--delay-ms", "5"], "--listen"),
                                        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--delay-ms", "-5"], "--delay-ms")])
def test_a_bad_flag_is_one_line_naming_it(argv, named):
    done = subprocess.run([sys.executable, "-m", "tools.testbed.delay_proxy", *argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert named in done.stderr.strip().splitlines()[-1]
