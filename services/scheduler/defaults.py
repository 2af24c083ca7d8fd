"""The profiles and policy the scheduler runs with unless told otherwise, in one place for the
service, the training command and the benchmarks (no gRPC here).

The defaults are the demo pack's measured profiles: its quality profile and the cost profile
measured on it by ``python -m services.scheduler.learn.profiling`` (CPU, one thread); the measured cost
profile is the default only while the demo pack is installed, otherwise the synthetic built-in one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.quality import QualityProfile, load_or_synthetic
from tandem.packs import DEMO_PACK

ROOT = Path(__file__).resolve().parents[2]  # the directory holding services/ and tandem/
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default"
DEFAULT_QUALITY = DEMO_PACK / "quality_profile.json"
DEMO_COSTS = Path(__file__).parent / "profiles" / "demo_cpu.json"
BUILTIN = "builtin"  # the synthetic built-in cost profile
SYNTHETIC = "synthetic"  # the synthetic quality profile
MAX_FRAME = 64  # users decided together at most (--max-frame)
# Plans aim at 90% of a latency budget at most: live predictions are off by a median 7-9%, p90
# 11-21% (bench/links.py at rest), so a plan placed at the budget itself missed it in 12-38% of
# requests. A user whose own reports measure a larger margin aims lower (not both: no stacking).
BUDGET_HEADROOM = 0.1
# After the policy, 1-opt sweeps in every frame the service decides: at most 2, and at most 2 x
# MAX_FRAME user visits (a frame of 100 gets 1.28 sweeps: its decision stays within ~10 ms). A
# policy is least exact on profiles it was not trained on; the sweeps lift it to greedy + LS's
# level there (BENCHMARKS §4).
POLISH_SWEEPS = 2
POLISH_VISITS = 2 * MAX_FRAME


def display_path(path: str | Path) -> str:
    """``path`` relative to ROOT when it lies inside it (for logs, help and policy metadata)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def default_cost_profile() -> str:
    """The demo pack's measured profile when the demo pack is installed, else the built-in one."""
    return str(DEMO_COSTS) if (DEMO_PACK / "large").is_dir() and DEMO_COSTS.is_file() else BUILTIN


def load_profiles(quality_path: str | Path | None, cost_path: str | Path | None) -> tuple[QualityProfile, CostProfile]:
    """(quality, costs) from files; ``synthetic`` or a missing quality file gives the synthetic
    profile (its ``synthetic`` flag says so) and ``builtin``/empty gives the built-in cost profile."""
    quality = load_or_synthetic(None if quality_path == SYNTHETIC else quality_path)
    if cost_path is None or cost_path in ("", BUILTIN):
        return quality, CostProfile()
    return quality, CostProfile.load(cost_path)


def profile_ids(quality_path: str | Path | None, cost_path: str | Path | None) -> tuple[str, str]:
    """What a policy records about the profiles it was trained on, and the service compares with
    its own: "synthetic" / "builtin" for the built-in ones, else a digest of the file's bytes."""
    def digest(path) -> str:
        return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    real = quality_path not in (None, SYNTHETIC) and Path(quality_path).exists()
    quality = digest(quality_path) if real else SYNTHETIC
    costs = "builtin" if cost_path in (None, "", BUILTIN) else digest(cost_path)
    return quality, costs
