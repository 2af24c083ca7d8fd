"""Bipartite soft matching token merging of a latent's spatial tokens (ToMe-style).

A latent ``[C, H, W]`` is seen as ``H*W`` tokens with ``C`` features. The partition is fixed
(so it never has to be transmitted): *dst* tokens are the top-left corners of the 2x2 blocks
(``y % 2 == 0 and x % 2 == 0``), *src* tokens are all the others. Each src token finds its
most cosine-similar dst token; the ``m`` src tokens with the highest similarity are merged
into their dst. Only the dst tokens and the unmerged src tokens are sent; the receiver copies
each dst value back into the positions of the src tokens merged into it.

Orderings used throughout (both sides must agree):

* dst index ``d = by * Wd + bx`` for block ``(by, bx)``, ``Wd = ceil(W / 2)`` (row-major,
  which is also ascending position order);
* src index = rank of the position among src positions in row-major order;
* kept tokens = all dst tokens, then the unmerged src tokens in ascending src order.

``window="local"`` restricts a src token's candidates to the dst tokens of the 3x3 blocks
around its own block, so its choice fits a 4-bit code: 0 = kept, ``1 + (dy+1)*3 + (dx+1)``
for neighbour offset ``(dy, dx)``. ``window="global"`` allows any dst token and sends a src
bitmask plus a uint16/uint32 dst index per merged token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from tandem.codec.container import CodecError
from tandem.codec.spec import (  # noqa: F401  (merge_count, packed_plan_size re-exported)
    WINDOWS,
    Window,
    check_grid,
    check_ratio,
    check_window,
    global_index_bytes,
    merge_count,
    packed_plan_size,
)

MergeMode = Literal["mean", "variance_preserving"]

MERGE_MODES: tuple[str, ...] = ("mean", "variance_preserving")

# Neighbour block offsets (dy, dx); the local code of offset k is k + 1 (0 means "kept").
_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_OFFSET_DY = np.array([dy for dy, _ in _OFFSETS], dtype=np.int64)
_OFFSET_DX = np.array([dx for _, dx in _OFFSETS], dtype=np.int64)
# Similarity ties go to the src token's own block first: it is the spatially closest dst.
_SEARCH_ORDER = np.array([4, 0, 1, 2, 3, 5, 6, 7, 8], dtype=np.int64)
_MAX_LOCAL_CODE = len(_OFFSETS)
# Rows of the global similarity matrix computed at once (bounds memory to ~32 MB float64).
_GLOBAL_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True, eq=False)
class _Layout:
    """Index bookkeeping of the fixed dst/src partition of an ``H x W`` grid."""

    height: int
    width: int
    hd: int  # blocks per column (= dst rows)
    wd: int  # blocks per row (= dst columns)
    dst_pos: np.ndarray  # [n_dst] flat positions of dst tokens
    src_pos: np.ndarray  # [n_src] flat positions of src tokens
    src_by: np.ndarray  # [n_src] block row of each src token
    src_bx: np.ndarray  # [n_src] block column of each src token

    @property
    def n_dst(self) -> int:
        return self.hd * self.wd

    @property
    def n_src(self) -> int:
        return self.height * self.width - self.n_dst


@lru_cache(maxsize=64)
def _layout(height: int, width: int) -> _Layout:
    ys, xs = np.divmod(np.arange(height * width, dtype=np.int64), width)
    is_dst = (ys % 2 == 0) & (xs % 2 == 0)
    src_pos = np.flatnonzero(~is_dst)
    arrays = {
        "dst_pos": np.flatnonzero(is_dst),
        "src_pos": src_pos,
        "src_by": ys[src_pos] // 2,
        "src_bx": xs[src_pos] // 2,
    }
    for arr in arrays.values():
        arr.flags.writeable = False  # shared through the cache
    return _Layout(height, width, (height + 1) // 2, (width + 1) // 2, **arrays)


@dataclass(frozen=True)
class MergePlan:
    """Which src tokens are merged, and into which dst token.

    ``merged_src`` holds src indices in strictly ascending order (a canonical form, so equal
    plans compare equal and pack to equal bytes); ``merged_dst[i]`` is the dst index that
    ``merged_src[i]`` merges into. Construction validates consistency with the grid/window.
    """

    H: int
    W: int
    window: str
    merged_src: tuple[int, ...]
    merged_dst: tuple[int, ...]

    def __post_init__(self) -> None:
        check_grid(self.H, self.W)
        check_window(self.window)
        if len(self.merged_src) != len(self.merged_dst):
            raise CodecError(
                f"invalid merge plan: {len(self.merged_src)} merged src tokens but "
                f"{len(self.merged_dst)} dst indices"
            )
        _validate_assignment(self, self.src_index, self.dst_index)

    @property
    def n_src(self) -> int:
        return _layout(self.H, self.W).n_src

    @property
    def n_dst(self) -> int:
        return _layout(self.H, self.W).n_dst

    @property
    def n_merged(self) -> int:
        return len(self.merged_src)

    @property
    def n_kept(self) -> int:
        """Tokens that :func:`merge` outputs (and that have to be transmitted)."""
        return self.H * self.W - self.n_merged

    @cached_property
    def src_index(self) -> np.ndarray:
        """``merged_src`` as an int64 array (cached; cached_property bypasses frozen-ness)."""
        arr = np.asarray(self.merged_src, dtype=np.int64).reshape(-1)
        arr.flags.writeable = False
        return arr

    @cached_property
    def dst_index(self) -> np.ndarray:
        """``merged_dst`` as an int64 array (cached)."""
        arr = np.asarray(self.merged_dst, dtype=np.int64).reshape(-1)
        arr.flags.writeable = False
        return arr

    @cached_property
    def kept_src_index(self) -> np.ndarray:
        """Src indices that are not merged, ascending."""
        mask = np.ones(self.n_src, dtype=bool)
        mask[self.src_index] = False
        arr = np.flatnonzero(mask)
        arr.flags.writeable = False
        return arr


def plan_merge(latent: Tensor, ratio: float, window: Window = "local") -> MergePlan:
    """Choose which src tokens of ``latent`` ``[C, H, W]`` to merge at ``ratio``."""
    _check_latent(latent)
    check_window(window)
    _, height, width = latent.shape
    m = merge_count(height, width, ratio)
    if m == 0:
        return MergePlan(height, width, window, (), ())
    layout = _layout(height, width)
    tokens = _unit_tokens(latent)
    if window == "local":
        best_sim, best_dst = _local_best(tokens, layout)
    else:
        best_sim, best_dst = _global_best(tokens, layout)
    # Stable sort: equal similarities keep ascending src order, so the plan is deterministic.
    chosen = np.sort(np.argsort(-best_sim, kind="stable")[:m])
    return MergePlan(
        height, width, window, tuple(chosen.tolist()), tuple(best_dst[chosen].tolist())
    )


def merge(latent: Tensor, plan: MergePlan, mode: MergeMode = "mean") -> Tensor:
    """Merge ``latent`` ``[C, H, W]`` by ``plan`` into ``[C, plan.n_kept]``.

    ``mode="mean"`` averages a dst token with its merged src tokens. ``"variance_preserving"``
    divides the sum by ``sqrt(n)`` instead, so iid unit-variance noise keeps unit variance
    after :func:`unmerge` copies it back (the mean would shrink it by ``1/sqrt(n)``).
    """
    _check_latent(latent)
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown merge mode {mode!r}; valid modes: {', '.join(MERGE_MODES)}")
    _check_plan_matches(plan, latent.shape[1], latent.shape[2])
    layout = _layout(plan.H, plan.W)
    flat = latent.reshape(latent.shape[0], -1)
    device = latent.device
    dst = flat[:, _to_index(layout.dst_pos, device)]
    kept_src = flat[:, _to_index(layout.src_pos[plan.kept_src_index], device)]
    if plan.n_merged:
        dst = _merge_into_dst(flat, dst, plan, layout, mode)
    return torch.cat([dst, kept_src], dim=1)


def unmerge(kept: Tensor, plan: MergePlan) -> Tensor:
    """Inverse of :func:`merge` up to the merging: ``[C, n_kept]`` -> ``[C, H, W]``."""
    if kept.dim() != 2 or kept.shape[1] != plan.n_kept:
        raise ValueError(
            f"kept tokens must be [C, {plan.n_kept}] for this plan, got {list(kept.shape)}"
        )
    layout = _layout(plan.H, plan.W)
    device = kept.device
    out = kept.new_empty(kept.shape[0], plan.H * plan.W)
    out[:, _to_index(layout.dst_pos, device)] = kept[:, : plan.n_dst]
    out[:, _to_index(layout.src_pos[plan.kept_src_index], device)] = kept[:, plan.n_dst :]
    if plan.n_merged:
        merged_pos = _to_index(layout.src_pos[plan.src_index], device)
        out[:, merged_pos] = kept[:, _to_index(plan.dst_index, device)]
    return out.reshape(kept.shape[0], plan.H, plan.W)


def pack_plan(plan: MergePlan) -> bytes:
    """Compact encoding of ``plan`` (H, W and window travel separately, e.g. in metadata)."""
    layout = _layout(plan.H, plan.W)
    if plan.window == "local":
        return _pack_local(plan, layout)
    mask = np.zeros(layout.n_src, dtype=bool)
    mask[plan.src_index] = True
    dst = plan.dst_index.astype(_global_index_dtype(layout.n_dst))
    return np.packbits(mask, bitorder="little").tobytes() + dst.tobytes()


def unpack_plan(
    data: bytes, H: int, W: int, window: Window, ratio: float | None = None
) -> MergePlan:
    """Decode :func:`pack_plan` output; with ``ratio``, also check the merged count matches."""
    check_grid(H, W)
    check_window(window)
    layout = _layout(H, W)
    if window == "local":
        src, dst = _unpack_local(bytes(data), layout)
    else:
        src, dst = _unpack_global(bytes(data), layout)
    if ratio is not None:
        expected = merge_count(H, W, ratio)
        if len(src) != expected:
            raise CodecError(
                f"merge plan has {len(src)} merged tokens but ratio {ratio} on {H}x{W} "
                f"implies {expected}"
            )
    return MergePlan(H, W, window, tuple(src.tolist()), tuple(dst.tolist()))


# --- similarity -------------------------------------------------------------------------


def _unit_tokens(latent: Tensor) -> np.ndarray:
    """``[H*W, C]`` float64 unit-norm token features (zero tokens stay zero, NaN -> 0)."""
    feats = latent.detach().to("cpu", torch.float64).reshape(latent.shape[0], -1).T.numpy()
    feats = np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def _local_best(tokens: np.ndarray, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity and dst index per src among its 3x3 neighbouring blocks."""
    channels = tokens.shape[1]
    grid = np.zeros((layout.hd + 2, layout.wd + 2, channels))
    grid[1:-1, 1:-1] = tokens[layout.dst_pos].reshape(layout.hd, layout.wd, channels)
    valid = np.zeros((layout.hd + 2, layout.wd + 2), dtype=bool)
    valid[1:-1, 1:-1] = True
    src = tokens[layout.src_pos]
    sims = np.empty((layout.n_src, len(_SEARCH_ORDER)))
    for j, k in enumerate(_SEARCH_ORDER):
        yy = layout.src_by + _OFFSET_DY[k] + 1
        xx = layout.src_bx + _OFFSET_DX[k] + 1
        sims[:, j] = np.where(valid[yy, xx], np.einsum("nc,nc->n", src, grid[yy, xx]), -np.inf)
    best_j = np.argmax(sims, axis=1)  # first maximum: own block wins ties
    best_sim = sims[np.arange(layout.n_src), best_j]
    k = _SEARCH_ORDER[best_j]
    best_dst = (layout.src_by + _OFFSET_DY[k]) * layout.wd + layout.src_bx + _OFFSET_DX[k]
    return best_sim, best_dst


def _global_best(tokens: np.ndarray, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine similarity and dst index per src over all dst tokens (chunked matmul)."""
    src = tokens[layout.src_pos]
    dst_t = tokens[layout.dst_pos].T.copy()
    best_sim = np.empty(layout.n_src)
    best_dst = np.empty(layout.n_src, dtype=np.int64)
    rows = max(1, _GLOBAL_CHUNK_ELEMS // max(1, layout.n_dst))
    for start in range(0, layout.n_src, rows):
        sims = src[start : start + rows] @ dst_t
        idx = np.argmax(sims, axis=1)  # first maximum: lowest dst index wins ties
        best_dst[start : start + rows] = idx
        best_sim[start : start + rows] = sims[np.arange(len(idx)), idx]
    return best_sim, best_dst


# --- merging ----------------------------------------------------------------------------


def _merge_into_dst(
    flat: Tensor, dst: Tensor, plan: MergePlan, layout: _Layout, mode: str
) -> Tensor:
    """Combine each dst token with the src tokens merged into it."""
    device = flat.device
    # float64 accumulation keeps small sums exact (a constant block averages to itself);
    # MPS has no float64, so fall back to float32 there.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    dst_idx = _to_index(plan.dst_index, device)
    src_vals = flat[:, _to_index(layout.src_pos[plan.src_index], device)].to(acc_dtype)
    acc = dst.to(acc_dtype).index_add(1, dst_idx, src_vals)
    counts = torch.ones(layout.n_dst, dtype=acc_dtype, device=device)
    counts = counts.index_add(0, dst_idx, torch.ones_like(dst_idx, dtype=acc_dtype))
    divisor = counts if mode == "mean" else counts.sqrt()
    combined = (acc / divisor).to(flat.dtype)
    # Untouched dst tokens are passed through as-is so they stay bitwise exact (even -0.0).
    return torch.where(counts > 1, combined, dst)


def _to_index(arr: np.ndarray, device: torch.device) -> Tensor:
    # Copy: the cached index arrays are read-only and torch wants writable memory.
    return torch.from_numpy(np.array(arr, dtype=np.int64)).to(device)


# --- plan encoding ----------------------------------------------------------------------


def _global_index_dtype(n_dst: int) -> np.dtype:
    return np.dtype("<u2") if global_index_bytes(n_dst) == 2 else np.dtype("<u4")


def _pack_local(plan: MergePlan, layout: _Layout) -> bytes:
    codes = np.zeros(layout.n_src + (layout.n_src % 2), dtype=np.uint8)
    if plan.n_merged:
        src = plan.src_index
        dst_by, dst_bx = np.divmod(plan.dst_index, layout.wd)
        dy = dst_by - layout.src_by[src]
        dx = dst_bx - layout.src_bx[src]
        codes[src] = (dy + 1) * 3 + (dx + 1) + 1
    # Two codes per byte, the lower-indexed src token in the low nibble.
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_local(data: bytes, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    expected = (layout.n_src + 1) // 2
    if len(data) != expected:
        raise CodecError(
            f"local merge plan for {layout.height}x{layout.width} must be {expected} bytes, "
            f"got {len(data)}"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    codes = np.empty(2 * len(raw), dtype=np.int64)
    codes[0::2] = raw & 0x0F
    codes[1::2] = raw >> 4
    if layout.n_src % 2 and codes[-1] != 0:
        raise CodecError("local merge plan has a non-zero padding nibble")
    codes = codes[: layout.n_src]
    bad = np.flatnonzero(codes > _MAX_LOCAL_CODE)
    if bad.size:
        raise CodecError(
            f"local merge plan: src token {bad[0]} has code {codes[bad[0]]} "
            f"(valid: 0..{_MAX_LOCAL_CODE})"
        )
    src = np.flatnonzero(codes)
    k = codes[src] - 1
    by = layout.src_by[src] + _OFFSET_DY[k]
    bx = layout.src_bx[src] + _OFFSET_DX[k]
    outside = np.flatnonzero((by < 0) | (by >= layout.hd) | (bx < 0) | (bx >= layout.wd))
    if outside.size:
        i = src[outside[0]]
        raise CodecError(
            f"local merge plan: src token {i} refers to neighbour code {codes[i]}, "
            f"which is outside the {layout.height}x{layout.width} grid"
        )
    return src, by * layout.wd + bx


def _unpack_global(data: bytes, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    mask_bytes = (layout.n_src + 7) // 8
    if len(data) < mask_bytes:
        raise CodecError(
            f"global merge plan for {layout.height}x{layout.width} needs at least "
            f"{mask_bytes} bytes of src mask, got {len(data)}"
        )
    bits = np.unpackbits(np.frombuffer(data[:mask_bytes], dtype=np.uint8), bitorder="little")
    if bits[layout.n_src :].any():
        raise CodecError("global merge plan has non-zero padding bits in its src mask")
    src = np.flatnonzero(bits[: layout.n_src])
    index_dtype = _global_index_dtype(layout.n_dst)
    expected = mask_bytes + len(src) * index_dtype.itemsize
    if len(data) != expected:
        raise CodecError(
            f"global merge plan with {len(src)} merged tokens must be {expected} bytes, "
            f"got {len(data)}"
        )
    dst = np.frombuffer(data, dtype=index_dtype, offset=mask_bytes).astype(np.int64)
    if dst.size and dst.max() >= layout.n_dst:
        raise CodecError(
            f"global merge plan: dst index {dst.max()} out of range (n_dst = {layout.n_dst})"
        )
    return src, dst


# --- validation -------------------------------------------------------------------------


def _validate_assignment(plan: MergePlan, src: np.ndarray, dst: np.ndarray) -> None:
    layout = _layout(plan.H, plan.W)
    if src.size == 0:
        return
    if src[0] < 0 or src[-1] >= layout.n_src or (np.diff(src) <= 0).any():
        raise CodecError(
            f"invalid merge plan: merged src indices must be strictly ascending in "
            f"[0, {layout.n_src})"
        )
    if dst.min() < 0 or dst.max() >= layout.n_dst:
        raise CodecError(f"invalid merge plan: dst indices must be in [0, {layout.n_dst})")
    if plan.window == "local":
        dst_by, dst_bx = np.divmod(dst, layout.wd)
        far = (np.abs(dst_by - layout.src_by[src]) > 1) | (np.abs(dst_bx - layout.src_bx[src]) > 1)
        if far.any():
            raise CodecError(
                f"invalid merge plan: src token {src[far][0]} merges into dst "
                f"{dst[far][0]}, outside its local 3x3 block window"
            )


def _check_latent(latent: Tensor) -> None:
    if latent.dim() != 3:
        raise ValueError(f"latent must be [C, H, W], got shape {list(latent.shape)}")
    if not latent.is_floating_point():
        raise ValueError(f"latent must be a floating point tensor, got {latent.dtype}")


def _check_plan_matches(plan: MergePlan, height: int, width: int) -> None:
    if (plan.H, plan.W) != (height, width):
        raise ValueError(f"plan is for {plan.H}x{plan.W} but the latent is {height}x{width}")
