"""True-size pack pairs (tandem/true_size.py, tandem-pack): the published architectures' parameter
counts, CLIP's tokenizer built offline, and a cached pack that is whole or refused by name."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from services.cli import pack as pack_cli
from tandem import packs as packs_module
from tandem import true_size
from tandem.clip_vocab import MERGES, VOCAB_SIZE, bytes_to_unicode, clip_vocabulary, write_clip_tokenizer
from tandem.packs import PackError, load_pack, verify_pack_files
from tandem.true_size import PAIRS, Component, PairSpec, build_pair, cached_pair, count_parameters, parameter_table

# What the published diffusers/transformers configs build (SD 1.5 UNet 859.5 M, its VAE 83.7 M, CLIP
# ViT-L/14's text encoder 123.1 M, BK-SDM-Small's UNet 482.3 M as its paper reports).
PUBLISHED = {("large", "unet"): 859.52e6, ("large", "vae"): 83.65e6, ("large", "text_encoder"): 123.06e6,
             ("small", "unet"): 482.3e6}


def test_the_sd15_pair_has_the_published_parameter_counts():
    rows = {(row.pack, row.component.name): row.parameters for row in parameter_table(PAIRS["sd15"])}
    assert rows.keys() == PUBLISHED.keys()
    for key, published in PUBLISHED.items():
        assert abs(rows[key] / published - 1) <= 0.01, (key, rows[key])


def test_params_command_prints_the_table(capsys):
    assert pack_cli.main(["params", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "| large | unet | Stable Diffusion 1.5 UNet | 859,520,964 |" in out and "BK-SDM-Small" in out


def bpe_file(tmp_path: Path, merges: list[str]) -> Path:
    """A file in CLIP's BPE format: a header line, then the merges, padded to CLIP's count."""
    byte_chars = list(bytes_to_unicode().values())
    taken = {m.replace(" ", "") for m in merges}
    filler = [f"{a} {b}" for a in byte_chars for b in byte_chars if a + b not in taken][:MERGES - len(merges)]
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: test", *merges, *filler]) + "\n")
    return path


def test_clips_bpe_file_becomes_a_tokenizer_with_clips_ids(tmp_path):
    from transformers import CLIPTokenizer

    path = bpe_file(tmp_path, ["c a", "ca t</w>"])
    vocab, merges = clip_vocabulary(path)
    assert len(vocab) == VOCAB_SIZE and merges[:2] == [("c", "a"), ("ca", "t</w>")]
    assert vocab["ca"] == 512 and vocab["cat</w>"] == 513  # merges follow the 512 byte symbols, as in CLIP
    what = write_clip_tokenizer(tmp_path / "tok", path)
    assert what.startswith("CLIP BPE (real vocabulary")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = tokenizer("cat", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [49406, 513, 49407] and len(ids) == 77 and len(tokenizer) == VOCAB_SIZE


def test_a_file_that_is_not_clips_bpe_is_refused(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wt") as f:
        f.write("#version\na b\n")
    with pytest.raises(ValueError, match="not CLIP's BPE file"):
        clip_vocabulary(path)


def test_without_clips_file_the_stand_in_keeps_clips_ids_and_says_so(tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    monkeypatch.setattr("tandem.clip_vocab.find_clip_bpe", lambda: None)
    what = write_clip_tokenizer(tmp_path / "tok")
    assert what.startswith("stand-in")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == VOCAB_SIZE and tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 77


# --- a tiny pair through the same build, cache and refusal paths ------------------------------------

TINY_UNET = dict(true_size.SD15_UNET, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                 norm_num_groups=8, layers_per_block=1)
TINY = PairSpec(
    name="tiny",
    large=(Component("unet", "unet", TINY_UNET, 1, "tiny UNet"),
           Component("vae", "vae", dict(true_size.SD_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=8), 1, "tiny VAE"),
           Component("text_encoder", "text_encoder", dict(true_size.CLIP_VIT_L14_TEXT, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=32),
                     1, "tiny text")),
    small_unet=Component("unet", "unet", dict(TINY_UNET, mid_block_type=None), 1, "tiny small UNet"),
    default_steps=2, image_size=64)


@pytest.fixture()
def tiny_pair(monkeypatch, tmp_path):
    def counted(c: Component) -> Component:  # a tiny model's "published" count is its own
        return dataclasses.replace(c, published_parameters=count_parameters(c))

    monkeypatch.setitem(PAIRS, "tiny", dataclasses.replace(TINY, large=tuple(map(counted, TINY.large)),
                                                           small_unet=counted(TINY.small_unet)))
    monkeypatch.setattr("tandem.clip_vocab.find_clip_bpe", lambda: None)
    return tmp_path / "cache" / "tiny"


def test_a_built_pair_loads_says_random_and_is_whole(tiny_pair):
    large, small = build_pair("tiny", tiny_pair, progress=lambda _: None)
    assert cached_pair(tiny_pair) is None and not tiny_pair.with_name("tiny.partial").exists()
    manifest = json.loads((small / "tandem_pack.json").read_text())
    assert manifest["random"] is True and manifest["components"]["vae"] == "../large/vae"
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    edge, device = load_pack(large, device="cpu"), load_pack(small, device="cpu")
    assert edge.manifest.random and device.unet.dtype.itemsize == 4 and edge.default_image_size == 64
    from safetensors import safe_open

    with safe_open(str(large / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}  # stored fp16


def test_a_truncated_pack_is_refused_by_name_and_the_build_command_rebuilds_it(tiny_pair, capsys):
    assert pack_cli.main(["build", "tiny", "--out", str(tiny_pair)]) == 0
    weights = tiny_pair / "small" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PackError, match="unet/diffusion_pytorch_model.safetensors is 1,000 bytes, expected"):
        load_pack(tiny_pair / "small", device="cpu")
    assert "partial or corrupt" in (cached_pair(tiny_pair) or "")
    capsys.readouterr()
    assert pack_cli.main(["build", "tiny", "--out", str(tiny_pair)]) == 0
    assert "is not a complete pair" in capsys.readouterr().err
    verify_pack_files(tiny_pair / "small")
    assert pack_cli.main(["build", "tiny", "--out", str(tiny_pair)]) == 0
    assert "holds a complete tiny pair already" in capsys.readouterr().out


def test_a_pack_without_its_manifest_is_not_a_complete_pair(tiny_pair):
    build_pair("tiny", tiny_pair, progress=lambda _: None)
    (tiny_pair / "large" / "tandem_pack.json").unlink()
    assert "no tandem_pack.json" in (cached_pair(tiny_pair) or "")


def test_too_little_memory_is_one_line_before_loading(tiny_pair, monkeypatch, capsys):
    large, _ = build_pair("tiny", tiny_pair, progress=lambda _: None)
    monkeypatch.setattr(packs_module, "_available_memory", lambda: 1000)
    with pytest.raises(PackError, match=r"needs 0\.\d GiB of memory for its weights \(as float32\); this machine has 0\.0 GiB free"):
        load_pack(large, device="cpu")
    monkeypatch.setattr("tandem.packs._available_memory", lambda: 1000)
    assert pack_cli.main(["build", "tiny", "--out", str(tiny_pair), "--force"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tandem-pack: error: building tiny needs about") and "GiB free" in line


@pytest.mark.truesize
def test_the_true_size_pair_splits_at_512_px(tmp_path_factory):
    """SD 1.5 on the edge, BK-SDM-Small on the device, one 512 px request (T = 2, k = 1) in
    process: minutes on two cores."""
    from tandem.codec.spec import CodecSpec, handoff_tensor_bytes
    from tandem.packs import check_pair
    from tandem.pipeline import HybridPipeline
    from tandem.request import GenerationRequest

    large, small = build_pair("sd15", tmp_path_factory.mktemp("sd15") / "sd15", progress=lambda _: None)
    edge, device = load_pack(large, device="cpu"), load_pack(small, device="cpu")
    check_pair(edge, device)
    spec = CodecSpec("fp16", 0.0)
    result = HybridPipeline(edge, device).generate(
        GenerationRequest("a cat", steps=2, split=1, height=512, width=512, guidance_scale=7.5), spec)
    assert result.image.shape == (512, 512, 3)
    tensors = handoff_tensor_bytes(4, 64, 64, spec)
    assert tensors < result.handoff_bytes < tensors + 1500
