"""A UNet call without Python between the kernels (the edge's, and the cost profiler's measure of it): a TorchScript trace, checked equal.

On a CPU a small UNet spends much of each call in Python: diffusers' forward walks hundreds of
modules, the same for a batch of 1 as of 16, and that is most of the step's fixed cost a in
a + b·n (the demo pack on one thread: a one-request step 20 ms eager, 12 ms traced). A trace
records the aten calls once and replays them: the same kernels on the same inputs in the same
order, so the same numbers. Each input shape's trace is checked on its first use against the
eager UNet with `torch.equal`, twice (TorchScript optimizes the graph after its first run), and
again once at every other batch size it meets (a trace may have read the batch size as a
constant); a shape whose trace differs or fails at any batch size keeps the eager UNet from then
on, so the images never change. CPU only (TorchScript fuses nothing on a CPU unless told to): on a GPU, launch overhead is CUDA
graphs' job, and TorchScript's GPU fusers would change the numbers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.lru import Lru

log = logging.getLogger(__name__)

TRACED_ATTRIBUTE = "_tandem_traced"
Key = tuple[tuple[int, ...], torch.dtype, tuple[int, ...], torch.dtype, int]


@dataclass
class _ShapeCall:
    """How one input shape runs: its trace, or the eager UNet; and the batch sizes checked."""

    call: Callable[..., torch.Tensor]
    batches: set[int] = field(default_factory=set)


class TracedUNet:
    """Called as diffusers' UNet2DConditionModel is by `tandem.sampling.denoise.predict_noise`."""

    def __init__(self, unet: torch.nn.Module, max_shapes: int = 16):
        self.unet = unet
        first = next(unet.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._shapes: Lru[Key, _ShapeCall] = Lru(max_shapes)

    @property
    def traced_shapes(self) -> int:
        """Input shapes that run traced (tests read it)."""
        return sum(1 for _, shape in self._shapes.items() if shape.call != self._eager)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        return self.run(sample, timestep, encoder_hidden_states, may_trace=True)

    def frozen(self) -> "FrozenTrace":
        """This UNet as a server calls it once warm: the shapes traced so far stay traced, and one
        first met later runs eager, untraced. A trace and its checks make the iteration that meets
        the shape several UNet calls longer, and every request in that iteration waits for it (one
        user's odd-sized requests made the others' p99 3.3x the quiet one; eager, 1.4x)."""
        return FrozenTrace(self)

    def run(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
            may_trace: bool) -> tuple[torch.Tensor]:
        key = (tuple(sample.shape[1:]), sample.dtype, tuple(encoder_hidden_states.shape[1:]), timestep.dtype,
               timestep.dim())
        shape = self._shapes.get(key)
        if shape is None and not may_trace:
            return (self._eager(sample, timestep, encoder_hidden_states),)
        if shape is None:
            return (self._trace(key, sample, timestep, encoder_hidden_states),)
        if shape.call != self._eager and sample.shape[0] not in shape.batches:
            return (self._check(key, shape, sample, timestep, encoder_hidden_states),)
        return (shape.call(sample, timestep, encoder_hidden_states),)

    def _eager(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, hidden, return_dict=False)[0]

    def _trace(self, key: Key, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The eager output; traces this shape meanwhile (eager for good if the trace differs)."""
        eager = self._eager(sample, timestep, hidden)
        trace: Callable[..., torch.Tensor] = self._eager
        try:
            with warnings.catch_warnings():  # the tracer warns of every shape it reads as a constant
                warnings.simplefilter("ignore")
                candidate = torch.jit.trace(self._eager, (sample, timestep, hidden), check_trace=False)
            if all(torch.equal(candidate(sample, timestep, hidden), eager) for _ in range(2)):
                trace = candidate
            else:
                log.warning("the traced UNet differs from the eager one for inputs %s; running eager", key)
        except Exception:  # noqa: BLE001 - an untraceable UNet still serves, eager
            log.exception("could not trace the UNet for inputs %s; running eager", key)
        self._shapes.put(key, _ShapeCall(trace, {sample.shape[0]}))
        return eager

    def _check(self, key: Key, shape: _ShapeCall, sample: torch.Tensor, timestep: torch.Tensor,
               hidden: torch.Tensor) -> torch.Tensor:
        """The eager output at a batch size this shape's trace has not run at; the trace stays only
        if it gives the same numbers there too."""
        eager = self._eager(sample, timestep, hidden)
        try:
            same = torch.equal(shape.call(sample, timestep, hidden), eager)
        except Exception:  # noqa: BLE001 - e.g. a batch size the trace recorded as a constant
            log.exception("the traced UNet failed at batch size %d for inputs %s; running eager", sample.shape[0], key)
            same = False
        if same:
            shape.batches.add(sample.shape[0])
        else:
            log.warning("the traced UNet differs from the eager one at batch size %d for inputs %s; running eager",
                        sample.shape[0], key)
            shape.call = self._eager
        return eager


class FrozenTrace:
    """A TracedUNet that traces no new shape (TracedUNet.frozen); its traces are the shared ones."""

    def __init__(self, traced: TracedUNet):
        self.traced = traced
        self.device, self.dtype = traced.device, traced.dtype  # what denoise reads of a UNet

    @property
    def traced_shapes(self) -> int:
        return self.traced.traced_shapes

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        return self.traced.run(sample, timestep, encoder_hidden_states, may_trace=False)


def call_fast(unet: Any, device: torch.device, enabled: bool) -> Any:
    """The UNet the engine calls: a torch module traced on a CPU when `enabled`, else as given."""
    if enabled and device.type == "cpu" and isinstance(unet, torch.nn.Module) and next(unet.parameters(), None) is not None:
        # Engines on one pack share its traces (each costs a trace and a check); kept on the module,
        # so they go when the pack goes.
        traced = getattr(unet, TRACED_ATTRIBUTE, None)
        if traced is None:
            traced = TracedUNet(unet)
            setattr(unet, TRACED_ATTRIBUTE, traced)
        return traced
    return unet
