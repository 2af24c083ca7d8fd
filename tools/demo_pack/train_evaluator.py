"""Stage: the evaluator classifier (tandem.demo.evaluator) on generator images of all styles.

    python -m tools.demo_pack.train_evaluator --out WORK [--steps N] [--max-minutes M] [--tiny]

Light augmentation (blur, noise, brightness/colour shifts) so it reads decoded, generated
images robustly. When done, reports accuracy on fresh images (clean and augmented) and saves
WORK/evaluator; the target is >= 98% per attribute on clean images.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tandem.demo.evaluator import HEADS, Evaluator, EvaluatorNet
from tools.demo_pack.data import render_bank
from tools.demo_pack.runs import Run, add_common_args, autocast, resolve_args
from tools.demo_pack.trainer import Trainer, trainable

STAGE = "evaluator"
TINY_CONFIG = {"channels": [8, 8, 16, 16], "hidden": 32}
FULL_CONFIG = {"channels": [32, 64, 96, 128], "hidden": 256}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, steps=2000, batch_size=256, lr=1e-3)
    parser.add_argument("--eval-size", type=int, default=None, help="default 4096 (tiny: 32)")
    return parser


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image gaussian blur (sigma 0–1.2 px), brightness ±10%, channel offsets ±0.04 and
    gaussian noise (std 0–0.08) on float [B, 3, H, W] images in [0, 1]."""
    b, c, h, w = x.shape
    device = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, device=device, generator=generator)

    sigma = rand(b) * 1.2 + 1e-3
    taps = torch.arange(-2, 3, device=device, dtype=x.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, 5]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    x = y.reshape(b, c, h, w)
    x = x * (0.9 + 0.2 * rand(b, 1, 1, 1)) + 0.04 * (2 * rand(b, c, 1, 1) - 1)
    noise = torch.randn(x.shape, device=device, generator=generator)
    return (x + noise * 0.08 * rand(b, 1, 1, 1)).clamp(0.0, 1.0)


def main(argv: list[str] | None = None) -> bool:
    """Trains (or resumes); True once all steps are done and WORK/evaluator is written."""
    args = resolve_args(build_parser().parse_args(argv))
    eval_size = args.eval_size or (32 if args.tiny else 4096)
    run = Run(args, STAGE)
    config = TINY_CONFIG if args.tiny else FULL_CONFIG
    net = EvaluatorNet(config["channels"], config["hidden"]).to(run.device).train()
    trainer = Trainer(run, trainable(net), weight_decay=0.01)
    run.log.event(event="model", params=sum(p.numel() for p in net.parameters()))
    bank = render_bank(args.bank_size, args.seed, None, run.device)
    labels = {k: torch.from_numpy(getattr(bank.scenes, k)).to(run.device) for k in HEADS}
    generator = run.generator(trainer.step)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(0, len(bank), (args.batch_size,), device=run.device,
                            generator=generator)
        x = augment(bank.images[idx].permute(0, 3, 1, 2).float() / 255.0, generator)
        with autocast(run.device):
            logits = net(x)
        losses = {k: F.cross_entropy(logits[k].float(), labels[k][idx]) for k in HEADS}
        return sum(losses.values()), {f"ce_{k}": v for k, v in losses.items()}

    finished = trainer.train(loss_fn)
    if finished:
        evaluator = Evaluator(net, config, run.device)
        metrics = measure(evaluator, eval_size, args.seed + 1, run.device)
        evaluator.save(args.out / "evaluator", metrics)
        run.log.event(event="export", path=str(args.out / "evaluator"), **metrics)
    return finished


def measure(evaluator: Evaluator, n: int, seed: int, device: torch.device) -> dict[str, dict]:
    """Accuracy on fresh images the training never saw, clean and augmented."""
    bank = render_bank(n, seed + 10_000, None, device)
    scenes = bank.scenes.scenes()
    clean = bank.images.permute(0, 3, 1, 2).float() / 255.0
    noisy = augment(clean, torch.Generator(device).manual_seed(seed))
    return {
        "fresh_clean": evaluator.score(clean, scenes),
        "fresh_augmented": evaluator.score(noisy, scenes),
    }


if __name__ == "__main__":
    main()
