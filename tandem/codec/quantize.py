"""Tensor encodings to and from bytes: fp32 (lossless), fp16, and per-channel int8.

Everything is little endian and numpy based so that the byte layout does not depend on the
host or on torch's serialization. The channel axis is dim 0.

int8 layout: ``C`` fp32 scales, then ``numel`` int8 values in C order. ``scale[c] =
max|x[c]| / 127`` (1.0 for an all-zero channel) and ``q = round(x / scale)`` clamped to
``[-127, 127]``, so the reconstruction error is at most ``scale[c] / 2`` per element.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tandem.codec.container import CodecError
from tandem.codec.spec import ENCODINGS, check_encoding, check_shape, encoded_size  # noqa: F401  (re-exported)

_FLOAT_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2")}
_SCALE_DTYPE = np.dtype("<f4")
_INT8_MAX = 127


def encode_tensor(x: Tensor, encoding: str) -> bytes:
    """Encode ``x`` (any float tensor, any device) as bytes."""
    check_encoding(encoding)
    check_shape(tuple(x.shape), encoding)
    arr = x.detach().to("cpu", torch.float32).numpy()
    if encoding == "int8":
        return _encode_int8(arr)
    return arr.astype(_FLOAT_DTYPES[encoding]).tobytes()


def decode_tensor(data: bytes, encoding: str, shape: Sequence[int]) -> Tensor:
    """Decode bytes made by :func:`encode_tensor` into a float32 CPU tensor of ``shape``."""
    expected = encoded_size(shape, encoding)
    dims = tuple(int(d) for d in shape)
    if len(data) != expected:
        raise CodecError(
            f"{encoding} tensor of shape {list(dims)} needs {expected} bytes, got {len(data)}"
        )
    if encoding == "int8":
        arr = _decode_int8(data, dims)
    else:
        arr = np.frombuffer(data, dtype=_FLOAT_DTYPES[encoding]).astype(np.float32)
    return torch.from_numpy(arr.reshape(dims))


def int8_scales(x: Tensor) -> Tensor:
    """Per-channel int8 scales of ``x`` as float32 (exactly what :func:`encode_tensor` stores)."""
    check_shape(tuple(x.shape), "int8")
    arr = x.detach().to("cpu", torch.float32).numpy()
    return torch.from_numpy(_channel_scales(arr.reshape(arr.shape[0], -1)))


def _encode_int8(arr: np.ndarray) -> bytes:
    if not np.isfinite(arr).all():
        raise ValueError("int8 encoding needs finite values (got NaN or inf)")
    flat = arr.reshape(arr.shape[0], -1).astype(np.float64)
    scales = _channel_scales(flat)
    q = np.clip(np.rint(flat / scales[:, None].astype(np.float64)), -_INT8_MAX, _INT8_MAX)
    return scales.astype(_SCALE_DTYPE).tobytes() + q.astype(np.int8).tobytes()


def _channel_scales(flat: np.ndarray) -> np.ndarray:
    amax = np.max(np.abs(flat), axis=1, initial=0.0).astype(np.float64)
    scales = (amax / _INT8_MAX).astype(np.float32)
    # Zero channels, and ones so tiny the scale underflows float32, would divide by zero.
    scales[scales == 0] = 1.0
    return scales


def _decode_int8(data: bytes, dims: tuple[int, ...]) -> np.ndarray:
    channels = dims[0]
    head = channels * _SCALE_DTYPE.itemsize
    scales = np.frombuffer(data, dtype=_SCALE_DTYPE, count=channels).astype(np.float64)
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise CodecError("int8 tensor has a non-finite or non-positive channel scale")
    q = np.frombuffer(data, dtype=np.int8, offset=head).reshape(channels, -1)
    if (q == -_INT8_MAX - 1).any():
        raise CodecError("int8 tensor contains -128, which the encoder never produces")
    return (q.astype(np.float64) * scales[:, None]).astype(np.float32)
