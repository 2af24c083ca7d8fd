"""The long-running device service, driven by the CLI, with and without an edge server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from service_procs import device_service, edge_server, free_port, metric_value

from services.cli import generate as cli
from tandem.handoff import CodecSpec
from tandem.pipeline import HybridPipeline
from tandem.request import GenerationRequest


@pytest.mark.slow
def test_cli_through_device_service_and_edge(tiny_packs, tmp_path, capsys, large_pack, small_pack):
    with edge_server(tiny_packs["large"], tmp_path) as edge, \
            device_service(tiny_packs["small"], tmp_path, "--edge", edge.address) as ue:
        out = tmp_path / "x.png"
        argv = ["generate", "a red circle at the left on a blue background", "--out", str(out), "--ue", ue.address,
                "--edge", edge.address, "--steps", "6", "--split", "4", "--codec", "fp32", "--seed", "9",
                "--guidance", "3", "--json", "--quiet"]
        assert cli.main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["mode"] == "device-service" and report["fallback"] is None
        assert report["edge_steps"] == 4 and report["device_steps"] == 2 and report["handoff_bytes"] > 0
        request = GenerationRequest("a red circle at the left on a blue background", steps=6, split=4, seed=9,
                                    guidance_scale=3.0, height=32, width=32)
        expected = HybridPipeline(large_pack, small_pack).generate(request, CodecSpec("fp32")).image
        # The service is another process with other CPU thread counts: equal up to float rounding.
        assert np.abs(np.asarray(Image.open(out)).astype(int) - expected.astype(int)).max() <= 1

        # Edge gone: the device service finishes alone and says so.
        edge.proc.kill()
        edge.proc.wait()
        assert cli.main(argv) == 0
        captured = capsys.readouterr()
        report = json.loads(captured.out)
        assert report["fallback"] and report["edge_steps"] == 0 and report["device_steps"] == 6
        assert "NOTE: edge failed" in captured.err

        # Bad values come back as one line naming the field: the CLI's own check, and the
        # device service's (an edge it is not configured with).
        assert cli.main(argv[:-2] + ["--split", "9", "--quiet"]) == 2
        assert "tandem: error: --split: must be in 0..steps (6)" in capsys.readouterr().err
        unknown_edge = argv[:argv.index("--edge") + 1] + ["127.0.0.1:1"] + argv[argv.index("--edge") + 2:]
        assert cli.main(unknown_edge) == 2
        assert "tandem: error: edge_address: '127.0.0.1:1' is not an edge this device service" in capsys.readouterr().err

        text = ue.metrics()
        assert metric_value(text, "tandem_ue_requests_total", 'code="OK"') == 2
        assert metric_value(text, "tandem_ue_requests_total", 'code="INVALID_ARGUMENT"') == 1
        assert metric_value(text, "tandem_ue_fallbacks_total") == 1
        assert metric_value(text, "tandem_ue_steps_total") == 2 + 6


@pytest.mark.slow
def test_device_service_reconnects_to_a_restarted_edge(tiny_packs, tmp_path, capsys):
    """The edge goes down and comes back on the same address: while it is down the device finishes
    alone (and says so); once it is back the next request uses it again, no restart of the device."""
    port = free_port()
    argv = ["generate", "a red circle at the left on a blue background", "--steps", "4", "--split", "2",
            "--json", "--quiet"]

    def generate(ue, name):
        assert cli.main(argv + ["--ue", ue.address, "--out", str(tmp_path / name)]) == 0
        return json.loads(capsys.readouterr().out)

    with device_service(tiny_packs["small"], tmp_path, "--edge", f"127.0.0.1:{port}") as ue:
        with edge_server(tiny_packs["large"], tmp_path, port=port):
            assert generate(ue, "before.png")["fallback"] is None
        down = generate(ue, "down.png")  # edge stopped (SIGTERM, drained)
        assert down["fallback"] and down["edge_steps"] == 0
        with edge_server(tiny_packs["large"], tmp_path, port=port):
            again = generate(ue, "after.png")
        assert again["fallback"] is None and again["edge_steps"] == 2


def test_the_device_service_answers_health_while_its_pack_loads(tiny_packs, tmp_path):
    """Listening comes first: health says NOT_SERVING (and Generate UNAVAILABLE) until the pack
    is loaded, then SERVING; a deployment's probe never sees a closed port during a long load."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from service_procs import ROOT, free_port

    port = free_port()
    slow = ("import time, tandem.packs as p; load = p.load_pack; "
            "p.load_pack = lambda *a, **k: (time.sleep(3), load(*a, **k))[1]; "
            "import services.ue_client.server as s; s.load_pack = p.load_pack; "
            f"raise SystemExit(s.main(['--pack', {str(tiny_packs['small'])!r}, '--device', 'cpu', "
            f"'--port', '{port}', '--metrics-port', '0']))")
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    deadline = time.monotonic() + 120  # a generous bound: a loaded CI machine imports slowly
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-2000:]
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.DeviceService"), timeout=1).status
                except grpc.RpcError:
                    status = None  # not listening yet
                if status is not None and (not seen or seen[-1] != status):
                    seen.append(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
