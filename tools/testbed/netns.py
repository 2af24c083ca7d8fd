"""Separate hosts on one machine: network namespaces joined by veth pairs, each link shaped with
tc's token-bucket filter (the kernels here have tbf and htb but no netem, so propagation delay is
added in user space by a delaying proxy, not here).

    with Testbed() as bed:
        edge, phone = bed.host("edge"), bed.host("phone")
        link = bed.link(edge, phone, rate_mbit=10)          # shaped both ways
        server = bed.popen(edge, ["python", "-m", ...])     # runs inside the edge's namespace
        ...
        bed.reshape(link, rate_mbit=2)                      # a link whose rate changes mid-run

Everything created is removed on exit, on an exception, on SIGINT/SIGTERM and at interpreter exit;
namespaces carry a per-process prefix, so two testbeds never collide. Needs root (CAP_NET_ADMIN):
`Testbed.available()` says why not, so callers can skip with one line.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import subprocess
import uuid
from dataclasses import dataclass


class TestbedError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the message says which command failed)."""


@dataclass(frozen=True)
class Host:
    name: str  # the namespace's name
    label: str  # what the caller called it


@dataclass
class Link:
    a: Host
    b: Host
    a_dev: str
    b_dev: str
    a_ip: str
    b_ip: str
    rate_mbit: float | None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")


def _tbf(rate_mbit: float) -> list[str]:
    """A token bucket at `rate_mbit`: a burst of ~1 ms of traffic (at least a few MTUs, which a
    software shaper needs at low rates) and a queue of ~100 ms, so bulk transfers see the rate.
    Few MTUs, not more: a 16-MTU (24 KB) burst let a 66 KB handoff through a 2 Mbit/s link at
    ~3 Mbit/s; with 4 it sees 2.1."""
    rate_bps = rate_mbit * 1e6
    burst = max(4 * 1514, int(rate_bps / 8 / 1000))
    queue = max(64 * 1514, int(rate_bps / 8 * 0.1))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(queue)]


class Testbed:
    __test__ = False  # not a pytest class

    def __init__(self, prefix: str | None = None, subnet: str = "10.213.0.0/16"):
        self.prefix = prefix or f"tdm{uuid.uuid4().hex[:6]}"
        self._subnets = ipaddress.ip_network(subnet).subnets(new_prefix=30)
        self.hosts: list[Host] = []
        self.links: list[Link] = []
        self._previous_handlers: dict[int, object] = {}

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not (one line)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        probe = f"tdmprobe{os.getpid()}"
        try:
            _run("ip", "netns", "add", probe)
        except (TestbedError, FileNotFoundError) as exc:
            return f"cannot create a network namespace: {exc}"
        _run("ip", "netns", "del", probe)
        return None

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        atexit.register(self.teardown)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        atexit.unregister(self.teardown)

    def _on_signal(self, signum, frame) -> None:
        self.teardown()
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def teardown(self) -> None:
        """Deletes every namespace made here (their veth ends and qdiscs go with them)."""
        while self.hosts:
            host = self.hosts.pop()
            for pid in subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        self.links.clear()

    # --- topology -------------------------------------------------------------------------------
    def host(self, label: str) -> Host:
        host = Host(f"{self.prefix}-{label}"[:32], label)
        _run("ip", "netns", "add", host.name)
        self.hosts.append(host)
        _run("ip", "-n", host.name, "link", "set", "lo", "up")
        return host

    def link(self, a: Host, b: Host, rate_mbit: float | None = None) -> Link:
        """A veth pair between `a` and `b` on its own /30, shaped to `rate_mbit` each way."""
        net = next(self._subnets)
        a_ip, b_ip = (str(ip) for ip in list(net.hosts())[:2])
        n = len(self.links)
        a_dev, b_dev = f"{self.prefix}a{n}"[:15], f"{self.prefix}b{n}"[:15]
        _run("ip", "link", "add", a_dev, "netns", a.name, "type", "veth", "peer", "name", b_dev, "netns", b.name)
        for host, dev, ip in ((a, a_dev, a_ip), (b, b_dev, b_ip)):
            _run("ip", "-n", host.name, "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", "-n", host.name, "link", "set", dev, "up")
        link = Link(a, b, a_dev, b_dev, a_ip, b_ip, None)
        self.links.append(link)
        if rate_mbit is not None:
            self.reshape(link, rate_mbit)
        return link

    def reshape(self, link: Link, rate_mbit: float) -> None:
        """Sets (or changes, mid-run) the link's rate in both directions."""
        for host, dev in ((link.a, link.a_dev), (link.b, link.b_dev)):
            _run("ip", "netns", "exec", host.name, "tc", "qdisc", "replace", "dev", dev, "root", *_tbf(rate_mbit))
        link.rate_mbit = rate_mbit

    # --- processes ------------------------------------------------------------------------------
    def command(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.name, *argv]

    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process inside `host`'s namespace (killed at teardown if still running)."""
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: Host, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), **kwargs)
