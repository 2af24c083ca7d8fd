"""A TCP proxy on loopback that makes the link between a device and an edge server slow or lossy:
every chunk waits `delay_s` before it is forwarded, and `cut_after_bytes` (server -> client)
closes the connection mid-stream. Counts the TCP connections it accepts (how many a client opened).
Runs its own event loop on a thread, beside synchronous tests."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass
class LinkFaults:
    delay_s: float = 0.0
    cut_after_bytes: int | None = None  # downstream bytes after which the connection drops


class LinkProxy:
    def __init__(self, target: str, faults: LinkFaults):
        self.target_host, port = target.rsplit(":", 1)
        self.target_port = int(port)
        self.faults = faults
        self.address = ""
        self.cuts = 0
        self.connections = 0  # accepted so far
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LinkProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _connection(self, client_reader, client_writer) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        budget = [self.faults.cut_after_bytes]
        await asyncio.gather(self._pump(client_reader, server_writer, None),
                             self._pump(server_reader, client_writer, budget), return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pump(self, reader, writer, budget: list[int | None] | None) -> None:
        while data := await reader.read(4096):
            if self.faults.delay_s:
                await asyncio.sleep(self.faults.delay_s)
            if budget is not None and budget[0] is not None:
                if len(data) >= budget[0]:
                    writer.write(data[: budget[0]])
                    self.cuts += 1
                    writer.transport.abort()  # the link dies mid-stream
                    raise ConnectionResetError("link cut")
                budget[0] -= len(data)
            writer.write(data)
            await writer.drain()
        writer.close()
