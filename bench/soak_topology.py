"""The processes of bench/soak.py and what the chaos does to them: services that keep their
address across restarts (`Slot`), started and stopped with the one launcher
(services/common/launcher.py), on loopback or in the testbed's network namespaces
(tools/testbed/netns.py) with this process moved into the device services' namespace; every
service's RSS sampled; the chaos events run one after the other."""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak_report import ChaosEvent, ChaosRecord, Instance
from services.common import launcher

ROOT = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "TANDEM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
LARGE, SMALL = "tandem/demo_pack/large", "tandem/demo_pack/small"
STARTUP_S = 300.0
EDGE_PORT, SCHEDULER_PORT, METRICS_PORT = 50051, 50071, 9101  # inside the testbed's hosts
LINK_MBIT, SLOW_MBIT = 50.0, 0.5
CLONE_NEWNET = 0x40000000


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# --- the topology --------------------------------------------------------------------------------

@dataclass
class Slot:
    """A service that may be restarted: the same address each time, a new process."""

    name: str
    module: str
    args: list[str]
    health: str
    host: object = None  # tools.testbed Host it runs in (None: this process's namespace)
    ip: str = "127.0.0.1"  # where clients reach it
    port: int = 0  # 0: a free one at its first start (loopback)
    process: launcher.Process | None = None
    instance: str = ""
    generation: int = 0

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class Topology:
    logs: Path
    t0: float
    bed: object = None  # tools.testbed.netns.Testbed when the links are shaped
    links: dict[str, object] = field(default_factory=dict)  # edge slot name -> its link to the devices
    slots: dict[str, Slot] = field(default_factory=dict)
    instances: dict[str, dict] = field(default_factory=dict)  # name -> Instance fields (mutable until the end)
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self, slot: Slot, restart_warm_up: float = math.nan) -> None:
        """Starts `slot` (again) and waits until it is SERVING; LaunchError with its log's tail."""
        slot.generation += 1
        name = slot.name if slot.generation == 1 else f"{slot.name}#{slot.generation}"
        began = self.now()
        if slot.host is None:
            process = launcher.start_server(slot.module, *slot.args, log_dir=self.logs, name=name.replace("#", "-"),
                                            port=slot.port or None, env=ENV, cwd=ROOT, health_service=slot.health,
                                            timeout=STARTUP_S)
            slot.port = int(process.address.rsplit(":", 1)[1])
        else:
            host = slot.host
            command = launcher.server_command(slot.module, slot.port, METRICS_PORT, ["--host", "0.0.0.0", *slot.args])
            process = launcher.spawn(name, command, log_path=self.logs / f"{name.replace('#', '-')}.log", env=ENV,
                                     cwd=ROOT, wrap=lambda argv: self.bed.command(host, argv), address=slot.address,
                                     metrics_port=METRICS_PORT, metrics_host=slot.ip, health_service=slot.health)
            try:
                process.wait_healthy(STARTUP_S)
            except BaseException:
                launcher.terminate([process], grace=5)
                raise
        with self.lock:
            slot.process, slot.instance = process, name
            ready = self.now()
            self.instances[name] = {"name": name, "service": slot.name, "started": began,
                                    "warm_at": ready + restart_warm_up, "ended": math.nan}
        log(f"{name} SERVING at {slot.address} (pid {process.pid}, {ready - began:.1f} s)")

    def gone(self, slot: Slot) -> None:
        with self.lock:
            self.instances[slot.instance]["ended"] = self.now()
            slot.process = None

    def stop(self, slot: Slot, grace: float = 40.0) -> None:
        """SIGTERM, the service drains and exits (SIGKILL after `grace`)."""
        assert slot.process is not None
        launcher.terminate([slot.process], grace)
        self.gone(slot)

    def kill(self, slot: Slot) -> None:
        assert slot.process is not None
        slot.process.proc.kill()
        slot.process.proc.wait()
        self.gone(slot)

    def sample_rss(self, stop: threading.Event, every: float) -> None:
        """Every service's resident memory every `every` seconds (psutil, else /proc VmRSS)."""
        try:
            import psutil

            def rss(pid: int) -> int:
                return psutil.Process(pid).memory_info().rss
        except ImportError:
            rss = launcher.rss_bytes
        while not stop.wait(every):
            with self.lock:
                running = [(s.instance, s.process.pid) for s in self.slots.values() if s.process is not None]
            for name, pid in running:
                try:
                    value = rss(pid)
                except Exception:  # noqa: BLE001 - gone between the listing and the read
                    continue
                if value > 0:  # 0: exiting (a zombie has no resident set)
                    self.samples.append((self.now(), name, value))

    def stop_all(self) -> None:
        launcher.terminate([s.process for s in reversed(list(self.slots.values())) if s.process is not None], 40.0)

    def final_instances(self, warm_end: float) -> list[Instance]:
        out = []
        for fields in self.instances.values():
            warm = fields["warm_at"]
            out.append(Instance(fields["name"], fields["service"], fields["started"],
                                warm_end if math.isnan(warm) else warm, fields["ended"]))
        return out


def build(topo: Topology, devices: int) -> None:
    """The slots: scheduler, edge0, edge1, dev0..dev{devices-1} (benign), dev-rogue."""
    state = str(topo.logs / "scheduler-state.json")
    if topo.bed is None:
        topo.slots["scheduler"] = Slot("scheduler", "services.scheduler", ["--state-file", state], "")
        return
    bed = topo.bed
    sched, ue = bed.host("sched"), bed.hosts[0]
    control = bed.link(sched, ue)
    edge_hosts = [bed.host(f"edge{i}") for i in range(2)]
    data = [bed.link(h, ue, rate_mbit=LINK_MBIT) for h in edge_hosts]
    beats = [bed.link(sched, h) for h in edge_hosts]
    edge_addresses = [f"{link.a_ip}:{EDGE_PORT}" for link in data]
    topo.slots["scheduler"] = Slot("scheduler", "services.scheduler",
                                   ["--state-file", state, *(a for e in edge_addresses for a in ("--edge", e))], "",
                                   host=sched, ip=control.a_ip, port=SCHEDULER_PORT)
    for i, (host, link, beat) in enumerate(zip(edge_hosts, data, beats)):
        topo.slots[f"edge{i}"] = Slot(f"edge{i}", "services.edge_server",
                                      ["--pack", LARGE, "--device", "cpu", "--scheduler", f"{beat.a_ip}:{SCHEDULER_PORT}",
                                       "--advertise", edge_addresses[i]], "tandem.v1.EdgeService",
                                      host=host, ip=link.a_ip, port=EDGE_PORT)
        topo.links[f"edge{i}"] = link


def start_all(topo: Topology, devices: int) -> None:
    """Scheduler, then both edges, then the device services (each group started together)."""
    topo.start(topo.slots["scheduler"])
    if topo.bed is None:
        for i in range(2):
            topo.slots[f"edge{i}"] = Slot(f"edge{i}", "services.edge_server",
                                          ["--pack", LARGE, "--device", "cpu", "--scheduler",
                                           topo.slots["scheduler"].address], "tandem.v1.EdgeService")
    together(topo, [topo.slots["edge0"], topo.slots["edge1"]])
    edges = [a for i in range(2) for a in ("--edge", topo.slots[f"edge{i}"].address)]
    names = [f"dev{i}" for i in range(devices)] + ["dev-rogue"]
    for name in names:
        topo.slots[name] = Slot(name, "services.ue_client", ["--pack", SMALL, "--device", "cpu", *edges],
                                "tandem.v1.DeviceService")
    together(topo, [topo.slots[n] for n in names])


def together(topo: Topology, slots: list[Slot]) -> None:
    with ThreadPoolExecutor(len(slots)) as pool:
        for future in [pool.submit(topo.start, slot) for slot in slots]:
            future.result()


# --- network namespaces --------------------------------------------------------------------------------

def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def enter(namespace: str) -> int:
    """This thread (and the threads and children it starts from now on) into `namespace`;
    returns a descriptor of the one it was in, for `leave`."""
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)
    return original


def leave(original: int) -> None:
    _setns(original)
    os.close(original)


def testbed_or_why(mode: str):
    """(a Testbed entered, None) when shaped links can run here, else (None, why not)."""
    if mode == "loopback":
        return None, "--links loopback"
    from tools.testbed.netns import Testbed

    why = Testbed.available()
    if why is not None:
        if mode == "netns":
            raise SystemExit(f"bench.soak: error: --links netns: {why}")
        return None, why
    bed = Testbed().__enter__()
    bed.host("ue")  # this process and the device services
    return bed, None


# --- the chaos runner ------------------------------------------------------------------------------------

async def run_chaos(topo: Topology, events: list[ChaosEvent], start: float, restart_warm_up: float) -> list[ChaosRecord]:
    """Each event at its time (`start` + its `at`), never before the previous one is over (a
    restart can take a minute on a loaded machine: the events then come later, one at a time,
    and the soak's arrivals go on until they are done)."""
    return [await chaos_event(topo, event, start, restart_warm_up) for event in events]


async def chaos_event(topo: Topology, event: ChaosEvent, start: float, restart_warm_up: float) -> ChaosRecord:
    await asyncio.sleep(max(0.0, start + event.at - topo.now()))
    slot = topo.slots.get(event.target)
    began, note = topo.now(), ""
    log(f"chaos: {event.label}")
    try:
        if event.action == "sigstop":
            assert slot is not None and slot.process is not None
            os.kill(slot.process.pid, signal.SIGSTOP)
            await asyncio.sleep(event.hold)
            os.kill(slot.process.pid, signal.SIGCONT)
        elif event.action == "kill9":
            assert slot is not None
            topo.kill(slot)
            await asyncio.sleep(event.hold)
            await asyncio.to_thread(topo.start, slot, restart_warm_up)
        elif event.action == "restart":
            assert slot is not None
            await asyncio.to_thread(topo.stop, slot)
            await asyncio.to_thread(topo.start, slot, restart_warm_up)
        elif event.action == "reshape":
            link = topo.links[event.target]
            topo.bed.reshape(link, SLOW_MBIT)
            note = f"{LINK_MBIT:g} -> {SLOW_MBIT:g} Mbit/s"
            await asyncio.sleep(event.hold)
            topo.bed.reshape(link, LINK_MBIT)
    except Exception as exc:  # noqa: BLE001 - a chaos step that failed is a failed target
        note = f"FAILED: {exc}"
        log(f"chaos: {event.label} failed: {exc}")
    log(f"chaos: {event.label} over ({topo.now() - began:.1f} s)")
    return ChaosRecord(event, began, topo.now(), note)


def after(task: asyncio.Future, topo: Topology, seconds: float) -> Callable[[], bool]:
    """True until `seconds` after `task` is done."""
    done_at: list[float] = []
    task.add_done_callback(lambda _: done_at.append(topo.now()))
    return lambda: not done_at or topo.now() < done_at[0] + seconds
