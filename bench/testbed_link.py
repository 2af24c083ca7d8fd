"""The testbed's shaped link, measured: the rate a bulk TCP transfer gets beside the rate tbf was set to.

    .venv/bin/python -m bench.testbed_link [--quick]     # from the repository root (tools is not installed)

Two namespaces joined by one veth pair (tools/testbed/netns.py), reshaped before each row; a
transfer from one end to the other, directly or through tools/testbed/delay_proxy.py in the
receiving namespace (one-way delay: the recipe bench/links.py uses for a link class). Measured rate
= bytes over the time from the first to the last byte received, so the proxy's delay drops out:
what a row shows is whether tbf and the proxy deliver the shaped rate. Each transfer lasts about
3 s at the shaped rate (--quick: 1.6 s, and only the rows the suite's check used to time: 20 and
5 Mbit/s, and 10 Mbit/s through 200 ms). Target: every row within 20% of its shaped rate; exit
status 1 when one misses. Skips (exit 0) when namespaces cannot be made (needs root).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

from tools.testbed.netns import Link, Testbed

ROOT = Path(__file__).resolve().parent.parent

RECEIVER_PORT, PROXY_PORT = 5301, 5302
TOLERANCE = 0.2
# (shaped Mbit/s, one-way delay ms through the proxy; 0: no proxy)
QUICK = ((20, 0), (5, 0), (10, 200))
# Every rate alone, then bench/links.py's classes (half their RTT each way) and a long delay.
FULL = ((200, 0), (50, 0), (20, 0), (10, 0), (5, 0), (2, 0), (200, 2.5), (50, 10), (10, 20), (2, 40), (10, 200))

RECEIVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0; first = None
    while b := c.recv(1 << 16):
        if first is None: first = time.perf_counter()
        n += len(b)
    print(n, time.perf_counter() - first, flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30); c.sendall(b"x" * int(sys.argv[3])); c.close()
""")


def measured_mbit(bed: Testbed, link: Link, nbytes: int, delay_ms: float) -> float:
    """Sends `nbytes` from `link.a` to `link.b` (through a delay proxy in `link.b` when `delay_ms`)."""
    receiver = bed.popen(link.b, [sys.executable, "-c", RECEIVER, link.b_ip, str(RECEIVER_PORT)],
                         stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    port, proxy = RECEIVER_PORT, None
    if delay_ms:
        proxy = bed.popen(link.b, [sys.executable, "-m", "tools.testbed.delay_proxy", "--listen", f"{link.b_ip}:{PROXY_PORT}",
                                   "--target", f"{link.b_ip}:{RECEIVER_PORT}", "--delay-ms", str(delay_ms)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout is not None and proxy.stdout.readline().startswith("delay proxy")
        port = PROXY_PORT
    try:
        bed.run(link.a, [sys.executable, "-c", SENDER, link.b_ip, str(port), str(nbytes)], check=True, timeout=120)
        received, seconds = receiver.stdout.readline().split()
        receiver.wait(10)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
    if int(received) != nbytes:
        raise RuntimeError(f"{received} of {nbytes} bytes arrived")
    return nbytes * 8 / float(seconds) / 1e6


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the three rows the suite used to time, 1.6 s each")
    args = parser.parse_args(argv)
    reason = Testbed.available()
    if reason is not None:
        print(f"testbed_link.py: skipped: {reason}")
        return 0
    rows, seconds = (QUICK, 1.6) if args.quick else (FULL, 3.0)
    print(f"| shaped Mbit/s | proxy delay (one way) | bytes | measured Mbit/s | measured / shaped | within {TOLERANCE:.0%} |")
    print("|---|---|---|---|---|---|")
    missed = 0
    with Testbed() as bed:
        link = bed.link(bed.host("a"), bed.host("b"), rate_mbit=rows[0][0])
        for rate, delay_ms in rows:
            bed.reshape(link, rate_mbit=rate)
            nbytes = int(rate * 1e6 / 8 * seconds)
            measured = measured_mbit(bed, link, nbytes, delay_ms)
            ok = abs(measured / rate - 1) <= TOLERANCE
            missed += not ok
            delay = f"{delay_ms:g} ms" if delay_ms else "none"
            print(f"| {rate:g} | {delay} | {nbytes:,} | {measured:.1f} | {measured / rate:.2f} | {'met' if ok else '**missed**'} |",
                  flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
