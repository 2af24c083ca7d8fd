"""A slow or lossy link between the device and the edge (a delaying / cutting TCP proxy on
loopback): images still arrive, deadlines hold (the device finishes alone and says why), and the
scheduler's calibration sees the slower link."""

from __future__ import annotations

import json

import pytest
from service_procs import edge_server, metric_value, scheduler_service

from services.cli import generate as cli
from tools.testbed.delay_proxy import DelayProxy

PROMPT = "a red circle at the left on a blue background"


@pytest.fixture(scope="module")
def edge(tiny_packs, tmp_path_factory):
    with edge_server(tiny_packs["large"], tmp_path_factory.mktemp("link")) as server:
        yield server


def generate(tiny_packs, tmp_path, capsys, name: str, *args: str) -> dict:
    argv = ["generate", PROMPT, "--small", str(tiny_packs["small"]), "--device", "cpu", "--steps", "6",
            "--out", str(tmp_path / name), "--json", "--quiet", *args]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / name).stat().st_size > 0
    return report


def test_a_slow_link_still_delivers_the_edge_steps(edge, tiny_packs, tmp_path, capsys):
    with DelayProxy(edge.address, delay_s=0.05) as link:
        report = generate(tiny_packs, tmp_path, capsys, "slow.png", "--edge", link.address, "--split", "4")
    assert report["fallback"] is None and report["edge_steps"] == 4


def test_the_deadline_holds_on_a_very_slow_link(edge, tiny_packs, tmp_path, capsys):
    with DelayProxy(edge.address, delay_s=1.5) as link:
        report = generate(tiny_packs, tmp_path, capsys, "late.png", "--edge", link.address, "--split", "4",
                          "--timeout", "1")
    assert report["fallback"] and "DEADLINE_EXCEEDED" in report["fallback"]
    assert report["edge_steps"] == 0 and report["device_steps"] == 6


def test_a_link_cut_mid_stream_falls_back_to_the_device(edge, tiny_packs, tmp_path, capsys):
    with DelayProxy(edge.address, cut_after_bytes=400) as link:
        report = generate(tiny_packs, tmp_path, capsys, "cut.png", "--edge", link.address, "--split", "4")
        assert link.cuts >= 1
    assert report["fallback"] and report["edge_steps"] == 0 and report["device_steps"] == 6
    with DelayProxy(edge.address) as link:  # the edge itself was never disturbed
        assert generate(tiny_packs, tmp_path, capsys, "fine.png", "--edge", link.address)["fallback"] is None


@pytest.mark.slow
def test_the_scheduler_learns_the_slow_link(tiny_packs, tmp_path, capsys):
    """The same edge reached first over a fast link, then over a slow one: after the slow images
    are reported, the scheduler's calibrated round-trip cost is above what the fast ones taught
    it (its next plans price the link in)."""

    def three_images(link_address: str, tag: str) -> None:
        for i in range(3):
            report = generate(tiny_packs, tmp_path, capsys, f"{tag}{i}.png", "--scheduler", sched.address,
                              "--edge", link_address, "--device-class", "phone")
            assert report["fallback"] is None and report["edge_steps"] > 0 and report["plan"]["reported"]

    with scheduler_service(tmp_path) as sched, edge_server(tiny_packs["large"], tmp_path) as edge:
        with DelayProxy(edge.address) as fast:
            three_images(fast.address, "fast")
        rtt_fast = metric_value(sched.metrics(), "tandem_scheduler_rtt_seconds")
        with DelayProxy(edge.address, delay_s=0.2) as slow:
            three_images(slow.address, "slow")
        rtt_slow = metric_value(sched.metrics(), "tandem_scheduler_rtt_seconds")
    assert rtt_fast > 0 and rtt_slow > rtt_fast
