"""Where a pack pair ships an evaluator (the demo pack: ``tandem/demo_pack/evaluator``, next to its
``large/`` and ``small/``), onboarding scores quality with it instead of fidelity: the share of
images with every attribute of the prompt and the user's style right, on prompts drawn from the
demo world, as the demo pack's own quality profile is measured (tools/demo_pack/quality_profile.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

EVALUATOR_DIR = "evaluator"
EVALUATOR_FILES = ("config.json", "model.safetensors")
SCENES_SEED = 20261123  # the demo quality profile's prompt draw


def is_evaluator(path: Path) -> bool:
    return all((path / name).is_file() for name in EVALUATOR_FILES)


def find_evaluator(large: Path) -> Path | None:
    """The evaluator shipped with the large pack: inside it, or beside it (the demo pack's layout)."""
    for candidate in (large / EVALUATOR_DIR, large.resolve().parent / EVALUATOR_DIR):
        if is_evaluator(candidate):
            return candidate
    return None


class EvaluatorScore:
    """Scores a point's images: accuracy of the pack's evaluator against the scenes behind the prompts."""

    def __init__(self, path: Path, n_prompts: int, device=None) -> None:
        from tandem.demo.evaluator import Evaluator
        from tandem.demo.world import sample_scenes

        self.path = path
        self.evaluator = Evaluator.load(path, device or "cpu")
        self.scenes = sample_scenes(n_prompts, SCENES_SEED, "filled")

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.scenes]

    def __call__(self, images: np.ndarray, user: str) -> float:
        from tandem.demo.grammar import USER_STYLES

        style = USER_STYLES.get(user, "filled")  # the base model draws filled shapes
        return float(self.evaluator.accuracy(images, [replace(s, style=style) for s in self.scenes]))

    def metric(self, n_prompts: int, encoding: str) -> str:
        return (f"evaluator accuracy ({self.path.name}): all four attributes and the user's style right, "
                f"{n_prompts} prompts, codec {encoding} (tandem-onboard)")
