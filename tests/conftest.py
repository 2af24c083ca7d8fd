"""Shared fixtures: tiny random packs built offline once per test session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

# Two cores here: a serial run's torch gets both, each of scripts/test.sh's two pytest-xdist workers one.
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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


# --- scripts/test.sh's two workers (pytest-xdist, --dist loadscope) ------------------------------
# The unit of work a worker takes: a whole file where the file has a module- or class-scoped
# fixture (a server started once for the file, say: set up once, on one worker), else one test.
# (xdist's own --dist loadgroup would do this with xdist_group marks, but it cannot rename node ids
# under pytest 9.2, so its groups are ignored.)

SHARED_FIXTURE_FILES = frozenset(
    f"tests/{path.name}" for path in Path(__file__).parent.glob("test_*.py")
    if re.search(r"""scope\s*=\s*["'](module|class|package)["']""", path.read_text()))


def work_unit(nodeid: str) -> str:
    file = nodeid.split("::")[0]
    return file if file in SHARED_FIXTURE_FILES else nodeid


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is not installed: one process
    LoadScopeScheduling = None


if LoadScopeScheduling is not None:
    class FileOrTestScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(config, log):
        return FileOrTestScheduling(config, log) if config.getvalue("dist") == "loadscope" else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: the units holding a test marked slow first (the rest as collected), so
    that with --no-loadscope-reorder no long one is handed out last."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    slow = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: work_unit(item.nodeid) not in slow)  # stable
