"""The training data: generator images rendered once per run into an on-device bank, and every
grammar prompt's token ids, looked up by scene.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from tandem.demo.grammar import COLORS, POSITIONS, SHAPES, Scene
from tandem.demo.world import SceneArrays, render_arrays, sample_arrays


@dataclass
class Bank:
    """Images rendered once per run, kept on the device; `scenes` as index arrays."""

    images: torch.Tensor  # uint8 [N, 64, 64, 3]
    scenes: SceneArrays

    def __len__(self) -> int:
        return len(self.images)


def render_bank(
    n: int, seed: int, style: str | None, device: torch.device, chunk: int = 1024
) -> Bank:
    """`n` generator images, rendered in parallel chunks (each seeded by its index, so the
    result does not depend on the number of threads)."""

    def render_chunk(i: int) -> tuple[np.ndarray, SceneArrays]:
        arrays = sample_arrays(min(chunk, n - i * chunk), np.random.default_rng([seed, i]), style)
        return render_arrays(arrays), arrays

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = list(pool.map(render_chunk, range(math.ceil(n / chunk))))
    scenes = SceneArrays(**{
        f.name: np.concatenate([getattr(p[1], f.name) for p in parts]) for f in fields(SceneArrays)
    })
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(device)
    return Bank(images, scenes)


def to_model_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class PromptTable:
    """Token ids of every grammar prompt, looked up by scene indices on the device
    (tokenizing strings every step would dominate these tiny models' step time)."""

    def __init__(self, tokenizer: Any, device: torch.device) -> None:
        self.shape = (len(COLORS), len(SHAPES), len(POSITIONS), len(COLORS))
        prompts = []
        for c, s, p, b in np.ndindex(*self.shape):
            # Rows for colour == background are never looked up; any valid prompt fills them.
            bg = b if b != c else (c + 1) % len(COLORS)
            prompts.append(Scene(COLORS[c], SHAPES[s], POSITIONS[p], COLORS[bg]).prompt)
        self.ids = self._tokenize(tokenizer, prompts).to(device)
        self.empty = self._tokenize(tokenizer, [""]).to(device)[0]

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        # Exactly as StableDiffusionPipeline encodes prompts (padded to max length, no mask).
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    def index(self, scenes: SceneArrays) -> torch.Tensor:
        """A flat prompt index per scene (int64, CPU); map with `.to(device)` once per bank."""
        flat = np.ravel_multi_index(
            (scenes.color, scenes.shape, scenes.position, scenes.background), self.shape)
        return torch.from_numpy(flat.astype(np.int64))

    def lookup(self, prompt_index: torch.Tensor, drop_prob: float,
               generator: torch.Generator) -> torch.Tensor:
        """Token ids [B, L]; each prompt replaced by "" with `drop_prob` (classifier-free
        guidance needs the unconditional prediction)."""
        ids = self.ids[prompt_index]
        drop = torch.rand(len(ids), device=ids.device, generator=generator) < drop_prob
        return torch.where(drop[:, None], self.empty[None, :], ids)
