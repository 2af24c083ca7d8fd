"""Assembles the trained stages of a work dir into the demo model pack.

    python -m tools.demo_pack.assemble_pack WORK_DIR tandem/demo_pack [--guidance G]

PACK/large/     full StableDiffusionPipeline layout (unet, vae, text_encoder, tokenizer,
                scheduler, model_index.json; no safety checker), weights fp16 safetensors
PACK/small/     unet/ (fp16), loras/USER/pytorch_lora_weights.safetensors; the shared
                components are referenced from ../large, not copied
PACK/evaluator/ the evaluator classifier
Each model dir has a tandem_pack.json. The pack must stay within 40 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tandem.demo.grammar import USER_STYLES
from tools.demo_pack.train_lora import WEIGHT_NAME

FORMAT_VERSION = 1
IMAGE_SIZE = 64
MAX_PACK_BYTES = 40 * 1024 * 1024
DEFAULT_GUIDANCE = 4.0
QUALITY_REPORT = "pack_quality.json"  # written by scripts/train_demo_pack.sh
SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def pack_manifest(role: str, guidance: float) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "name": f"tandem-demo-{role}",
        "role": role,
        "image_size": IMAGE_SIZE,
        "default_sampler": "dpmpp_2m",
        "default_steps": 20,
        "default_guidance": guidance,
    }


def model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_fp16_diffusers(cls: Any, src: Path, dst: Path) -> None:
    model = cls.from_pretrained(src, torch_dtype=torch.float16)
    model.save_pretrained(dst, safe_serialization=True)


def _save_fp16_lora(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in load_file(src).items()}
    save_file(state, dst, metadata={"format": "pt"})


def missing_outputs(work: Path) -> list[str]:
    needed = ["vae/config.json", "unet/config.json", "text_encoder/config.json",
              "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
              "small_unet/config.json", "evaluator/config.json"]
    needed += [f"loras/{user}/{WEIGHT_NAME}" for user in sorted(USER_STYLES)]
    return [p for p in needed if not (work / p).exists()]


def assemble(work: Path, pack: Path, guidance: float = DEFAULT_GUIDANCE) -> int:
    """Writes the pack; returns its size in bytes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = missing_outputs(work)
    if missing:
        raise SystemExit(f"{work} lacks trained outputs: {', '.join(missing)}")
    large, small, evaluator = pack / "large", pack / "small", pack / "evaluator"
    for part in (large, small, evaluator):
        shutil.rmtree(part, ignore_errors=True)

    _save_fp16_diffusers(UNet2DConditionModel, work / "unet", large / "unet")
    _save_fp16_diffusers(AutoencoderKL, work / "vae", large / "vae")
    CLIPTextModel.from_pretrained(work / "text_encoder", dtype=torch.float16).save_pretrained(
        large / "text_encoder")
    shutil.copytree(work / "tokenizer", large / "tokenizer")
    shutil.copytree(work / "scheduler", large / "scheduler")
    _write_json(large / "model_index.json", model_index())
    _write_json(large / "tandem_pack.json", pack_manifest("large", guidance))

    _save_fp16_diffusers(UNet2DConditionModel, work / "small_unet", small / "unet")
    users = {}
    for user in sorted(USER_STYLES):
        users[user] = f"loras/{user}/{WEIGHT_NAME}"
        _save_fp16_lora(work / "loras" / user / WEIGHT_NAME, small / users[user])
    _write_json(small / "tandem_pack.json", {
        **pack_manifest("small", guidance),
        "components": {name: f"../large/{name}" for name in SHARED_COMPONENTS},
        "users": users,
    })

    shutil.copytree(work / "evaluator", evaluator)
    return sum(f.stat().st_size for part in (large, small, evaluator)
               for f in part.rglob("*") if f.is_file())


def measured_guidance(work: Path) -> float:
    """The guidance pack_quality found best for this work dir's models, if it ran."""
    report = work / QUALITY_REPORT
    if report.exists():
        return float(json.loads(report.read_text())["best_guidance"])
    return DEFAULT_GUIDANCE


def set_default_guidance(pack: Path, guidance: float) -> None:
    for role in ("large", "small"):
        path = pack / role / "tandem_pack.json"
        manifest = json.loads(path.read_text())
        manifest["default_guidance"] = guidance
        _write_json(path, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("pack", type=Path)
    parser.add_argument("--guidance", type=float, default=None,
                        help="default_guidance to record (default: the best one in "
                             f"WORK/{QUALITY_REPORT} if measured, else {DEFAULT_GUIDANCE})")
    args = parser.parse_args(argv)
    size = assemble(args.work, args.pack, args.guidance or measured_guidance(args.work))
    print(json.dumps({"event": "assembled", "pack": str(args.pack), "bytes": size,
                      "mb": round(size / 2**20, 2)}))
    if size > MAX_PACK_BYTES:
        print(f"pack is {size / 2**20:.1f} MB, over the {MAX_PACK_BYTES / 2**20:.0f} MB budget")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
