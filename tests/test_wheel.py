"""The installed wheel is the runtime: library and services, no demo-pack training code."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_the_runtime_and_no_training_code(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("tandem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "services/cli/generate.py" in names and "services/edge_server/engine.py" in names
    assert any(n.startswith("tandem/demo_pack/large/") for n in names)  # the embedded pack ships
    training = [n for n in names if n.startswith(("tools/", "tandem/training/"))
                or (n.endswith(".py") and n.rsplit("/", 1)[-1].startswith(("train_", "assemble_pack")))]
    assert not training
