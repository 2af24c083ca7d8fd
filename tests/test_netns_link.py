"""The separate-hosts testbed: two namespaces, one tbf-shaped veth link. A bulk TCP transfer across
it runs at the shaped rate (within 20%), and nothing of the testbed outlives it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools.testbed.netns import Testbed

ROOT = Path(__file__).resolve().parent.parent
REASON = Testbed.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")

RECEIVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.bind((sys.argv[1], 5301)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0; first = None
    while True:
        b = c.recv(1 << 16)
        if not b: break
        if first is None: first = time.perf_counter()
        n += len(b)
    print(n, time.perf_counter() - first, flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=30); c.sendall(b"x" * int(sys.argv[2])); c.close()
""")
PROXY_PORT = 5302


def _measured_mbit(bed: Testbed, link, nbytes: int, port: int = 5301) -> float:
    """Bytes over the time from the first to the last byte received; `port`: 5301 is the receiver
    itself, PROXY_PORT a delay proxy in front of it."""
    receiver = bed.popen(link.b, [sys.executable, "-c", RECEIVER, link.b_ip], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    bed.run(link.a, [sys.executable, "-c", SENDER, link.b_ip, str(nbytes), str(port)], check=True, timeout=60)
    received, seconds = receiver.stdout.readline().split()
    receiver.wait(10)
    assert int(received) == nbytes
    return nbytes * 8 / float(seconds) / 1e6


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_shaped_link_delivers_its_rate_and_changes_it_mid_run():
    with Testbed() as bed:
        link = bed.link(bed.host("edge"), bed.host("device"), rate_mbit=20)
        first = _measured_mbit(bed, link, 4_000_000)
        bed.reshape(link, rate_mbit=5)
        second = _measured_mbit(bed, link, 1_000_000)
        prefix = bed.prefix
        assert prefix in _namespaces()
    assert 0.8 <= first / 20 <= 1.2, f"{first:.1f} Mbit/s on a 20 Mbit/s link"
    assert 0.8 <= second / 5 <= 1.2, f"{second:.1f} Mbit/s on a 5 Mbit/s link"
    assert prefix not in _namespaces()  # torn down


def test_the_delay_proxy_delays_a_shaped_link_without_cutting_its_rate():
    """The bench's recipe for a link class (netem is missing): tbf for the rate, the delay proxy in
    user space for the propagation delay. A bulk transfer through both still runs at the shaped rate
    (a proxy that waited out the delay per 64 KB read would manage 2.6 Mbit/s)."""
    with Testbed() as bed:
        link = bed.link(bed.host("edge"), bed.host("device"), rate_mbit=10)
        proxy = bed.popen(link.b, [sys.executable, "-m", "tools.testbed.delay_proxy", "--listen",
                                   f"{link.b_ip}:{PROXY_PORT}", "--target", f"{link.b_ip}:5301", "--delay-ms", "200"],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().startswith("delay proxy")
        rate = _measured_mbit(bed, link, 2_000_000, PROXY_PORT)
    assert 0.8 <= rate / 10 <= 1.2, f"{rate:.1f} Mbit/s through a 200 ms delay on a 10 Mbit/s link"
