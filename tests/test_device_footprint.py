"""What a device (UE) installs is what its process imports: diffusers, transformers and peft import
every optional package they find installed (diffusers' schedulers and transformers' losses import
scipy whenever it is there). scipy comes only with the scheduler's and tandem-onboard's extras; in
a device's environment (`tandem[ue]`, deploy/ue.Dockerfile) it is absent, and the device's import
floor is ~55 MiB lower (BENCHMARKS.md "Peer: the device's memory"). These tests keep it so."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# Imported by the device's libraries whenever installed, never used by the device (measured one
# import at a time over torch: scipy +58 MiB RSS).
NOT_ON_THE_DEVICE = ("scipy",)


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """Tandem's own requirements with `extras`, from pyproject.toml (extras naming tandem[...]
    followed), so the test reads the declared dependencies, not whatever was installed last."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if _name(requirement.name) == "tandem":
                pending += sorted(requirement.extras)
            else:
                found.append(requirement)
    return found


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution those requirements pull in, following the installed packages' metadata
    (their environment markers evaluated with no extra asked for)."""
    closure: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = _name(requirement.name)
        if name in closure:
            continue
        closure.add(name)
        for text in metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            asked = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in asked):
                pending.append(dependency)
    return closure


def test_the_device_environment_has_its_libraries_and_no_scipy():
    device = installed_closure(project_requirements(("ue",)))
    # it does pull the libraries the device runs (a closure that missed them would prove nothing)
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "grpcio"} <= device
    assert not device & set(NOT_ON_THE_DEVICE), sorted(device & set(NOT_ON_THE_DEVICE))


def test_scipy_comes_only_with_the_scheduler_and_onboard_extras():
    # the counterpart: the closure does find scipy where it is declared (via cvxpy, scikit-image)
    assert "scipy" in installed_closure(project_requirements(("scheduler",)))
    assert "scipy" not in installed_closure(project_requirements(("edge",)))
