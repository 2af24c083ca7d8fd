"""The container health probe against a real edge server process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from service_procs import ROOT, edge_server, free_port

from services.cli import healthcheck


def test_probe_says_serving_only_for_a_serving_service(tiny_packs, tmp_path, capsys):
    with edge_server(tiny_packs["large"], tmp_path) as edge:
        assert healthcheck.main([edge.address]) == 0
        assert capsys.readouterr().out.strip() == f"SERVING: {edge.address}"
        assert healthcheck.main([edge.address, "tandem.v1.EdgeService", "--timeout", "2"]) == 0
        assert capsys.readouterr().out.startswith("SERVING: ")

        assert healthcheck.main([edge.address, "tandem.v1.NoSuchService"]) == 1
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith("UNKNOWN_SERVICE: ") and "NoSuchService" in out[0]

        # The way a HEALTHCHECK runs it: a fresh interpreter, judged by its exit status.
        probe = [sys.executable, "-m", "services.cli.healthcheck", edge.address, "tandem.v1.EdgeService"]
        done = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("SERVING: "), done.stdout + done.stderr


def test_probe_fails_with_one_line_when_nothing_listens(capsys):
    address = f"127.0.0.1:{free_port()}"
    assert healthcheck.main([address, "--timeout", "1"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(("UNAVAILABLE: ", "DEADLINE_EXCEEDED: ")) and address in out[0]


def test_probe_rejects_bad_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        healthcheck.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        healthcheck.main(["127.0.0.1:1", "--timeout", "0"])
    assert exc.value.code == 2 and "--timeout" in capsys.readouterr().err
