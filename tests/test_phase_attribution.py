"""The device's own prompt encoding is device work, never link time: over gRPC, a device whose
text encoder is slow reports it under device_steps, and the scheduler's calibrated round trip
(the link model) does not absorb it."""

from __future__ import annotations

import json
import time

import pytest
from service_procs import edge_server, metric_value, scheduler_service

import tandem.pipeline
from services.cli import generate as cli

PROMPT = "a red circle at the left on a blue background"
SLOW_ENCODER_S = 1.0


def generate(tiny_packs, tmp_path, capsys, name: str, *args: str) -> dict:
    argv = ["generate", PROMPT, "--small", str(tiny_packs["small"]), "--device", "cpu", "--steps", "6",
            "--out", str(tmp_path / name), "--json", "--quiet", *args]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_a_slow_device_text_encoder_is_device_time_and_leaves_the_link_model_alone(tiny_packs, tmp_path, capsys,
                                                                                   monkeypatch):
    encode = tandem.pipeline.encode_prompt

    def slow_encode(pack, *args, **kwargs):  # only this process (the device) is slowed, not the edge
        time.sleep(SLOW_ENCODER_S)
        return encode(pack, *args, **kwargs)

    with scheduler_service(tmp_path) as sched, edge_server(tiny_packs["large"], tmp_path) as edge:
        monkeypatch.setattr(tandem.pipeline, "encode_prompt", slow_encode)
        reports = [generate(tiny_packs, tmp_path, capsys, f"slow{i}.png", "--scheduler", sched.address,
                            "--edge", edge.address, "--device-class", "phone") for i in range(3)]
        rtt = metric_value(sched.metrics(), "tandem_scheduler_rtt_seconds")
    for report in reports:
        assert report["fallback"] is None and report["edge_steps"] > 0 and report["plan"]["reported"]
        assert report["seconds"]["device_steps"] >= SLOW_ENCODER_S
        assert report["seconds"]["transfer"] < SLOW_ENCODER_S
    # Before the fix, each report put the encoder's second into the transfer phase and the trimmed
    # mean of (prior, prior, 1 s, 1 s, 1 s) would sit near 0.7 s.
    assert rtt < SLOW_ENCODER_S / 2, f"calibrated RTT {rtt:.3f} s took in the device's text encoding"
