"""Measures an assembled demo pack against its quality targets, using the pack's evaluator.

    python -m tools.demo_pack.pack_quality tandem/demo_pack [--tune-guidance] [--report R.json]

- large only, DPM++ 2M, 20 steps: shape, colour, position and background all right (target
  >= 80% of prompts), for each candidate guidance scale; --tune-guidance writes the best one
  into both tandem_pack.json files as default_guidance;
- hand-off: the first steps on the large UNet, the last `--small-fraction` of them on the small
  UNet + each user's LoRA: the user's style recognised (target >= 80%);
- the same hand-off without a LoRA, as a reference (style should stay "filled").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.demo.evaluator import Evaluator
from tandem.demo.grammar import USER_STYLES, Scene
from tandem.demo.world import sample_scenes
from tools.demo_pack.assemble_pack import set_default_guidance
from tools.demo_pack.runs import resolve_device


@dataclass
class PackModels:
    large: Any
    small: Any  # with every user's LoRA loaded as a named adapter
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler_config: dict
    evaluator: Evaluator


def load_pack(pack: Path, device: torch.device) -> PackModels:
    """Every model of the pack in fp32 (quality is measured without fp16 effects)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def ready(model: Any) -> Any:
        return model.to(device).eval().requires_grad_(False)

    fp32 = torch.float32
    large_dir, small_dir = pack / "large", pack / "small"
    manifest = json.loads((small_dir / "tandem_pack.json").read_text())
    small = ready(UNet2DConditionModel.from_pretrained(small_dir / "unet", torch_dtype=fp32))
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: several users' LoRAs is the point.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for user, weights in manifest["users"].items():
            path = small_dir / weights
            small.load_lora_adapter(path.parent, weight_name=path.name, prefix="unet",
                                    adapter_name=user)
    return PackModels(
        large=ready(UNet2DConditionModel.from_pretrained(large_dir / "unet", torch_dtype=fp32)),
        small=small,
        text_encoder=ready(CLIPTextModel.from_pretrained(large_dir / "text_encoder", dtype=fp32)),
        tokenizer=CLIPTokenizer.from_pretrained(large_dir / "tokenizer"),
        vae=ready(AutoencoderKL.from_pretrained(large_dir / "vae", torch_dtype=fp32)),
        scheduler_config=json.loads(
            (large_dir / "scheduler" / "scheduler_config.json").read_text()),
        evaluator=Evaluator.load(pack / "evaluator", device),
    )


@torch.no_grad()
def generate(models: PackModels, prompts: list[str], *, steps: int, guidance: float,
             small_fraction: float = 0.0, user: str | None = None, seed: int = 0) -> np.ndarray:
    """DPM++ 2M with classifier-free guidance; the last `small_fraction` of the steps run on the
    small UNet with `user`'s LoRA (none: the plain small UNet). uint8 [N, 64, 64, 3]."""
    from diffusers import DPMSolverMultistepScheduler

    device = models.vae.device
    scheduler = DPMSolverMultistepScheduler.from_config(
        models.scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps, device=device)

    def embed(texts: list[str]) -> torch.Tensor:
        ids = models.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=models.tokenizer.model_max_length,
                               return_tensors="pt").input_ids.to(device)
        return models.text_encoder(ids).last_hidden_state

    context = torch.cat([embed([""] * len(prompts)), embed(prompts)])
    if user is None:
        models.small.disable_adapters()
    else:
        models.small.enable_adapters()
        models.small.set_adapters([user])
    generator = torch.Generator(device).manual_seed(seed)
    latents = torch.randn((len(prompts), 4, 8, 8), device=device, generator=generator)
    latents = latents * scheduler.init_noise_sigma
    switch = round(steps * (1.0 - small_fraction))
    for i, t in enumerate(scheduler.timesteps):
        unet = models.large if i < switch else models.small
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = unet(model_in, t, context).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = models.vae.decode(latents / models.vae.config.scaling_factor).sample
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def pick_guidance(all_four: dict[float, float], tolerance: float = 0.01) -> float:
    """The middle of the guidances scoring within `tolerance` of the best: a scale inside the
    plateau stays good when the prompts or the sampler change a little."""
    top = max(all_four.values())
    near = sorted(g for g, score in all_four.items() if score >= top - tolerance)
    return near[len(near) // 2]


def save_grid(images: np.ndarray, path: Path, columns: int = 8, max_rows: int = 4) -> None:
    """The first images side by side, as a PNG to look at."""
    from PIL import Image

    cols = min(columns, len(images))
    rows = min(max_rows, len(images) // cols)
    h, w = images.shape[1:3]
    grid = images[: rows * cols].reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4)
    Image.fromarray(grid.reshape(rows * h, cols * w, 3)).save(path)


def measure(models: PackModels, scenes: list[Scene], *, steps: int, guidances: list[float],
            small_fraction: float, seed: int, samples: Path | None = None) -> dict[str, Any]:
    prompts = [s.prompt for s in scenes]
    report: dict[str, Any] = {"n": len(scenes), "steps": steps, "large_only": {}}
    best_images: dict[float, np.ndarray] = {}
    for g in guidances:
        best_images[g] = generate(models, prompts, steps=steps, guidance=g, seed=seed)
        report["large_only"][str(g)] = models.evaluator.score(best_images[g], scenes)
    best = pick_guidance({g: report["large_only"][str(g)]["all_four"] for g in guidances})
    if samples is not None:
        samples.mkdir(parents=True, exist_ok=True)
        save_grid(best_images[best], samples / "large_only.png")
    report["best_guidance"] = best
    report["handoff"] = {"small_fraction": small_fraction, "guidance": best}
    for user in [None, *sorted(USER_STYLES)]:
        style = USER_STYLES.get(user or "", "filled")
        styled = [dataclasses.replace(s, style=style) for s in scenes]
        images = generate(models, prompts, steps=steps, guidance=best,
                          small_fraction=small_fraction, user=user, seed=seed)
        report["handoff"][user or "no_lora"] = models.evaluator.score(images, styled)
        if samples is not None:
            save_grid(images, samples / f"handoff_{user or 'no_lora'}.png")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack", type=Path)
    parser.add_argument("--n", type=int, default=256, help="prompts per measurement")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidances", default="2,3,4,5,6,7.5")
    parser.add_argument("--small-fraction", type=float, default=0.4,
                        help="share of the steps run on the small UNet (+ LoRA)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tune-guidance", action="store_true",
                        help="write the best guidance into the pack's tandem_pack.json files")
    parser.add_argument("--report", type=Path, default=None, help="also write the report here")
    parser.add_argument("--samples", type=Path, default=None,
                        help="write PNG grids of generated images to this folder")
    args = parser.parse_args(argv)

    models = load_pack(args.pack, resolve_device(args.device))
    report = measure(models, sample_scenes(args.n, args.seed, "filled"), steps=args.steps,
                     guidances=[float(g) for g in args.guidances.split(",")],
                     small_fraction=args.small_fraction, seed=args.seed, samples=args.samples)
    if args.tune_guidance:
        set_default_guidance(args.pack, report["best_guidance"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
