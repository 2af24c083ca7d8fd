"""The fast version of bench/load.py (CI): a few concurrent device clients against a scheduler and
an edge server on loopback for a few seconds; nothing is lost, both servers stay up."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
from service_procs import ROOT, edge_server, metric_value, scheduler_service, wait_edges_live


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_concurrent_clients_lose_nothing(tiny_packs, tmp_path: Path):
    bench = load_bench()
    with scheduler_service(tmp_path) as sched, \
            edge_server(tiny_packs["large"], tmp_path, "--scheduler", sched.address) as edge:
        wait_edges_live(sched, 1, 60, "the edge never heartbeated")
        tally = bench.Tally()
        asyncio.run(bench.run(sched.address, 4, 8.0, tally, size=32))
        assert edge.proc.poll() is None and sched.proc.poll() is None
        edge_ok = metric_value(edge.metrics(), "tandem_edge_requests_total", 'code="OK"')
    assert not tally.lost, tally.lost
    assert len(tally.latencies) >= 4 and edge_ok == len(tally.latencies)
