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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

CHUNK = 64 * 1024
MAX_QUEUED_CHUNKS = 1024  # ~64 MiB in flight per direction before reading pauses (backpressure)
_EOF = b""


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    delay_s: float
    handshake: bool = False  # a new connection pays the TCP handshake's round trip


async def _read_side(reader: asyncio.StreamReader, queue: asyncio.Queue, delay_s: float,
                     not_before: float = 0.0) -> None:
    """Stamps every chunk with the time it is due on the other side (sent no earlier than
    `not_before`); EOF (or a reset) is queued too."""
    try:
        while data := await reader.read(CHUNK):
            await queue.put((max(time.monotonic(), not_before) + delay_s, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((max(time.monotonic(), not_before) + delay_s, _EOF))


async def _write_side(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
    """Writes each chunk when it is due, in arrival order; at EOF half-closes the other side."""
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
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


async def _direction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)
    await asyncio.gather(_read_side(reader, queue, delay_s), _write_side(queue, writer))


def connection_handler(cfg: ProxyConfig):
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Client bytes are read (and stamped) from the start, also while the handshake is waited out.
        handshake_rtt = 2 * cfg.delay_s if cfg.handshake else 0.0
        upstream: asyncio.Queue = asyncio.Queue(MAX_QUEUED_CHUNKS)
        reading = asyncio.ensure_future(_read_side(client_reader, upstream, cfg.delay_s,
                                                   time.monotonic() + handshake_rtt))
        try:
            if handshake_rtt:
                await asyncio.sleep(handshake_rtt + cfg.delay_s)  # the client's ACK reaches the server
            server_reader, server_writer = await asyncio.open_connection(cfg.target_host, cfg.target_port)
        except BaseException as exc:  # no server (or the proxy stops meanwhile)
            reading.cancel()
            client_writer.close()
            if isinstance(exc, OSError):
                return
            raise
        try:
            await asyncio.gather(reading, _write_side(upstream, server_writer),
                                 _direction(server_reader, client_writer, cfg.delay_s))
        finally:
            for writer in (client_writer, server_writer):
                writer.close()

    return handle


async def serve(cfg: ProxyConfig, ready: asyncio.Event | None = None) -> None:
    server = await asyncio.start_server(connection_handler(cfg), cfg.listen_host, cfg.listen_port)
    print(f"delay proxy {cfg.listen_host}:{server.sockets[0].getsockname()[1]} -> "
          f"{cfg.target_host}:{cfg.target_port}, {cfg.delay_s * 1e3:g} ms each way", flush=True)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


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
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 10_000:
        parser.error(f"--delay-ms: must be in 0..10000, got {args.delay_ms:g}")
    (listen_host, listen_port), (target_host, target_port) = args.listen, args.target
    return ProxyConfig(listen_host, listen_port, target_host, target_port, args.delay_ms / 1e3, args.handshake)


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
