"""A delaying TCP proxy: propagation delay in user space, since the kernels here have no netem.

    python -m tools.testbed.delay_proxy --listen 10.213.0.1:7001 --target 127.0.0.1:50051 --delay-ms 40

Every chunk read on one side is written to the other `delay` after it arrived, in both directions.
Chunks wait in a queue stamped with their due time, so the delay is a latency, not a rate limit:
while one chunk waits, the next ones are already being read (a proxy that slept before each write
would divide the throughput by the delay). The rate comes from the shaped link beside it (tbf).

Not a full link model: the proxy terminates TCP, so each side's congestion window sees its own
short hop, not the delayed path (slow start over a long RTT is not reproduced).
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


async def _read_side(reader: asyncio.StreamReader, queue: asyncio.Queue, delay_s: float) -> None:
    """Stamps every chunk with the time it is due on the other side; EOF (or a reset) is queued too."""
    try:
        while data := await reader.read(CHUNK):
            await queue.put((time.monotonic() + delay_s, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((time.monotonic() + delay_s, _EOF))


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
        try:
            server_reader, server_writer = await asyncio.open_connection(cfg.target_host, cfg.target_port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_direction(client_reader, server_writer, cfg.delay_s),
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
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 10_000:
        parser.error(f"--delay-ms: must be in 0..10000, got {args.delay_ms:g}")
    return ProxyConfig(*args.listen, *args.target, args.delay_ms / 1e3)


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
