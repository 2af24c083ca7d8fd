"""CUDA graphs for the training stages.

These models are tiny, so an eager step is bound by kernel launches (measured on an H100:
~7 steps/s for the large UNet whatever the batch size). Replaying the forward and backward
as CUDA graphs removes that overhead; every batch has the same shape, as graphs require.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tandem.demo.tokenizer import MAX_LENGTH
from tools.demo_pack.models import LATENT_CHANNELS, LATENT_SIZE
from tools.demo_pack.runs import Run, autocast


class EpsModel(torch.nn.Module):
    """A UNet's noise prediction under autocast, as one module that can be captured."""

    def __init__(self, unet: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.unet = unet
        self.device = device

    def forward(self, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.unet(xt, t, context).sample.float()


def eps_sample_args(batch: int, context_dim: int, device: torch.device,
                    context_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Example (x_t, t, context) inputs of EpsModel, for capturing it."""
    context = torch.zeros((batch, MAX_LENGTH, context_dim), device=device,
                          requires_grad=context_grad)
    return (torch.zeros((batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), device=device),
            torch.full((batch,), 500, device=device, dtype=torch.long), context)


def graphed_for_training(module: torch.nn.Module, sample_args: tuple[torch.Tensor, ...],
                         run: "Run") -> Callable:
    """`module` with forward and backward replayed as CUDA graphs (in train mode; eval mode
    runs eagerly); the module itself off CUDA, with --no-cuda-graphs, or if capture fails."""
    if run.device.type != "cuda" or not run.args.cuda_graphs:
        return module
    try:
        return torch.cuda.make_graphed_callables(module, sample_args, allow_unused_input=True)
    except Exception as exc:  # fall back rather than fail the run: eager is only slower
        run.log.event(event="cuda_graphs_failed", module=type(module).__name__,
                      error=repr(exc)[:500])
        return module


class CapturedInference:
    """A frozen model's forward captured once as a CUDA graph; each call copies the inputs into
    the captured buffers and replays. The output buffer is reused: use it before the next call."""

    def __init__(self, fn: Callable, sample_args: tuple[torch.Tensor, ...]) -> None:
        self.inputs = [a.detach().clone() for a in sample_args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):  # warm-up (cuDNN autotuning, lazy init) outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.output = fn(*self.inputs)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, args):
            buffer.copy_(value)
        self.graph.replay()
        return self.output


def captured_for_inference(fn: Callable, sample_args: tuple[torch.Tensor, ...],
                           run: "Run") -> Callable:
    """CapturedInference of `fn` on CUDA; `fn` itself elsewhere or if capture fails."""
    if run.device.type != "cuda" or not run.args.cuda_graphs:
        return fn
    try:
        return CapturedInference(fn, sample_args)
    except Exception as exc:
        run.log.event(event="cuda_graphs_failed", module=type(fn).__name__, error=repr(exc)[:500])
        return fn
