"""The wire contract: generated code matches proto/, and the protos are buf-lint clean."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_generated_code_is_up_to_date(tmp_path):
    from gen_proto import generate

    fresh = generate(tmp_path)
    committed = ROOT / "tandem" / "v1"
    assert {p.name for p in fresh} == {p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi")}
    stale = [p.name for p in fresh if not filecmp.cmp(p, committed / p.name, shallow=False)]
    assert not stale, f"regenerate with scripts/gen_proto.py: {stale} differ from proto/"


def test_protos_are_buf_lint_clean():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.skip("buf is not installed (pip install buf-bin, part of the dev extra)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
