"""The separate-hosts testbed: two namespaces, one tbf-shaped veth link. The shaping is applied both
ways at the rate asked for and follows a reshape, traffic crosses the link (directly and through the
delay proxy), and nothing of the testbed outlives it. What rate a transfer actually gets is measured
by bench/testbed_link.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools.testbed.netns import Link, Testbed

ROOT = Path(__file__).resolve().parent.parent
REASON = Testbed.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"testbed: {REASON}")

RECEIVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.bind((sys.argv[1], 5301)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); n = 0
    while b := c.recv(1 << 16):
        n += len(b)
    print(n, flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[3])), timeout=30); c.sendall(b"x" * int(sys.argv[2])); c.close()
""")
PROXY_PORT = 5302


def _received(bed: Testbed, link: Link, nbytes: int, port: int = 5301) -> int:
    """Bytes that reach the receiver in `link.b` of `nbytes` sent from `link.a`; `port`: 5301 is the
    receiver itself, PROXY_PORT a delay proxy in front of it."""
    receiver = bed.popen(link.b, [sys.executable, "-c", RECEIVER, link.b_ip], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    bed.run(link.a, [sys.executable, "-c", SENDER, link.b_ip, str(nbytes), str(port)], check=True, timeout=60)
    received = int(receiver.stdout.readline())
    receiver.wait(10)
    return received


def _shaping(bed: Testbed, link: Link) -> list[tuple[str, float]]:
    """(kind, rate in Mbit/s) of the root qdisc at each end of the link, as tc reads it inside
    the end's namespace (its JSON gives the rate in bytes/s)."""
    ends = []
    for host, dev in ((link.a, link.a_dev), (link.b, link.b_dev)):
        shown = bed.run(host, ["tc", "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True, check=True)
        (root,) = [q for q in json.loads(shown.stdout) if q.get("root")]
        ends.append((root["kind"], root.get("options", {}).get("rate", 0) * 8 / 1e6))
    return ends


def _leftovers(prefix: str) -> list[str]:
    """Namespaces and host-side links whose name carries the testbed's prefix."""
    listed = [subprocess.run(argv, capture_output=True, text=True, check=True).stdout
              for argv in (["ip", "netns", "list"], ["ip", "-o", "link", "show"])]
    return [line for text in listed for line in text.splitlines() if prefix in line]


def test_a_link_is_shaped_both_ways_reshaped_mid_run_and_gone_with_the_testbed():
    with Testbed() as bed:
        link = bed.link(bed.host("edge"), bed.host("device"), rate_mbit=20)
        assert _shaping(bed, link) == [("tbf", 20.0)] * 2
        assert _received(bed, link, 200_000) == 200_000
        bed.reshape(link, rate_mbit=2.5)
        assert _shaping(bed, link) == [("tbf", 2.5)] * 2
        assert _received(bed, link, 50_000) == 50_000
        prefix = bed.prefix
        assert len(_leftovers(prefix)) == 2  # its two namespaces, while it runs
    assert _leftovers(prefix) == []


def test_the_delay_proxy_forwards_a_transfer_across_a_shaped_link():
    """The bench's recipe for a link class (netem is missing): tbf for the rate, the delay proxy in
    the receiving namespace for the propagation delay; a bulk transfer through both arrives whole."""
    with Testbed() as bed:
        link = bed.link(bed.host("edge"), bed.host("device"), rate_mbit=10)
        proxy = bed.popen(link.b, [sys.executable, "-m", "tools.testbed.delay_proxy", "--listen",
                                   f"{link.b_ip}:{PROXY_PORT}", "--target", f"{link.b_ip}:5301", "--delay-ms", "200"],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().startswith("delay proxy")
        assert _received(bed, link, 500_000, PROXY_PORT) == 500_000
