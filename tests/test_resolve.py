"""One request resolver (tandem/resolve.py): every entry point states what it was given as a
PartialRequest, and only resolve() fills what is unset; a plan fills it through with_plan()."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.cli import generate as cli
from services.common.wire import partial_from_proto, partial_to_proto, request_to_proto
from tandem.codec.spec import CodecSpec
from tandem.packs import PackManifest
from tandem.request import GenerationRequest, RequestError
from tandem.resolve import CODEC_FIELDS, PartialRequest, RequestDefaults, resolve, resolve_codec
from tandem.v1 import edge_pb2

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = RequestDefaults(steps=12, sampler="ddim", guidance_scale=3.0, image_size=32)


def plan(**overrides):
    fields = dict(steps=10, split=8, encoding="int8", merge_ratio=0.25, merge_strategy="denoised")
    return SimpleNamespace(**{**fields, **overrides})


# --- resolve -----------------------------------------------------------------------------------

def test_unset_fields_take_the_packs_defaults_and_the_types_own():
    request, codec = resolve(PartialRequest("a cat"), DEFAULTS)
    assert request == GenerationRequest("a cat", steps=12, split=6, sampler="ddim", guidance_scale=3.0, seed=0,
                                        negative_prompt="", height=32, width=32, user=None)
    assert codec == CodecSpec()


def test_given_fields_are_kept_and_the_default_split_follows_the_given_steps():
    request, codec = resolve(PartialRequest("a cat", steps=15, seed=7, height=48, user="bob", merge_ratio=0.5), DEFAULTS)
    assert (request.steps, request.split, request.seed, request.height, request.width, request.user) == (15, 7, 7, 48, 32, "bob")
    assert codec == CodecSpec(merge_ratio=0.5)
    assert resolve(PartialRequest("a cat", split=0), DEFAULTS).request.split == 0  # 0 is a value, not unset


def test_a_bad_field_is_named_the_requests_before_the_codecs():
    with pytest.raises(RequestError) as info:
        resolve(PartialRequest("a cat", steps=4, split=5, encoding="fp8"), DEFAULTS)
    assert info.value.field == "split" and info.value.message == "must be in 0..steps (4), got 5"
    with pytest.raises(RequestError) as info:
        resolve(PartialRequest("a cat", encoding="fp8"), DEFAULTS)
    assert info.value.field == "codec"
    with pytest.raises(RequestError) as info:
        resolve_codec(PartialRequest(merge_ratio=0.9))
    assert info.value.field == "merge_ratio"
    # a process's own measuring requests (warm-up, profiling) are not a user's: not checked
    assert resolve(PartialRequest("timing", steps=500, split=500), DEFAULTS, validate=False).request.steps == 500


def test_a_manifests_defaults_are_the_packs_and_a_missing_size_is_the_librarys():
    manifest = PackManifest("p", default_steps=8, default_sampler="euler", default_guidance=4.0)
    assert manifest.request_defaults() == RequestDefaults(8, "euler", 4.0, 64)
    assert manifest.request_defaults(image_size=512).image_size == 512
    assert dataclasses.replace(manifest, image_size=96).request_defaults().image_size == 96
    assert PackManifest("bare").request_defaults() == RequestDefaults()
    assert resolve(PartialRequest("x"), RequestDefaults()).request == GenerationRequest("x")  # one set of defaults


def test_a_loaded_pack_resolves_with_its_own_image_size(large_pack):
    assert large_pack.request_defaults() == large_pack.manifest.request_defaults(large_pack.default_image_size)


# --- with_plan -----------------------------------------------------------------------------------

def test_the_plan_fills_what_the_user_left_unset():
    given = PartialRequest("a cat").with_plan(plan())
    assert (given.steps, given.split, given.encoding, given.merge_ratio, given.merge_strategy) == (
        10, 8, "int8", 0.25, "denoised")


def test_what_the_user_set_wins_and_a_given_t_keeps_the_plans_split_fraction():
    given = PartialRequest("a cat", steps=15, encoding="fp32", merge_ratio=0.0, merge_strategy="latent").with_plan(plan())
    assert (given.steps, given.split, given.encoding, given.merge_ratio, given.merge_strategy) == (
        15, 12, "fp32", 0.0, "latent")  # 0.8 of 15 -> 12
    assert PartialRequest("a cat", steps=10).with_plan(plan()).split == 8  # the plan's own T: its k
    assert PartialRequest("a cat", split=3).with_plan(plan()).split == 3


# --- one request type, one wire mapping -----------------------------------------------------------

def test_the_partial_request_has_every_field_of_the_request_and_the_codec():
    partial = [f.name for f in dataclasses.fields(PartialRequest)]
    request = [f.name for f in dataclasses.fields(GenerationRequest)]
    codec = [f.name for f in dataclasses.fields(CodecSpec)]
    assert partial == request + list(CODEC_FIELDS) and sorted(CODEC_FIELDS.values()) == sorted(codec)
    assert all(f.default is None for f in dataclasses.fields(PartialRequest))


def _sample(name: str):
    return {"prompt": "a cat", "negative_prompt": "blur", "sampler": "ddim", "user": "bob", "encoding": "int8",
            "merge_strategy": "denoised", "merge_window": "global", "guidance_scale": 3.5, "merge_ratio": 0.5}.get(name, 7)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(PartialRequest)])
def test_every_field_crosses_the_wire_by_its_name_and_unset_stays_unset(name):
    """A field of PartialRequest that the proto has needs no code in services/common/wire.py."""
    alone = PartialRequest(**{name: _sample(name)})
    assert partial_from_proto(partial_to_proto(alone)) == alone
    assert partial_from_proto(edge_pb2.GenerateRequest()) == PartialRequest()


def test_the_wire_names_no_request_field():
    """So a request field the proto has is mapped without a line in services/common/wire.py."""
    source = (ROOT / "services" / "common" / "wire.py").read_text()
    names = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)}
    names |= {node.arg for node in ast.walk(ast.parse(source)) if isinstance(node, ast.keyword) and node.arg}
    assert names & {f.name for f in dataclasses.fields(PartialRequest)} == {"height", "width"}  # latent_shape's


def test_a_split_of_zero_is_sent_and_a_complete_request_travels_as_before():
    assert partial_from_proto(partial_to_proto(PartialRequest(split=0))).split == 0
    request = GenerationRequest("a cat", steps=6, split=4, sampler="ddim", guidance_scale=3.0, seed=9, height=32,
                                width=32, user="bob")
    codec = CodecSpec("int8", 0.25, "denoised", "global")
    expected = edge_pb2.GenerateRequest(
        prompt="a cat", steps=6, split=4, sampler="ddim", guidance_scale=3.0, seed=9, height=32, width=32, user="bob",
        codec=edge_pb2.Codec(encoding="int8", merge_ratio=0.25, merge_strategy="denoised", merge_window="global"))
    assert request_to_proto(request, codec).SerializeToString() == expected.SerializeToString()


# --- the CLI: one frozen options object, flags mapped by name -------------------------------------

def options(*argv: str) -> cli.Options:
    return cli.parse_options(cli.build_parser().parse_args(["generate", "a cat", *argv]))


def test_every_request_flag_reaches_the_partial_request_by_its_fields_name():
    o = options("--steps", "6", "--split", "2", "--sampler", "ddim", "--guidance", "3", "--seed", "4",
                "--negative-prompt", "blur", "--size", "48", "--user", "bob", "--codec", "int8", "--merge-ratio", "0.5",
                "--merge-strategy", "denoised")
    assert o.request == PartialRequest("a cat", steps=6, split=2, sampler="ddim", guidance_scale=3.0, seed=4,
                                       negative_prompt="blur", height=48, width=48, user="bob", encoding="int8",
                                       merge_ratio=0.5, merge_strategy="denoised")
    assert options().request == PartialRequest("a cat", seed=0, negative_prompt="")  # the rest: the pack's or the plan's
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.edge = "127.0.0.1:1"  # type: ignore[misc]


def test_an_error_about_a_request_field_names_its_flag():
    _, flags = cli._build_parser()
    assert flags == {"prompt": "PROMPT", "steps": "--steps", "split": "--split", "sampler": "--sampler",
                     "guidance_scale": "--guidance", "seed": "--seed", "negative_prompt": "--negative-prompt",
                     "height": "--size", "width": "--size", "user": "--user", "encoding": "--codec",
                     "codec": "--codec", "merge_ratio": "--merge-ratio", "merge_strategy": "--merge-strategy"}


def test_size_zero_is_refused_before_the_models_load_on_every_path(tmp_path, capsys):
    """It was an error in process and over --edge but meant "the pack's size" with --ue."""
    argv = ["generate", "a red circle at the left on a blue background", "--out", str(tmp_path / "x.png"), "--size", "0"]
    assert cli.main([*argv, "--ue", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.strip() == "tandem: error: --size: must be in 8..2048, got 0"


# --- nothing else fills a request's defaults ------------------------------------------------------

_PACK_DEFAULTS = {"default_steps", "default_guidance", "default_sampler"}  # PackManifest's
_RESOLVER = {ROOT / "tandem" / "packs.py", ROOT / "tandem" / "resolve.py"}


def _defaulting(path: Path) -> list[str]:
    """`manifest.default_steps`-style reads of a pack's defaults, and `value or <literal default>`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in _PACK_DEFAULTS and ast.unparse(node.value).endswith("manifest"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            last = node.values[-1]
            if isinstance(last, ast.Constant) and last.value in (64, 7.5, "fp16", "dpmpp_2m", 20):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: or {last.value!r}")
    return found


def test_only_the_resolver_fills_a_requests_defaults():
    files = [p for d in ("tandem", "services", "tools") for p in (ROOT / d).rglob("*.py")
             if "v1" not in p.parts and p not in _RESOLVER]
    assert [hit for path in files for hit in _defaulting(path)] == []


def test_the_resolver_imports_no_torch_and_no_grpc():
    code = "import sys, tandem.resolve; print(sorted(m for m in ('torch', 'grpc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
