"""Tests for the latent codec: token merging, tensor quantization, and the binary container."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.codec.container import (
    FORMAT_VERSION,
    MAGIC,
    CodecError,
    pack_container,
    unpack_container,
)
from tandem.codec.quantize import (
    ENCODINGS,
    decode_tensor,
    encode_tensor,
    encoded_size,
    int8_scales,
)
from tandem.codec.token_merge import (
    MergePlan,
    merge,
    merge_count,
    pack_plan,
    packed_plan_size,
    plan_merge,
    unmerge,
    unpack_plan,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _n_src(h: int, w: int) -> int:
    return h * w - ((h + 1) // 2) * ((w + 1) // 2)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float32 tensor, so NaN and -0.0 compare exactly."""
    return x.contiguous().view(torch.int32)


def _merged_positions(plan: MergePlan) -> np.ndarray:
    """Flat positions of merged src tokens and flat positions of their dst tokens."""
    ys, xs = np.divmod(np.arange(plan.H * plan.W), plan.W)
    is_dst = (ys % 2 == 0) & (xs % 2 == 0)
    src_pos = np.flatnonzero(~is_dst)[list(plan.merged_src)]
    dst_pos = np.flatnonzero(is_dst)[list(plan.merged_dst)]
    return np.stack([src_pos, dst_pos]) if len(src_pos) else np.zeros((2, 0), dtype=np.int64)


def _check_unmerged_exact(x: torch.Tensor, out: torch.Tensor, plan: MergePlan) -> None:
    """Positions untouched by merging are bitwise exact; merged src copy their dst's value."""
    flat_x, flat_out = x.reshape(x.shape[0], -1), out.reshape(out.shape[0], -1)
    src_pos, dst_pos = _merged_positions(plan)
    touched = np.zeros(plan.H * plan.W, dtype=bool)
    touched[src_pos] = True
    touched[dst_pos] = True
    untouched = torch.from_numpy(np.flatnonzero(~touched))
    assert torch.equal(_bits(flat_out[:, untouched]), _bits(flat_x[:, untouched]))
    if len(src_pos):
        s, d = torch.from_numpy(src_pos), torch.from_numpy(dst_pos)
        assert torch.equal(flat_out[:, s], flat_out[:, d])


# --- quantize ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_r0_round_trip_through_all_encodings(encoding: str) -> None:
    x = _randn(4, 9, 7, seed=1) * 3
    plan = plan_merge(x, 0.0)
    kept = merge(x, plan)
    decoded = decode_tensor(encode_tensor(kept, encoding), encoding, kept.shape)
    out = unmerge(decoded, plan)
    assert out.shape == x.shape and out.dtype == torch.float32
    if encoding == "fp32":
        assert torch.equal(_bits(out), _bits(x))
    elif encoding == "fp16":
        assert torch.equal(out, x.half().float())
    else:
        scale = x.abs().amax(dim=(1, 2)) / 127
        assert ((out - x).abs() <= scale[:, None, None] / 2 * (1 + 1e-5)).all()


def test_fp32_is_bitwise_lossless_including_special_values() -> None:
    x = torch.tensor([[0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3.4e38]])
    out = decode_tensor(encode_tensor(x, "fp32"), "fp32", x.shape)
    assert torch.equal(_bits(out), _bits(x))


def test_fp16_error_bound() -> None:
    x = _randn(4, 16, 16, seed=2) * 10
    out = decode_tensor(encode_tensor(x, "fp16"), "fp16", x.shape)
    # fp16 has an 11-bit significand: relative rounding error <= 2^-11 in the normal range.
    assert ((out - x).abs() <= x.abs() * 2.0**-11 + 2.0**-25).all()
    assert not torch.equal(out, x)  # it really is lossy


def test_int8_error_bound_per_channel() -> None:
    channel_gain = torch.tensor([0.01, 1.0, 50.0, 1000.0])
    x = _randn(4, 12, 10, seed=3) * channel_gain[:, None, None]
    out = decode_tensor(encode_tensor(x, "int8"), "int8", x.shape)
    scale = (x.abs().amax(dim=(1, 2)) / 127).float()
    assert torch.allclose(int8_scales(x), scale)
    err = (out - x).abs().amax(dim=(1, 2))
    assert (err <= scale / 2 * (1 + 1e-5)).all()
    assert (err > 0).all()  # lossy, and the bound is not vacuous
    assert (err > scale / 10).all()


def test_int8_zero_channel_and_extremes() -> None:
    x = torch.zeros(2, 3, 3)
    x[1] = torch.linspace(-5, 5, 9).reshape(3, 3)
    out = decode_tensor(encode_tensor(x, "int8"), "int8", x.shape)
    assert torch.equal(out[0], torch.zeros(3, 3))
    assert out[1].max() == pytest.approx(5.0) and out[1].min() == pytest.approx(-5.0)
    assert int8_scales(x)[0] == 1.0


@pytest.mark.parametrize("shape", [(4, 8, 8), (1,), (3, 0), (2, 5, 3, 1), (6, 17)])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encoded_size_is_exact(shape: tuple[int, ...], encoding: str) -> None:
    x = torch.rand(shape)
    assert len(encode_tensor(x, encoding)) == encoded_size(shape, encoding)
    numel = math.prod(shape)
    expected = {"fp32": 4 * numel, "fp16": 2 * numel, "int8": 4 * shape[0] + numel}
    assert encoded_size(shape, encoding) == expected[encoding]


def test_unknown_encoding_names_it_and_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'bf8'.*fp32, fp16, int8"):
        encode_tensor(torch.zeros(2), "bf8")
    with pytest.raises(ValueError, match="'q4'"):
        encoded_size((2,), "q4")
    with pytest.raises(ValueError, match="'nope'"):
        decode_tensor(b"", "nope", (0,))


def test_decode_rejects_wrong_length_and_bad_int8_payloads() -> None:
    data = encode_tensor(torch.ones(2, 4), "fp16")
    with pytest.raises(CodecError, match="needs 16 bytes, got 15"):
        decode_tensor(data[:-1], "fp16", (2, 4))
    good = encode_tensor(torch.ones(2, 4), "int8")
    with pytest.raises(CodecError, match="scale"):
        decode_tensor(struct.pack("<f", float("nan")) + good[4:], "int8", (2, 4))
    with pytest.raises(CodecError, match="-128"):
        decode_tensor(good[:-1] + b"\x80", "int8", (2, 4))
    with pytest.raises(ValueError, match="finite"):
        encode_tensor(torch.tensor([[float("inf")]]), "int8")


# --- token merging ----------------------------------------------------------------------


@pytest.mark.parametrize("window", ["local", "global"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_merge_keeps_expected_token_count(ratio: float, window: str) -> None:
    x = _randn(4, 16, 12, seed=4)
    plan = plan_merge(x, ratio, window)
    m = min(math.floor(ratio * 16 * 12), _n_src(16, 12))
    assert plan.n_merged == m == merge_count(16, 12, ratio)
    kept = merge(x, plan)
    assert kept.shape == (4, 16 * 12 - m)
    out = unmerge(kept, plan)
    assert out.shape == x.shape
    _check_unmerged_exact(x, out, plan)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (16, 6)])
def test_constant_blocks_reconstructed_exactly_at_max_ratio(shape: tuple[int, int]) -> None:
    h, w = shape
    blocks = _randn(4, (h + 1) // 2, (w + 1) // 2, seed=5)
    x = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :h, :w].contiguous()
    plan = plan_merge(x, 0.75, "local")
    assert plan.n_merged == _n_src(h, w)  # every src token is merged
    assert torch.equal(unmerge(merge(x, plan), plan), x)


def test_r0_is_bitwise_identity_with_special_values() -> None:
    x = _randn(3, 5, 7, seed=6)
    x[0, 0, 0], x[1, 2, 2], x[2, 4, 6], x[0, 1, 3] = -0.0, float("nan"), float("inf"), -0.0
    for window in ("local", "global"):
        plan = plan_merge(x, 0.0, window)
        assert plan.n_merged == 0 and plan.n_kept == 35
        assert torch.equal(_bits(unmerge(merge(x, plan), plan)), _bits(x))


def test_variance_preserving_keeps_noise_std_while_mean_shrinks_it() -> None:
    signal = _randn(4, 64, 64, seed=7)
    noise = _randn(4, 64, 64, seed=8)
    for ratio in (0.5, 0.75):
        plan = plan_merge(signal, ratio)  # plan from the signal, applied to independent noise
        vp = unmerge(merge(noise, plan, mode="variance_preserving"), plan)
        mean = unmerge(merge(noise, plan, mode="mean"), plan)
        assert abs(vp.std().item() - 1.0) < 0.1
        assert mean.std().item() < 0.85
    assert mean.std().item() == pytest.approx(0.5, abs=0.05)  # r=0.75: blocks of 4 averaged


def test_plan_computed_on_one_tensor_applies_to_another() -> None:
    x, y = _randn(4, 10, 10, seed=9), _randn(4, 10, 10, seed=10)
    plan = plan_merge(x, 0.5, "global")
    out = unmerge(merge(y, plan), plan)
    _check_unmerged_exact(y, out, plan)
    with pytest.raises(ValueError, match="plan is for 10x10"):
        merge(_randn(4, 10, 8), plan)
    with pytest.raises(ValueError, match=r"\[C, 50\]"):
        unmerge(torch.zeros(4, 49), plan)


def test_merge_mean_value_and_tie_breaking_are_deterministic() -> None:
    # All-zero latent: every similarity ties, so the first m src merge into their own block.
    zeros = torch.zeros(2, 4, 4)
    plan = plan_merge(zeros, 0.25)
    assert plan.merged_src == (0, 1, 2, 3)
    assert plan.merged_dst == (0, 1, 0, 0)  # src (0,1),(0,3),(1,0),(1,1) -> blocks 0,1,0,0
    assert plan == plan_merge(zeros, 0.25)
    # A dst with src merged into it becomes the plain mean (or sum/sqrt(n)).
    x = _randn(3, 4, 4, seed=11)
    kept = merge(x, plan)
    group = x[:, [0, 0, 1, 1], [0, 1, 0, 1]]  # dst (0,0) and src (0,1), (1,0), (1,1)
    assert torch.allclose(kept[:, 0], group.mean(dim=1))
    vp = merge(x, plan, mode="variance_preserving")
    assert torch.allclose(vp[:, 0], group.sum(dim=1) / 2)


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 3), (2, 1), (3, 3)])
@pytest.mark.parametrize("window", ["local", "global"])
def test_odd_and_tiny_shapes(shape: tuple[int, int], window: str) -> None:
    x = _randn(3, *shape, seed=12)
    for ratio in (0.0, 0.25, 0.5, 0.75):
        plan = plan_merge(x, ratio, window)
        kept = merge(x, plan, mode="variance_preserving")
        assert kept.shape == (3, plan.n_kept)
        out = unmerge(kept, plan)
        assert out.shape == x.shape
        data = pack_plan(plan)
        assert unpack_plan(data, *shape, window, ratio) == plan


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
def test_plan_pack_round_trip_and_exact_sizes(ratio: float) -> None:
    h, w = 13, 10
    x = _randn(4, h, w, seed=13)
    n_src = _n_src(h, w)
    local = plan_merge(x, ratio, "local")
    data = pack_plan(local)
    assert len(data) == math.ceil(n_src / 2) == packed_plan_size(h, w, "local", local.n_merged)
    assert unpack_plan(data, h, w, "local", ratio) == local
    glob = plan_merge(x, ratio, "global")
    data = pack_plan(glob)
    assert len(data) == math.ceil(n_src / 8) + 2 * glob.n_merged
    assert unpack_plan(data, h, w, "global", ratio) == glob


def test_global_index_overhead_grows_with_ratio() -> None:
    x = _randn(4, 32, 32, seed=14)
    ratios = [0.1, 0.25, 0.5, 0.75]
    global_sizes = [len(pack_plan(plan_merge(x, r, "global"))) for r in ratios]
    local_sizes = [len(pack_plan(plan_merge(x, r, "local"))) for r in ratios]
    assert global_sizes == sorted(set(global_sizes))  # strictly increasing
    assert len(set(local_sizes)) == 1  # 4 bits per src token regardless of ratio


def test_global_plan_uses_uint32_indices_past_65536_dst_tokens() -> None:
    h = w = 514  # 257 * 257 = 66049 dst tokens
    plan = MergePlan(h, w, "global", (0, 7), (66048, 3))
    data = pack_plan(plan)
    assert len(data) == math.ceil(_n_src(h, w) / 8) + 2 * 4
    assert unpack_plan(data, h, w, "global") == plan


def test_unpack_plan_validates() -> None:
    h, w = 4, 4  # 12 src tokens -> 6 bytes local
    with pytest.raises(CodecError, match="must be 6 bytes, got 5"):
        unpack_plan(b"\x00" * 5, h, w, "local")
    with pytest.raises(CodecError, match="code 10"):
        unpack_plan(b"\x0a" + b"\x00" * 5, h, w, "local")
    # src 0 is (0, 1) in block (0, 0); code 1 is the (-1, -1) neighbour, outside the grid.
    with pytest.raises(CodecError, match="outside"):
        unpack_plan(b"\x01" + b"\x00" * 5, h, w, "local")
    with pytest.raises(CodecError, match="padding nibble"):
        unpack_plan(b"\x00\x50", 1, 7, "local")  # 3 src tokens, 4th nibble must be 0
    with pytest.raises(CodecError, match="implies 4"):
        unpack_plan(b"\x05" + b"\x00" * 5, h, w, "local", ratio=0.25)
    with pytest.raises(CodecError, match="must be 4 bytes, got 3"):
        unpack_plan(b"\x01\x00\x00", h, w, "global")  # 1 merged -> 2 mask + 2 index bytes
    with pytest.raises(CodecError, match="out of range"):
        unpack_plan(b"\x01\x00" + struct.pack("<H", 4), h, w, "global")
    with pytest.raises(CodecError, match="padding bits"):
        unpack_plan(b"\x00\x10", h, w, "global")
    with pytest.raises(CodecError, match="at least 2 bytes"):
        unpack_plan(b"", h, w, "global")
    with pytest.raises(CodecError, match="local 3x3"):
        MergePlan(8, 8, "local", (0,), (15,))
    with pytest.raises(ValueError, match="window"):
        unpack_plan(b"", 1, 1, "nearby")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio"):
        plan_merge(torch.zeros(1, 4, 4), 0.8)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 17),
    w=st.integers(1, 17),
    c=st.integers(1, 6),
    ratio=st.floats(0.0, 0.75),
    window=st.sampled_from(["local", "global"]),
    mode=st.sampled_from(["mean", "variance_preserving"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_properties(
    h: int, w: int, c: int, ratio: float, window: str, mode: str, seed: int
) -> None:
    x = _randn(c, h, w, seed=seed)
    plan = plan_merge(x, ratio, window)  # type: ignore[arg-type]
    assert plan.n_merged == min(math.floor(ratio * h * w + 1e-9), _n_src(h, w))
    kept = merge(x, plan, mode=mode)  # type: ignore[arg-type]
    assert kept.shape == (c, h * w - plan.n_merged)
    decoded = decode_tensor(encode_tensor(kept, "fp32"), "fp32", kept.shape)
    out = unmerge(decoded, plan)
    assert out.shape == (c, h, w)
    _check_unmerged_exact(x, out, plan)
    data = pack_plan(plan)
    assert len(data) == packed_plan_size(h, w, window, plan.n_merged)  # type: ignore[arg-type]
    assert unpack_plan(data, h, w, window, ratio) == plan  # type: ignore[arg-type]


# --- container --------------------------------------------------------------------------


def _small_payload() -> bytes:
    return pack_container({"step": 12, "name": "café"}, {"latent": b"\x01\x02\x03", "plan": b"xy"})


def _raw_payload(header: bytes, region: bytes, version: int = FORMAT_VERSION) -> bytes:
    """Hand-built payload with a valid CRC, for header-level faults."""
    body = struct.pack("<4sHI", MAGIC, version, len(header)) + header + region
    return body + struct.pack("<I", zlib.crc32(body))


def test_container_round_trip() -> None:
    meta = {"step": 12, "nested": {"shape": [4, 64, 64]}, "text": "café ☕"}
    blobs = {"latent": bytes(range(256)) * 3, "empty": b"", "plan": b"\x00\xff"}
    out_meta, out_blobs = unpack_container(pack_container(meta, blobs))
    assert out_meta == meta
    assert out_blobs == blobs and list(out_blobs) == list(blobs)
    assert unpack_container(pack_container({}, {})) == ({}, {})


def test_every_truncation_is_reported() -> None:
    data = _small_payload()
    for n in range(len(data)):
        with pytest.raises(CodecError, match="truncated"):
            unpack_container(data[:n])
    with pytest.raises(CodecError, match=f"expected {len(data)} bytes, got {len(data) - 1}"):
        unpack_container(data[:-1])


def test_flipped_bytes_are_detected() -> None:
    data = _small_payload()
    for i in range(len(data)):
        corrupted = bytearray(data)
        corrupted[i] ^= 0x40
        with pytest.raises(CodecError):
            unpack_container(bytes(corrupted))
    for i in range(len(data) - 9, len(data)):  # blob region and CRC
        corrupted = bytearray(data)
        corrupted[i] ^= 0x01
        with pytest.raises(CodecError, match="corrupt"):
            unpack_container(bytes(corrupted))


def test_wrong_magic_and_future_version() -> None:
    data = _small_payload()
    with pytest.raises(CodecError, match="not a Tandem payload"):
        unpack_container(b"PNG\x89" + data[4:])
    with pytest.raises(CodecError, match="not a Tandem payload"):
        unpack_container(b"XY")
    future = data[:4] + struct.pack("<H", FORMAT_VERSION + 1) + data[6:]
    with pytest.raises(CodecError, match=r"unsupported .*version 2 .*supports version 1"):
        unpack_container(future)


def test_header_faults_with_valid_crc() -> None:
    def header(blobs: list[dict[str, object]]) -> bytes:
        return json.dumps({"meta": {}, "blobs": blobs}).encode()

    with pytest.raises(CodecError, match="bad Tandem header JSON"):
        unpack_container(_raw_payload(b"{not json", b""))
    with pytest.raises(CodecError, match="bad Tandem header JSON"):
        unpack_container(_raw_payload(b"\xff\xfe", b""))
    with pytest.raises(CodecError, match="'meta' and 'blobs'"):
        unpack_container(_raw_payload(b"[]", b""))
    overlapping = header(
        [{"name": "a", "offset": 0, "nbytes": 4}, {"name": "b", "offset": 2, "nbytes": 2}]
    )
    with pytest.raises(CodecError, match="overlap"):
        unpack_container(_raw_payload(overlapping, b"abcd"))
    out_of_bounds = header([{"name": "a", "offset": 2, "nbytes": 8}])
    with pytest.raises(CodecError, match="'a' range \\[2, 10\\) is out of bounds"):
        unpack_container(_raw_payload(out_of_bounds, b"abcd"))
    with pytest.raises(CodecError, match="not referenced"):
        unpack_container(_raw_payload(header([{"name": "a", "offset": 0, "nbytes": 2}]), b"abcd"))
    with pytest.raises(CodecError, match="non-negative integer"):
        unpack_container(_raw_payload(header([{"name": "a", "offset": -1, "nbytes": 2}]), b"ab"))
    duplicate = header(
        [{"name": "a", "offset": 0, "nbytes": 1}, {"name": "a", "offset": 1, "nbytes": 1}]
    )
    with pytest.raises(CodecError, match="duplicate"):
        unpack_container(_raw_payload(duplicate, b"ab"))
    with pytest.raises(CodecError, match="trailing bytes"):
        unpack_container(_small_payload() + b"\x00")


def test_container_rejects_bad_inputs() -> None:
    with pytest.raises(CodecError, match="JSON-serializable"):
        pack_container({"x": object()}, {})
    with pytest.raises(CodecError, match="JSON-serializable"):
        pack_container({"x": float("nan")}, {})
    with pytest.raises(CodecError, match="must be bytes"):
        pack_container({}, {"a": "text"})  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="payload must be bytes"):
        unpack_container("TNDM")  # type: ignore[arg-type]


def test_end_to_end_payload() -> None:
    """Merge -> quantize -> container -> back, as the edge and the device would do it."""
    latent, noise = _randn(4, 16, 16, seed=15), _randn(4, 16, 16, seed=16)
    plan = plan_merge(latent, 0.5)
    kept_latent, kept_noise = merge(latent, plan), merge(noise, plan, "variance_preserving")
    meta = {"H": 16, "W": 16, "window": plan.window, "ratio": 0.5, "shape": list(kept_latent.shape)}
    payload = pack_container(
        meta,
        {
            "plan": pack_plan(plan),
            "latent": encode_tensor(kept_latent, "fp16"),
            "noise": encode_tensor(kept_noise, "int8"),
        },
    )
    meta2, blobs = unpack_container(payload)
    plan2 = unpack_plan(blobs["plan"], meta2["H"], meta2["W"], meta2["window"], meta2["ratio"])
    assert plan2 == plan
    latent2 = unmerge(decode_tensor(blobs["latent"], "fp16", meta2["shape"]), plan2)
    assert torch.allclose(latent2, unmerge(kept_latent, plan), atol=1e-2)
    noise2 = unmerge(decode_tensor(blobs["noise"], "int8", meta2["shape"]), plan2)
    assert noise2.shape == noise.shape
