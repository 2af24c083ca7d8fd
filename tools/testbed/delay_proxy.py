"""A delaying TCP proxy: propagation delay in user space, since the kernels here have no netem.

    python -m tools.testbed.delay_proxy --listen 10.213.0.1:7001 --target 127.0.0.1:50051 --delay-ms 40

Every chunk read on one side is written to the other `delay` after it arrived, in both directions.
Chunks wait in a queue stamped with their due time, so the delay is a latency, not a rate limit:
while one chunk waits, the next ones are already being read (a proxy that slept before each write
would divide the throughput by the delay). The rate comes from the shaped link beside it (tbf).

Not a full link model: the proxy terminates TCP, so each side's congestion window sees its own
short hop, not the delayed path (slow start over a long RTT is not reproduced), and it answers
a client's TCP handshake at once. With --handshake a new connection pays that handshake's round
trip here: the server accepts 1.5 RTT after the client connected (SYN, SYN-ACK, ACK) and nothing
the client sent before its side of the handshake would have completed (1 RTT) arrives earlier,
so connection setup costs what it costs on a real link (bench/channels.py measures it).

Also the tests' and benches' faulty link on loopback, in their own process (`DelayProxy`, on an
event loop thread of its own): --rate-mbit paces each direction in user space where no tbf shapes
the link (bytes leave no faster than the rate, then wait the delay), --cut-after-bytes resets a
connection once that many bytes went from the server to the client (a link dying mid-stream), and
it counts the connections it accepted (how many a client opened) and the ones it cut.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 64 * 1024
MAX_QUEUED_CHUNKS = 1024  # ~64 MiB in flight per direction before reading pauses (backpressure)
PACED_PIECE = 4096  # with a rate: bytes stamped (and sent) at once, so a chunk does not arrive as one burst
_EOF = b""


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    delay_s: float
    handshake: bool = False  # a new connection pays the TCP handshake's round trip
    rate_bps: float = 0.0  # each direction paced to this rate (0: as fast as it comes)
    cut_after_bytes: int | None = None  # server -> client bytes after which a connection is reset


@dataclass
class Counts:
    connections: int = 0  # accepted so far
    cuts: int = 0  # connections reset by cut_after_bytes


async def _read_side(reader: asyncio.StreamReader, queue: asyncio.Queue, delay_s: float,
                     not_before: float = 0.0, rate_bps: float = 0.0) -> None:
    """Stamps every chunk with the time it is due on the other side (sent no earlier than
    `not_before`; with `rate_bps`, in pieces that leave one after another at that rate, then
    wait the delay); EOF (or a reset) is queued too."""
    free_at = 0.0  # with a rate: when the last piece has left
    try:
        while data := await reader.read(CHUNK):
            if not rate_bps:
                await queue.put((max(time.monotonic(), not_before) + delay_s, data))
                continue
            for start in range(0, len(data), PACED_PIECE):
                piece = data[start:start + PACED_PIECE]
                free_at = max(time.monotonic(), not_before, free_at) + len(piece) * 8 / rate_bps
                await queue.put((free_at + delay_s, piece))
    except (ConnectionError, OSError):
        pass
    await queue.put((max(time.monotonic(), not_before, free_at) + delay_s, _EOF))


async def _write_side(queue: asyncio.Queue, writer: asyncio.StreamWriter, cut_after_bytes: int | None = None,
                      cut: Callable[[], None] | None = None) -> None:
    """Writes each chunk when it is due, in arrival order; at EOF half-closes the other side.
    After `cut_after_bytes` bytes, calls `cut` (which resets the connection) and stops."""
    budget = cut_after_bytes
    try:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:  # the other side closed: pass the half-close on
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if budget is not None and len(data) >= budget:
                writer.write(data[:budget])
                if cut is not None:
                    cut()
                return
            if budget is not None:
                budget -= len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


def connection_handler(cfg: ProxyConfig, counts: Counts | None = None):
    counts = counts if counts is not None else Counts()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        counts.connections += 1
        # Client bytes are read (and stamped) from the start, also while the handshake is waited out.
        handshake_rtt = 2 * cfg.delay_s if cfg.handshake else 0.0
        upstream: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)
        reading = asyncio.ensure_future(_read_side(client_reader, upstream, cfg.delay_s,
                                                   time.monotonic() + handshake_rtt, cfg.rate_bps))
        try:
            if handshake_rtt:
                await asyncio.sleep(handshake_rtt + cfg.delay_s)  # the client's ACK reaches the server
            server_reader, server_writer = await asyncio.open_connection(cfg.target_host, cfg.target_port)
        except BaseException as exc:  # no server (or the proxy stops meanwhile)
            reading.cancel()
            client_writer.close()
            if isinstance(exc, (OSError, asyncio.CancelledError)):  # cancelled: the proxy stops (DelayProxy)
                return
            raise

        def cut() -> None:  # the link dies mid-stream: both sides see a reset
            counts.cuts += 1
            for writer in (client_writer, server_writer):
                writer.transport.abort()

        downstream: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)
        try:
            await asyncio.gather(reading, _write_side(upstream, server_writer),
                                 _read_side(server_reader, downstream, cfg.delay_s, rate_bps=cfg.rate_bps),
                                 _write_side(downstream, client_writer, cfg.cut_after_bytes, cut))
        except asyncio.CancelledError:  # the proxy stops (DelayProxy): the connection goes with it
            pass
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    return handle


async def _start(cfg: ProxyConfig, counts: Counts | None = None) -> asyncio.Server:
    return await asyncio.start_server(connection_handler(cfg, counts), cfg.listen_host, cfg.listen_port)


async def serve(cfg: ProxyConfig, ready: asyncio.Event | None = None) -> None:
    server = await _start(cfg)
    print(f"delay proxy {cfg.listen_host}:{server.sockets[0].getsockname()[1]} -> "
          f"{cfg.target_host}:{cfg.target_port}, {cfg.delay_s * 1e3:g} ms each way"
          + (f", {cfg.rate_bps / 1e6:g} Mbit/s" if cfg.rate_bps else "")
          + (f", cut after {cfg.cut_after_bytes} B" if cfg.cut_after_bytes is not None else ""), flush=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


class DelayProxy:
    """The proxy inside this process, on an event loop thread of its own (beside synchronous tests
    and benches); prints nothing.

        with DelayProxy(edge.address, delay_s=0.05) as link:   # link.address: where clients connect
            ...                                                  # link.connections, link.cuts
    """

    def __init__(self, target: str, delay_s: float = 0.0, *, rate_bps: float = 0.0,
                 cut_after_bytes: int | None = None, handshake: bool = False, listen: str = "127.0.0.1:0"):
        (listen_host, listen_port), (target_host, target_port) = _address(listen), _address(target)
        self.config = ProxyConfig(listen_host, listen_port, target_host, target_port, delay_s, handshake, rate_bps,
                                  cut_after_bytes)
        self.counts = Counts()
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    @property
    def connections(self) -> int:
        return self.counts.connections

    @property
    def cuts(self) -> int:
        return self.counts.cuts

    def __enter__(self) -> "DelayProxy":
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"delay proxy did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(_start(self.config, self.counts))
        except BaseException as exc:  # a busy --listen: said by __enter__
            self._error = exc
            self._ready.set()
            return
        self.address = f"{self.config.listen_host}:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):  # connections still open: dropped with the proxy
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(self._loop), return_exceptions=True))
        self._loop.close()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None = None) -> ProxyConfig:
    parser = argparse.ArgumentParser(prog="delay_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--handshake", action="store_true",
                        help="a new connection also pays the TCP handshake's round trip (the proxy answers it at once)")
    parser.add_argument("--rate-mbit", type=float, default=0.0,
                        help="pace each direction to this rate in user space (0: unpaced; the testbed shapes with tbf)")
    parser.add_argument("--cut-after-bytes", type=int, default=None,
                        help="reset a connection after this many bytes from the server to the client")
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 10_000:
        parser.error(f"--delay-ms: must be in 0..10000, got {args.delay_ms:g}")
    if args.rate_mbit < 0:
        parser.error(f"--rate-mbit: must be >= 0, got {args.rate_mbit:g}")
    if args.cut_after_bytes is not None and args.cut_after_bytes < 0:
        parser.error(f"--cut-after-bytes: must be >= 0, got {args.cut_after_bytes}")
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    return ProxyConfig(listen_host, listen_port, target_host, target_port, args.delay_ms / 1e3, args.handshake,
                       args.rate_mbit * 1e6, args.cut_after_bytes)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"delay_proxy: error: --listen {cfg.listen_host}:{cfg.listen_port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
