"""Weights held as stored: a component whose weights are stored narrower than the dtype it computes
in (fp16 files on a CPU that computes in fp32) is loaded in the stored dtype and keeps each conv and
linear weight so; the weight reads as a widened copy while its layer runs (a torch
parametrization: nothing is narrowed back, no copy outlives the call). Everything else is widened
once: norms, biases, embeddings, and a UNet's conv_in, whose dtype tandem.sampling.denoise.placement
reads as the compute dtype. Every value came from the stored dtype, so widening is exact: the same
images as weights loaded in the compute dtype, for about half their memory (a device's choice:
--compact-weights; each call pays for its widened copies)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.nn.utils import parametrize

# safetensors' names of the floating dtypes a pack's weights come in, as torch names them
STORED_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
NARROW_LAYERS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


class CompactError(ValueError):
    """A component's weight file that cannot be read."""


def stored_dtype(directory: Path) -> torch.dtype | None:
    """The one dtype every floating tensor of a component's safetensors files is stored in (None:
    mixed, another kind, or no such file), read from the files' headers alone."""
    stored: set[str] = set()
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                stored |= {f.get_slice(k).get_dtype() for k in f.keys()}
        except SafetensorError as exc:
            raise CompactError(f"{path}: unreadable safetensors file ({exc})") from exc
    floating = stored & set(STORED_FLOATS)
    return STORED_FLOATS[floating.pop()] if len(floating) == 1 else None


class Widened(torch.nn.Module):
    """A stored weight, read in the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def compact(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module`, loaded in its weights' stored dtype, made to compute in `dtype` (see above)."""
    for name, layer in list(module.named_modules()):  # listed first: parametrizing adds modules
        narrow = isinstance(layer, NARROW_LAYERS) and name != "conv_in" and "norm" not in name
        for key, tensor in (*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)):
            if not tensor.is_floating_point():
                continue
            if narrow and key == "weight":
                parametrize.register_parametrization(layer, key, Widened(dtype), unsafe=True)
            else:
                tensor.data = tensor.data.to(dtype)
