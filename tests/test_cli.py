"""`tandem generate`: writes the PNG, reports the breakdown, names bad options in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from services.cli import generate as cli


@pytest.fixture
def packs(tiny_packs):
    return ["--large", str(tiny_packs["large"]), "--small", str(tiny_packs["small"]), "--device", "cpu"]


def test_generate_writes_png_and_json_breakdown(tmp_path, packs, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle at the left on a blue background", "--out", str(out), "--steps", "6",
            "--split", "2", "--sampler", "ddim", "--codec", "int8", "--merge-ratio", "0.25", "--json", "--quiet"]
    assert cli.main(argv + packs) == 0
    report = json.loads(capsys.readouterr().out)
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3)
    assert report["edge_steps"] == 2 and report["device_steps"] == 4 and report["total_steps"] == 6
    assert report["handoff_bytes"] > 0 and report["codec"]["encoding"] == "int8"
    assert report["codec"]["merge_ratio"] == 0.25
    assert set(report["seconds"]) == {"edge_steps", "transfer", "device_steps", "decode"}


def test_generate_human_breakdown_and_progress(tmp_path, packs, capsys):
    out = tmp_path / "y.png"
    assert cli.main(["generate", "a blue square at the top on a red background", "--out", str(out), "--steps", "4"] + packs) == 0
    captured = capsys.readouterr()
    assert "edge steps" in captured.err and "device steps" in captured.err  # progress bars
    assert f"wrote {out}" in captured.out and "handoff" in captured.out and "2 steps" in captured.out


def test_same_seed_same_image_different_seed_different_image(tmp_path, packs):
    paths = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        paths.append(tmp_path / f"{name}.png")
        argv = ["generate", "a red circle", "--out", str(paths[-1]), "--steps", "3", "--seed", seed, "--quiet"]
        assert cli.main(argv + packs) == 0
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--split", "9", "--steps", "4"], "--split: must be in 0..steps (4), got 9"),
        (["--steps", "0"], "--steps: must be in 1..200, got 0"),
        (["--merge-ratio", "0.9"], "--merge-ratio: must be in 0..0.75, got 0.9"),
        (["--guidance", "0.5"], "--guidance: must be in 1..50"),
        (["--size", "30"], "multiple of 4"),
        (["--user", "carol"], "--user: unknown user 'carol'"),
        (["--seed", "-1"], "--seed: must be in 0..2^63-1"),
    ],
)
def test_bad_options_get_one_line_naming_the_value(tmp_path, packs, capsys, extra, message):
    code = cli.main(["generate", "a red circle", "--out", str(tmp_path / "z.png"), "--quiet"] + extra + packs)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tandem: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_bad_output_path_and_pack(tmp_path, packs, capsys):
    assert cli.main(["generate", "x", "--out", str(tmp_path / "x.jpg")] + packs) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--out", str(tmp_path / "x.png"), "--large", "/no/pack", "--small", "/no/pack"]) == 2
    assert "'/no/pack' not found" in capsys.readouterr().err


def test_argparse_rejects_unknown_choices(tmp_path, packs, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "x", "--sampler", "heun"] + packs)
    assert exc.value.code == 2
    assert "invalid choice: 'heun'" in capsys.readouterr().err
