"""Every training stage for a few steps with --tiny settings, resume, the LoRA format, and the
assembled pack loading with diffusers/transformers. CPU, well under a minute."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tools.demo_pack import (
    assemble_pack,
    pack_quality,
    quality_profile,
    train_evaluator,
    train_lora,
    train_small,
    train_text_unet,
    train_vae,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tiny", "--device", "cpu"]


def _log(work: Path, stage: str) -> list[dict]:
    path = work / "runs" / stage / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a small shared VM the threads'
    barriers can make each op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of every stage, in order, into one work dir."""
    out = tmp_path_factory.mktemp("work")
    args = ["--out", str(out), *TINY]
    assert train_evaluator.main(args)
    assert train_vae.main(args)
    assert train_text_unet.main(args)
    assert train_small.main(args)
    assert train_lora.main(["--user", "alice", *args])
    assert train_lora.main(["--user", "bob", *args])
    return out


@pytest.fixture(scope="module")
def pack(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "demo_pack"
    assert assemble_pack.main([str(work), str(out)]) == 0
    return out


def test_every_stage_logs_loss_and_throughput(work: Path) -> None:
    for stage in ("evaluator", "vae", "text_unet", "small", "lora_alice", "lora_bob"):
        records = _log(work, stage)
        steps = [r for r in records if "step" in r and "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert all(r["steps_per_s"] > 0 for r in steps)
        assert records[-1]["event"] == "export"


def test_outputs_of_every_stage(work: Path) -> None:
    vae_config = json.loads((work / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215 and vae_config["scaling_factor"] > 0
    scheduler = json.loads((work / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["beta_schedule"] == "scaled_linear"
    evaluator = json.loads((work / "evaluator" / "config.json").read_text())
    assert set(evaluator["metrics"]["fresh_clean"]) >= {"shape", "color", "all_four", "style"}
    for path in ("unet", "small_unet", "text_encoder", "tokenizer"):
        assert (work / path).is_dir()


def test_resume_from_checkpoint(work: Path) -> None:
    """A second run with more steps resumes at the checkpoint instead of starting over; a run
    out of time stops at once and keeps the checkpoint."""
    args = ["--out", str(work), *TINY]
    assert not train_text_unet.main([*args, "--steps", "5", "--max-minutes", "0"])
    assert json.loads((work / "runs/text_unet/checkpoint/state.json").read_text())["step"] == 3
    assert train_text_unet.main([*args, "--steps", "4"])
    records = _log(work, "text_unet")
    assert any(r.get("event") == "resume" and r["step"] == 3 for r in records)
    assert [r["step"] for r in records if "loss" in r][-1] == 4
    assert json.loads((work / "runs/text_unet/checkpoint/state.json").read_text())["step"] == 4


def test_lora_file_loads_with_diffusers_and_changes_the_output(work: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(work / "small_unet").eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=gen)
    context = torch.randn((1, 16, unet.config.cross_attention_dim), generator=gen)
    t = torch.tensor([300])
    with torch.no_grad():
        base = unet(x, t, context).sample
        lora_dir = work / "loras" / "alice"
        with safe_open(lora_dir / train_lora.WEIGHT_NAME, "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("unet.") for k in keys)
        unet.load_lora_adapter(lora_dir, weight_name=train_lora.WEIGHT_NAME, prefix="unet",
                               adapter_name="alice")
        styled = unet(x, t, context).sample
    assert not torch.allclose(base, styled)
    export = _log(work, "lora_alice")[-1]
    assert export["lora_reload_max_diff"] < 1e-5 and export["lora_change_vs_base"] > 0


def test_assembled_pack_loads(pack: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    large, small = pack / "large", pack / "small"
    UNet2DConditionModel.from_pretrained(large / "unet")
    UNet2DConditionModel.from_pretrained(small / "unet")
    AutoencoderKL.from_pretrained(large / "vae")
    CLIPTextModel.from_pretrained(large / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(large / "tokenizer")
    assert tokenizer.model_max_length == 16
    with safe_open(large / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16

    index = json.loads((large / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    manifest = json.loads((large / "tandem_pack.json").read_text())
    assert manifest["role"] == "large" and manifest["image_size"] == 64
    assert manifest["default_sampler"] == "dpmpp_2m" and manifest["default_steps"] == 20
    small_manifest = json.loads((small / "tandem_pack.json").read_text())
    assert small_manifest["name"] == "tandem-demo-small"
    for path in small_manifest["components"].values():
        assert (small / path).is_dir()
    for path in small_manifest["users"].values():
        assert (small / path).is_file()
    assert (pack / "evaluator" / "model.safetensors").is_file()


def test_pack_quality_runs_and_tunes_guidance(pack: Path, tmp_path: Path) -> None:
    report = pack_quality.main([str(pack), "--n", "2", "--steps", "2", "--guidances", "2,3",
                                "--device", "cpu", "--tune-guidance",
                                "--report", str(tmp_path / "report.json"),
                                "--samples", str(tmp_path / "samples")])
    assert set(report["handoff"]) >= {"alice", "bob", "no_lora"}
    manifest = json.loads((pack / "small" / "tandem_pack.json").read_text())
    assert manifest["default_guidance"] == report["best_guidance"]
    assert (tmp_path / "samples" / "large_only.png").is_file()


def test_quality_profile_feeds_the_scheduler(pack: Path, tmp_path: Path) -> None:
    from services.scheduler.decide.quality import QualityProfile

    profile_path, table_path = tmp_path / "profile.json", tmp_path / "table.md"
    assert quality_profile.main([str(pack), "--n", "2", "--steps", "2,4", "--fractions", "0,0.5,1",
                                 "--ratios", "0,0.5", "--strategies", "denoised,latent", "--table-steps", "4",
                                 "--device", "cpu", "--profile", str(profile_path),
                                 "--table", str(table_path)]) == 0
    profile = QualityProfile.load(profile_path)
    (pair,) = profile.pairs
    assert set(profile.users(pair)) == {"base", "alice", "bob"}
    for user in ("base", "alice", "bob"):  # every grid node measured: T x k/T x r
        assert 0.0 <= profile.accuracy(4, 0.5, 0.5, user) <= 1.0
    points = json.loads(profile_path.read_text())["pairs"][pair]["users"]["base"]["points"]
    assert len(points) == 2 * 3 * 2  # k = 0 stands for every merge ratio
    table = table_path.read_text()
    assert "| alice | 2 | 2 |" in table and "| latent | 0.5 |" in table


def test_pick_guidance_prefers_the_middle_of_the_plateau() -> None:
    assert pack_quality.pick_guidance({2.0: 1.0, 3.0: 1.0, 4.0: 0.995, 7.5: 0.8}) == 3.0
    assert pack_quality.pick_guidance({2.0: 0.5, 3.0: 0.9}) == 3.0


def test_train_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "train_demo_pack.sh")], check=True)
