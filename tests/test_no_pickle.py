"""Weights, LoRAs, policies and checkpoints load through safetensors/JSON only: a pickle is code.
This scans the project's own sources for every way of reading one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tandem.packs import PackError, load_pack

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for top in ("tandem", "services", "tools", "bench", "scripts") for p in (ROOT / top).rglob("*.py")
           if "/v1/" not in p.as_posix()]  # generated protobuf code
FORBIDDEN = {
    "pickle module": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M),
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "numpy pickles": re.compile(r"allow_pickle\s*=\s*True"),
    "stable-baselines3 zip (pickled)": re.compile(r"\b(PPO|MaskablePPO|BaseAlgorithm)\.load\s*\("),
    "non-safetensors weights": re.compile(r"use_safetensors\s*=\s*False"),
}


def test_the_scan_sees_the_sources():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"tandem/packs.py", "services/scheduler/decide/policy.py", "tools/demo_pack/trainer.py"} <= names


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_source_reads_a_pickle(what):
    pattern = FORBIDDEN[what]
    hits = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            for p in SOURCES for text in [p.read_text()] for m in pattern.finditer(text)]
    assert not hits, f"{what} in {hits}"


def test_the_patterns_catch_what_they_should():
    assert FORBIDDEN["pickle module"].search("import pickle\n") and FORBIDDEN["pickle module"].search("from dill import x")
    assert FORBIDDEN["torch.load"].search("state = torch.load(path)")
    assert not FORBIDDEN["torch.load"].search("torch.loads_nothing")


def test_pack_loading_asks_for_safetensors_only():
    text = (ROOT / "tandem" / "packs.py").read_text()
    # unet, vae and text encoder each load with it, and the LoRA adapters too
    assert text.count("use_safetensors=True") >= 4


def test_a_lora_that_is_not_safetensors_is_refused(tiny_packs, tmp_path):
    small = load_pack(tiny_packs["small"], device="cpu")
    user = "mallory"
    pickled = tmp_path / "lora.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    small.manifest.users[user] = str(pickled)  # as if the manifest pointed at a pickle
    with pytest.raises(PackError, match="must be a .safetensors file"):
        small.use_user(user)
