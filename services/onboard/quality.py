"""A quality profile for any pack pair, measured through Tandem's own split stages.

For every option (T, k/T, merge ratio r) and user, `--n` fixed-seed prompts go through the stages
the services run (start, batched steps on the large pack up to k, the handoff encoded and decoded
with the codec, resume on the small pack with the user's LoRA, steps up to T, VAE decode), and
each image is scored by its fidelity (SSIM) to a reference image of the same prompt and seed:

* base users: the large pack alone at the largest T of the grid (the best image the pair makes),
  so fewer steps, fewer edge steps and harder merging all cost fidelity;
* a LoRA user: the small pack with the user's LoRA alone at the largest T (their style lives in the
  LoRA, which runs only on the device).

Where the pack ships an evaluator (services/onboard/evaluator.py), a point's accuracy is the
evaluator's instead (its SSIM is still recorded).

Each other codec of `codecs` (default int8) is measured at every handoff option (k > 0, r = 0) for
the base user; the profile's `codec_loss` is its mean loss against `encoding`'s points, which is
how the scheduler prices choosing it.

Points are appended to a JSON-lines file as they are measured, so an interrupted run resumes where
it stopped; the profile is written in the scheduler's format (services/scheduler/decide/quality.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.onboard.fidelity import psnr, ssim
from services.scheduler.decide.options import split_for
from services.scheduler.decide.quality import BASE_USER
from tandem.handoff import CodecSpec, decode_handoff, encode_handoff
from tandem.packs import ModelPack
from tandem.pipeline import decode_in_batches, make_handoff, resume, run_in_batches, start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import DenoiseState


@dataclass(frozen=True)
class QualityGrid:
    steps: tuple[int, ...]
    fractions: tuple[float, ...]
    ratios: tuple[float, ...]
    n_prompts: int
    seed: int = 0
    encoding: str = "fp16"
    batch: int = 8
    codecs: tuple[str, ...] = ("int8",)  # measured beside `encoding` to price them (codec_loss)

    @property
    def reference_steps(self) -> int:
        return max(self.steps)

    def splits(self, steps: int) -> list[int]:
        return sorted({split_for(steps, f) for f in self.fractions})

    def size(self, users: int) -> int:
        """Points to measure: k = 0 sends nothing, so it has one point per user, not one per r."""
        per_split = users * len(self.ratios) + len(self.codecs)
        return sum(per_split if k > 0 else users for t in self.steps for k in self.splits(t))


FULL_GRID = QualityGrid(steps=(10, 20), fractions=(0.0, 0.25, 0.5, 0.75, 1.0), ratios=(0.0, 0.25, 0.5, 0.75),
                        n_prompts=16)
QUICK_GRID = QualityGrid(steps=(4,), fractions=(0.0, 0.5, 1.0), ratios=(0.0, 0.5), n_prompts=2)


@dataclass(frozen=True)
class QualityPointResult:
    steps: int
    split: int
    merge_ratio: float
    user: str
    ssim: float
    psnr_db: float
    accuracy: float | None = None  # the pack's evaluator, where it ships one
    codec: str = "fp16"  # the handoff's encoding

    @property
    def key(self) -> PointKey:
        return (self.steps, self.split, self.merge_ratio, self.user, self.codec)

    @property
    def value(self) -> float:
        """What the profile records: the evaluator's accuracy, else the SSIM fidelity."""
        return self.ssim if self.accuracy is None else self.accuracy


PointKey = tuple[int, int, float, str, str]


class PointStore:
    """Measured points, one JSON object per line; reading it back is how a run resumes."""

    def __init__(self, path: Path):
        self.path = path
        self.points: dict[PointKey, QualityPointResult] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    p = QualityPointResult(**json.loads(line))
                    self.points[p.key] = p

    def __contains__(self, key: PointKey) -> bool:
        return key in self.points

    def add(self, point: QualityPointResult) -> None:
        self.points[point.key] = point
        with self.path.open("a") as f:
            record = {**point.__dict__, "psnr_db": point.psnr_db if math.isfinite(point.psnr_db) else 99.0}
            f.write(json.dumps(record) + "\n")


class QualityMeasurer:
    def __init__(self, large: ModelPack, small: ModelPack, prompts: list[str], grid: QualityGrid,
                 guidance: float, sampler: str, scorer: Callable[[np.ndarray, str], float] | None = None):
        """``scorer(images, user)``: the pack's own quality measure (an evaluator), if it has one."""
        self.large, self.small, self.prompts, self.grid = large, small, prompts, grid
        self.guidance, self.sampler, self.scorer = guidance, sampler, scorer
        self._references: dict[str, np.ndarray] = {}

    def _requests(self, steps: int, split: int, user: str) -> list[GenerationRequest]:
        size = self.large.default_image_size
        return [GenerationRequest(prompt=p, steps=steps, split=split, sampler=self.sampler,
                                  guidance_scale=self.guidance, seed=self.grid.seed + i, height=size, width=size,
                                  user=None if user == BASE_USER else user).validate()
                for i, p in enumerate(self.prompts)]

    def reference(self, user: str) -> np.ndarray:
        """The images a point of `user` is compared with (computed once)."""
        if user not in self._references:
            t = self.grid.reference_steps
            if user == BASE_USER:
                states = [start(self.large, r) for r in self._requests(t, t, user)]
                run_in_batches(self.large, states, t, self.grid.batch)
                self._references[user] = decode_in_batches(self.large, states, self.grid.batch)
            else:
                self.small.use_user(user)
                states = [start(self.small, r) for r in self._requests(t, 0, user)]
                run_in_batches(self.small, states, t, self.grid.batch)
                self._references[user] = decode_in_batches(self.small, states, self.grid.batch)
        return self._references[user]

    def edge_states(self, steps: int, split: int) -> list[DenoiseState]:
        states = [start(self.large, r) for r in self._requests(steps, split, BASE_USER)]
        run_in_batches(self.large, states, split, self.grid.batch)
        return states

    def finish(self, steps: int, split: int, edge: list[DenoiseState] | None, ratio: float,
               user: str, codec: str | None = None) -> QualityPointResult:
        requests = self._requests(steps, split, user)
        self.small.use_user(None if user == BASE_USER else user)
        if edge is None:  # k = 0: all on the device, nothing on the wire
            states = [start(self.small, r) for r in requests]
        else:
            spec = CodecSpec(codec or self.grid.encoding, ratio).validate()
            states = [resume(self.small, decode_handoff(encode_handoff(make_handoff(e, r), spec), r, e.schedule))
                      for e, r in zip(edge, requests)]
        run_in_batches(self.small, states, steps, self.grid.batch)
        images, reference = decode_in_batches(self.small, states, self.grid.batch), self.reference(user)
        return QualityPointResult(steps, split, ratio, user,
                                  float(np.mean([ssim(a, b) for a, b in zip(images, reference)])),
                                  float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(images, reference)])),
                                  self.scorer(images, user) if self.scorer else None, codec or self.grid.encoding)


def measure(m: QualityMeasurer, users: list[str], store: PointStore,
            on_point: Callable[[QualityPointResult | None], None] = lambda _: None) -> None:
    """Measures every point of the grid that `store` does not hold yet (`on_point(None)` for a
    point already held, so a progress bar counts it)."""
    for steps in m.grid.steps:
        for split in m.grid.splits(steps):
            todo = [(u, r, m.grid.encoding) for u in users for r in (m.grid.ratios if split > 0 else (0.0,))]
            todo += [(BASE_USER, 0.0, c) for c in m.grid.codecs] if split > 0 else []
            missing = [(u, r, c) for u, r, c in todo if (steps, split, r, u, c) not in store]
            for _ in range(len(todo) - len(missing)):
                on_point(None)
            if not missing:
                continue
            edge = m.edge_states(steps, split) if split > 0 else None
            for user, ratio, codec in missing:
                point = m.finish(steps, split, edge, ratio, user, codec)
                store.add(point)
                on_point(point)


def _points(store: PointStore, grid: QualityGrid, user: str) -> Iterator[dict[str, Any]]:
    for p in sorted(store.points.values(), key=lambda p: p.key):
        if p.user != user or p.steps not in grid.steps or p.codec != grid.encoding:
            continue
        # k = 0 sends nothing: its score stands for every merge ratio of the grid.
        for ratio in grid.ratios if p.split == 0 else (p.merge_ratio,):
            yield {"steps": p.steps, "split_fraction": round(p.split / p.steps, 6), "merge_ratio": ratio,
                   "accuracy": round(p.value, 4)}


def codec_loss(store: PointStore, grid: QualityGrid) -> dict[str, float]:
    """Per measured codec: the mean accuracy lost against `grid.encoding` at the same options
    (never below 0: a codec is not priced as better than the one the profile is measured with)."""
    out = {}
    for codec in grid.codecs:
        pairs = [(base.value, p.value) for p in store.points.values()
                 if p.codec == codec and p.steps in grid.steps
                 and (base := store.points.get((p.steps, p.split, p.merge_ratio, p.user, grid.encoding)))]
        if pairs:
            out[codec] = round(max(0.0, float(np.mean([b - c for b, c in pairs]))), 5)
    return out


def profile_json(store: PointStore, grid: QualityGrid, pair: str, users: list[str],
                 metric: str | None = None) -> dict[str, Any]:
    """``metric``: what the points' accuracy is (default: the SSIM fidelity)."""
    return {
        "synthetic": False,
        "metric": metric or (f"fidelity (SSIM, pixel space) to the large pack's image at T={grid.reference_steps} "
                             f"(LoRA users: the small pack + LoRA alone), {grid.n_prompts} prompts, codec {grid.encoding}"),
        "pairs": {pair: {"users": {u: {"points": list(_points(store, grid, u))} for u in users}}},
        **({"codec_loss": loss} if (loss := codec_loss(store, grid)) else {}),
    }
