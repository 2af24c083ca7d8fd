"""Quality of a pack pair through Tandem's own split pipeline: the quality table and the
machine-readable quality profile the scheduler reads.

    python -m tools.demo_pack.quality_profile tandem/demo_pack [--n 200] [--table T.md]
        [--profile tandem/demo_pack/quality_profile.json] [--json R.json]

For every total step count T, split fraction k/T (k steps on the large UNet, T - k on the small
one), merge ratio r and user (base = no LoRA), it generates `--n` fixed-seed prompts with the
same stages the services run (start, batched `advance`, handoff encoded and decoded with the
codec, resume on the small pack with the user's LoRA, VAE decode) and scores the images with the
pack's evaluator. A point's `accuracy` is the share of images with shape, colour, position,
background *and* the user's style right (base users expect filled shapes).

The edge trajectory of a (T, k) is computed once and handed to every (r, user) from the same
state, so the table's columns differ only by what they are meant to differ by.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.scheduler.decide.options import split_for
from services.scheduler.decide.quality import BASE_USER
from tandem.demo.evaluator import Evaluator
from tandem.demo.grammar import USER_STYLES, Scene
from tandem.demo.world import sample_scenes
from tandem.handoff import DEFAULT_STRATEGY, CodecSpec, decode_handoff, encode_handoff
from tandem.packs import ModelPack, check_pair, load_pack
from tandem.pipeline import decode_in_batches, make_handoff, resume, run_in_batches, start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import DenoiseState


@dataclass(frozen=True)
class Point:
    steps: int
    edge_steps: int
    merge_ratio: float
    user: str
    strategy: str
    scores: dict[str, float]  # per attribute, all_four, style, accuracy

    @property
    def split_fraction(self) -> float:
        return self.edge_steps / self.steps


def _score(evaluator: Evaluator, images: np.ndarray, scenes: list[Scene], user: str) -> dict[str, float]:
    style = USER_STYLES.get(user, "filled")
    styled = [dataclasses.replace(s, style=style) for s in scenes]
    scores = evaluator.score(images, styled)
    scores["accuracy"] = evaluator.accuracy(images, styled)
    return scores


class Measurer:
    def __init__(self, large: ModelPack, small: ModelPack, evaluator: Evaluator, scenes: list[Scene], *,
                 seed: int, guidance: float, encoding: str, batch: int):
        check_pair(large, small)
        self.large, self.small, self.evaluator, self.scenes = large, small, evaluator, scenes
        self.seed, self.guidance, self.encoding, self.batch = seed, guidance, encoding, batch

    def requests(self, steps: int, edge_steps: int, user: str) -> list[GenerationRequest]:
        return [
            GenerationRequest(prompt=s.prompt, steps=steps, split=edge_steps, guidance_scale=self.guidance,
                              seed=self.seed + i, user=None if user == BASE_USER else user).validate()
            for i, s in enumerate(self.scenes)
        ]

    def edge_states(self, steps: int, edge_steps: int) -> list[DenoiseState]:
        states = [start(self.large, r) for r in self.requests(steps, edge_steps, BASE_USER)]
        run_in_batches(self.large, states, edge_steps, self.batch)
        return states

    def finish(self, steps: int, edge_states: list[DenoiseState] | None, edge_steps: int, ratio: float,
               user: str, strategy: str) -> dict[str, float]:
        requests = self.requests(steps, edge_steps, user)
        self.small.use_user(None if user == BASE_USER else user)
        if edge_states is None:  # k = 0: everything on the device, nothing on the wire
            states = [start(self.small, r) for r in requests]
        else:
            spec = CodecSpec(self.encoding, ratio, strategy).validate()
            states = [resume(self.small, decode_handoff(encode_handoff(make_handoff(e, r), spec), r, e.schedule))
                      for e, r in zip(edge_states, requests)]
        run_in_batches(self.small, states, steps, self.batch)
        return _score(self.evaluator, decode_in_batches(self.small, states, self.batch), self.scenes, user)


def measure(m: Measurer, *, steps_list: list[int], fractions: list[float], ratios: list[float],
            users: list[str], strategies: list[str], log=print) -> list[Point]:
    points: list[Point] = []
    for steps in steps_list:
        for k in sorted({split_for(steps, f) for f in fractions}):
            started = time.perf_counter()
            edge = m.edge_states(steps, k) if k > 0 else None
            for user in users:
                for strategy in strategies if k > 0 else strategies[:1]:
                    for ratio in ratios if k > 0 else [0.0]:
                        scores = m.finish(steps, edge, k, ratio, user, strategy)
                        points.append(Point(steps, k, ratio, user, strategy, scores))
            log(f"T={steps} k={k}: {len(users)} users done in {time.perf_counter() - started:.1f} s "
                f"(base accuracy at r=0: {_find(points, steps, k, 0.0, BASE_USER, strategies[0]):.3f})"
                if BASE_USER in users else f"T={steps} k={k} done")
    return points


def _find(points: list[Point], steps: int, k: int, ratio: float, user: str, strategy: str) -> float:
    for p in points:
        if (p.steps, p.edge_steps, p.merge_ratio, p.user, p.strategy) == (steps, k, ratio, user, strategy):
            return p.scores["accuracy"]
    return float("nan")


def profile_json(points: list[Point], pair: str, strategy: str, ratios: list[float], n: int) -> dict[str, Any]:
    """The scheduler's quality-profile format (services/scheduler/decide/quality.py). k = 0 sends
    nothing, so its accuracy stands for every merge ratio."""
    users: dict[str, Any] = {}
    for p in points:
        if p.strategy != strategy:
            continue
        for r in ratios if p.edge_steps == 0 else [p.merge_ratio]:
            users.setdefault(p.user, {"points": []})["points"].append(
                {"steps": p.steps, "split_fraction": round(p.split_fraction, 6), "merge_ratio": r,
                 "accuracy": round(p.scores["accuracy"], 4)})
    return {"synthetic": False,
            "metric": f"evaluator: all four attributes and the user's style right, {n} prompts, "
                      f"merge strategy {strategy!r}",
            "pairs": {pair: {"users": users}}}


def table_markdown(points: list[Point], steps: int, strategy: str, n: int) -> str:
    """The quality table at T = `steps`, r = 0: one row per (user, k)."""
    rows = sorted((p for p in points if p.steps == steps and p.merge_ratio == 0 and p.strategy == strategy),
                  key=lambda p: (p.user != BASE_USER, p.user, -p.edge_steps))
    lines = [f"{n} fixed-seed prompts, T = {steps}, DPM-Solver++(2M), merge ratio 0.",
             "",
             "| user | edge steps k (large) | device steps (small) | all four | shape | color | position | "
             "background | style | all four + style |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        s = p.scores
        lines.append(f"| {p.user} | {p.edge_steps} | {p.steps - p.edge_steps} | {s['all_four']:.3f} | "
                     f"{s['shape']:.3f} | {s['color']:.3f} | {s['position']:.3f} | {s['background']:.3f} | "
                     f"{s['style']:.3f} | {s['accuracy']:.3f} |")
    return "\n".join(lines)


def merge_table_markdown(points: list[Point], steps: int, n: int) -> str:
    """Accuracy by merge ratio and strategy (base user) at T = `steps`."""
    rows = sorted((p for p in points if p.steps == steps and p.user == BASE_USER and 0 < p.edge_steps),
                  key=lambda p: (p.edge_steps, p.strategy, p.merge_ratio))
    lines = [f"Base user, {n} prompts, T = {steps}: all-four accuracy by merge ratio and strategy.", "",
             "| k | strategy | merge ratio | all four | style |", "|---|---|---|---|---|"]
    for p in rows:
        lines.append(f"| {p.edge_steps} | {p.strategy} | {p.merge_ratio:g} | {p.scores['all_four']:.3f} | "
                     f"{p.scores['style']:.3f} |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack", type=Path, help="a demo pack directory (large/, small/, evaluator/)")
    parser.add_argument("--n", type=int, default=200, help="prompts per point")
    parser.add_argument("--steps", default="10,15,20,25", help="total step counts T")
    parser.add_argument("--fractions", default="0,0.25,0.5,0.75,1", help="split fractions k/T")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75", help="merge ratios")
    parser.add_argument("--users", default=None, help="default: base and every user of the small pack")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGY,
                        help="merge strategies; the first one feeds the profile")
    parser.add_argument("--encoding", default="fp16", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--guidance", type=float, default=None, help="default: the pack's default_guidance")
    parser.add_argument("--table-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--profile", type=Path, default=None, help="write the scheduler's quality profile")
    parser.add_argument("--table", type=Path, default=None, help="write the markdown tables")
    parser.add_argument("--json", type=Path, default=None, help="write every point with all its scores")
    args = parser.parse_args(argv)

    if args.n < 1:
        parser.error(f"--n: must be >= 1, got {args.n}")
    device = torch.device(args.device) if args.device else None
    # fp32 on every device: the profile measures the models, not fp16 rounding.
    large = load_pack(args.pack / "large", device=device, dtype=torch.float32)
    small = load_pack(args.pack / "small", device=large.device, dtype=torch.float32)
    evaluator = Evaluator.load(args.pack / "evaluator", large.device)
    guidance = args.guidance if args.guidance is not None else float(small.request_defaults().guidance_scale)
    users = args.users.split(",") if args.users else [BASE_USER, *small.users]
    strategies = args.strategies.split(",")
    ratios = _floats(args.ratios)
    steps_list = [int(s) for s in args.steps.split(",")]
    scenes = sample_scenes(args.n, args.seed, "filled")
    m = Measurer(large, small, evaluator, scenes, seed=args.seed, guidance=guidance, encoding=args.encoding,
                 batch=args.batch)
    started = time.perf_counter()
    points = measure(m, steps_list=steps_list, fractions=_floats(args.fractions), ratios=ratios, users=users,
                     strategies=strategies, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{len(points)} points in {time.perf_counter() - started:.0f} s on {large.device}", file=sys.stderr)

    pair = f"{large.name}+{small.name}"
    tables = [f"## Quality table ({pair}, guidance {guidance:g}, codec {args.encoding})", "",
              table_markdown(points, args.table_steps, strategies[0], args.n), "",
              merge_table_markdown(points, args.table_steps, args.n)]
    text = "\n".join(tables)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.profile:
        args.profile.write_text(json.dumps(profile_json(points, pair, strategies[0], ratios, args.n), indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(p) for p in points], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
