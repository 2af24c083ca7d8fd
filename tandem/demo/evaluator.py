"""A small CNN that reads demo images back: shape, colour, position, background and style.

Used to score generated images against their prompts. Stored as `model.safetensors` +
`config.json` (no pickle):

    ev = Evaluator.load("tandem/demo_pack/evaluator")
    ev.score(images, scenes)  # {"shape": .., "color": .., "position": .., "background": ..,
                              #  "all_four": .., "style": .., "n": ..}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tandem.demo.grammar import COLORS, POSITIONS, SHAPES, STYLES, Scene

HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "position": POSITIONS,
    "background": COLORS,
    "style": STYLES,
}
CONTENT = ("shape", "color", "position", "background")  # what a prompt asks for


@dataclass(frozen=True)
class Prediction:
    """What the evaluator sees in one image (colour may equal background: it is a guess)."""

    color: str
    shape: str
    position: str
    background: str
    style: str

    def matches(self, scene: Scene) -> bool:
        """All four prompt attributes right (style is not part of a prompt)."""
        return all(getattr(self, k) == getattr(scene, k) for k in CONTENT)


class EvaluatorNet(nn.Module):
    """Four conv stages (64→32→16→8→4 px), then a shared hidden layer and one linear head per
    attribute. Flattening (not global pooling) keeps where things are: position is a label."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128), hidden: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for ch in channels:
            layers += [
                nn.Conv2d(in_ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            in_ch = ch
        self.features = nn.Sequential(*layers)
        side = 64 // 2 ** len(channels)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * side * side, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N, 3, 64, 64] in [0, 1]; returns logits per attribute."""
        h = self.hidden(self.features(x * 2.0 - 1.0))
        return {k: head(h) for k, head in self.heads.items()}


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, 64, 64, 3], or float in [0, 1] as [N, 64, 64, 3] or [N, 3, 64, 64]
    → float [N, 3, 64, 64] in [0, 1]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images))
    x = x.to(device)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.clamp(0.0, 1.0).contiguous()


class Evaluator:
    """The trained classifier plus its (de)serialization and scoring."""

    def __init__(self, net: EvaluatorNet | None = None, config: dict | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config or {"channels": [32, 64, 96, 128], "hidden": 256}
        self.net = net or EvaluatorNet(self.config["channels"], self.config["hidden"])
        self.device = torch.device(device)
        self.net.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Evaluator":
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        net = EvaluatorNet(config["channels"], config["hidden"])
        net.load_state_dict(load_file(path / "model.safetensors"))
        return cls(net, config, device)

    def save(self, path: str | Path, metrics: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, path / "model.safetensors")
        config = {"_class_name": "TandemEvaluator", **self.config,
                  "heads": {k: list(v) for k, v in HEADS.items()}}
        if metrics is not None:
            config["metrics"] = metrics
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def logits(self, images: np.ndarray | torch.Tensor,
               batch: int = 512) -> dict[str, torch.Tensor]:
        x = to_input(images, self.device)
        parts = [self.net(x[i:i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([p[k] for p in parts]).float().cpu() for k in HEADS}

    def predict(self, images: np.ndarray | torch.Tensor) -> list[Prediction]:
        labels = {k: v.argmax(1).tolist() for k, v in self.logits(images).items()}
        return [
            Prediction(**{k: HEADS[k][labels[k][i]] for k in HEADS})
            for i in range(len(labels["shape"]))
        ]

    def accuracy(self, images: np.ndarray | torch.Tensor, scenes: Sequence[Scene]) -> float:
        """Share of images with all four prompt attributes *and* the scene's style right (the
        demo quality profile's measure)."""
        predictions = self.predict(images)
        if len(predictions) != len(scenes):
            raise ValueError(f"{len(predictions)} images but {len(scenes)} scenes")
        return sum(p.matches(s) and p.style == s.style for p, s in zip(predictions, scenes)) / max(1, len(scenes))

    def score(self, images: np.ndarray | torch.Tensor, scenes: Sequence[Scene]) -> dict[str, float]:
        """Per-attribute accuracy, `all_four` (shape, colour, position and background all
        right) and `style` accuracy against each scene's style."""
        predictions = self.predict(images)
        if len(predictions) != len(scenes):
            raise ValueError(f"{len(predictions)} images but {len(scenes)} scenes")
        n = max(1, len(scenes))
        result = {
            k: sum(getattr(p, k) == getattr(s, k) for p, s in zip(predictions, scenes)) / n
            for k in HEADS
        }
        result["all_four"] = sum(p.matches(s) for p, s in zip(predictions, scenes)) / n
        result["n"] = len(scenes)
        return result
