"""Shared fixtures: tiny random packs built offline once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_packs(tmp_path_factory) -> dict[str, Path]:
    """A large/small pair sharing VAE, text encoder, tokenizer and sampler config."""
    from tandem.tiny_pack import build_tiny_pack

    root = tmp_path_factory.mktemp("packs")
    large = build_tiny_pack(root / "large", seed=1, unet_channels=(32, 64), role="large")
    small = build_tiny_pack(root / "small", seed=2, unet_channels=(16, 32), role="small", shared_from="../large")
    return {"large": large, "small": small, "root": root}


@pytest.fixture(scope="session")
def large_pack(tiny_packs):
    from tandem.packs import load_pack

    return load_pack(tiny_packs["large"], device="cpu")


@pytest.fixture(scope="session")
def small_pack(tiny_packs):
    from tandem.packs import load_pack

    return load_pack(tiny_packs["small"], device="cpu")


@pytest.fixture(autouse=True)
def _link_state(tmp_path_factory, monkeypatch):
    """The CLI keeps the link it measured in $TANDEM_LINK_STATE: every test its own file, never the
    user's cache, so no test plans with a link another test measured."""
    monkeypatch.setenv("TANDEM_LINK_STATE", str(tmp_path_factory.mktemp("link-state") / "links.json"))
