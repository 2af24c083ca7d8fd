"""The edge's traced UNet (issue 18, item 1): the same numbers as the eager UNet, for any batch
size and shape; a shape whose trace differs or fails runs eager; the engine's handoffs do not
depend on it; GPUs keep the eager UNet; the server's flag."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from test_edge_engine_efficiency import req, run_engine

from tandem.handoff import CodecSpec
from tandem.sampling.denoise import advance
from tandem.traced import TracedUNet, call_fast


def unet_inputs(pack, n: int, side: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    channels, height, width = pack.latent_shape(side, side)
    hidden = pack.text_encoder.config.hidden_size
    return (torch.randn(n, channels, height, width, generator=g), torch.randint(0, 999, (n,), generator=g).float(),
            torch.randn(n, pack.tokenizer.model_max_length, hidden, generator=g))


def eager(pack, inputs):
    return pack.unet(*inputs, return_dict=False)[0]


@torch.no_grad()
def test_the_trace_gives_the_eager_unets_numbers_at_any_batch_size_and_shape(large_pack):
    traced = TracedUNet(large_pack.unet)
    for n, side in [(4, 32), (1, 32), (7, 32), (2, 48), (5, 48), (4, 32)]:
        inputs = unet_inputs(large_pack, n, side, seed=n + side)
        assert torch.equal(traced(*inputs, return_dict=False)[0], eager(large_pack, inputs)), (n, side)
    assert traced.traced_shapes == 2  # one trace per latent shape; the batch size is free


@torch.no_grad()
def test_a_shape_whose_trace_differs_or_fails_runs_eager(large_pack, monkeypatch, caplog):
    real_trace = torch.jit.trace

    def off_by_a_little(fn, example, **kw):
        trace = real_trace(fn, example, **kw)
        return lambda *args: trace(*args) + 1e-6

    traced = TracedUNet(large_pack.unet)
    monkeypatch.setattr(torch.jit, "trace", off_by_a_little)
    inputs = unet_inputs(large_pack, 3)
    with caplog.at_level(logging.WARNING, logger="tandem.traced"):
        for _ in range(2):
            assert torch.equal(traced(*inputs)[0], eager(large_pack, inputs))
    assert traced.traced_shapes == 0 and "differs from the eager one" in caplog.text

    def untraceable(fn, example, **kw):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    inputs = unet_inputs(large_pack, 2, side=48)
    assert torch.equal(traced(*inputs)[0], eager(large_pack, inputs))
    assert traced.traced_shapes == 0 and "cannot trace this" in caplog.text


@torch.no_grad()
def test_a_trace_that_differs_at_another_batch_size_runs_eager_from_then_on(large_pack, monkeypatch, caplog):
    """A trace is checked at every batch size it meets, once: one that read its first batch size
    as a constant (here: wrong from the second batch size on, or failing) never serves wrong numbers."""
    real_trace = torch.jit.trace

    def batch_bound(fn, example, **kw):
        trace, first = real_trace(fn, example, **kw), example[0].shape[0]
        return lambda *args: trace(*args) + (0.0 if args[0].shape[0] == first else 1e-6)

    def failing_elsewhere(fn, example, **kw):
        trace, first = real_trace(fn, example, **kw), example[0].shape[0]

        def call(*args):
            if args[0].shape[0] != first:
                raise RuntimeError("shape '[3, 16]' is invalid")
            return trace(*args)
        return call

    for fake, message in ((batch_bound, "differs from the eager one at batch size 5"),
                          (failing_elsewhere, "failed at batch size 5")):
        monkeypatch.setattr(torch.jit, "trace", fake)
        traced = TracedUNet(large_pack.unet)
        with caplog.at_level(logging.WARNING, logger="tandem.traced"):
            for n in (3, 3, 5, 5, 3):
                inputs = unet_inputs(large_pack, n, seed=n)
                assert torch.equal(traced(*inputs)[0], eager(large_pack, inputs)), (fake.__name__, n)
        assert traced.traced_shapes == 0 and message in caplog.text


def test_the_engines_handoffs_do_not_depend_on_the_trace(large_pack):
    from services.edge_server.engine import Finished

    # Mixed shapes, samplers, guidance and splits, so calls of several batch sizes and shapes run.
    requests = [req(0), req(1, height=48, width=48), req(2, guidance_scale=1.0), req(3, sampler="ddim", steps=9, split=5),
                req(4, negative_prompt="blurry"), req(5, height=48, width=48, split=3)]
    payloads = {}
    for trace in (True, False):
        engine, events = run_engine(large_pack, requests, trace_unet=trace)
        assert isinstance(engine.unet, TracedUNet) == trace
        payloads[trace] = [next(e.payload for e in events[i] if isinstance(e, Finished)) for i in range(len(requests))]
    assert payloads[True] == payloads[False]


@torch.no_grad()
def test_advance_with_the_trace_equals_advance_eager(large_pack):
    from services.edge_server.conditioning import Starter

    starter = Starter(large_pack)
    states = {name: [s.state for s in starter.start([req(i) for i in range(3)])] for name in ("traced", "eager")}
    traced = TracedUNet(large_pack.unet)
    for _ in range(4):
        advance(traced, states["traced"])
        advance(large_pack.unet, states["eager"])
    for ours, theirs in zip(states["traced"], states["eager"]):
        assert torch.equal(ours.latent, theirs.latent)


def test_a_gpu_or_a_disabled_trace_keeps_the_unet_as_loaded(large_pack):
    assert call_fast(large_pack.unet, torch.device("cuda"), True) is large_pack.unet
    assert call_fast(large_pack.unet, torch.device("cpu"), False) is large_pack.unet
    assert isinstance(call_fast(large_pack.unet, torch.device("cpu"), True), TracedUNet)
    # engines on one pack share its traces
    assert call_fast(large_pack.unet, torch.device("cpu"), True) is call_fast(large_pack.unet, torch.device("cpu"), True)


@pytest.mark.parametrize("argv,env,expected", [([], None, True), (["--no-trace-unet"], None, False),
                                               ([], "0", False), ([], "false", False), (["--trace-unet"], "0", True)])
def test_the_server_flag_and_its_environment_variable(monkeypatch, argv, env, expected):
    from services.edge_server.server import parse_args

    if env is not None:
        monkeypatch.setenv("TANDEM_EDGE_TRACE_UNET", env)
    assert parse_args(argv).trace_unet is expected


def test_warming_up_traces_the_packs_default_shape_before_any_request(large_pack, monkeypatch):
    from services.edge_server.engine import EdgeEngine
    from tandem.traced import TRACED_ATTRIBUTE

    monkeypatch.delattr(large_pack.unet, TRACED_ATTRIBUTE, raising=False)  # other tests' traces of this pack
    for trace, shapes in ((True, 1), (False, None)):
        engine = EdgeEngine(large_pack, trace_unet=trace)
        engine.warm_up()
        assert getattr(engine.unet, "traced_shapes", None) == shapes
    # the default request's first step is then a checked, traced call: no trace in it
    size = large_pack.default_image_size
    engine, events = run_engine(large_pack, [req(0, height=size, width=size, guidance_scale=large_pack.manifest.default_guidance)])
    assert engine.unet.traced_shapes == 1


def test_a_warm_engine_traces_no_new_shape_and_leaves_the_shared_traces_alone(large_pack, monkeypatch):
    """A shape first met while serving runs eager in the engine (a trace in the serving loop made
    every request of its iteration wait); the pack's shared TracedUNet, called directly, still
    traces it, so one engine's warm-up changes nothing for another caller."""
    from services.edge_server.engine import EdgeEngine, Failed, Finished
    from tandem.traced import TRACED_ATTRIBUTE, FrozenTrace

    monkeypatch.delattr(large_pack.unet, TRACED_ATTRIBUTE, raising=False)
    engine = EdgeEngine(large_pack, trace_unet=True)
    engine.warm_up()
    assert isinstance(engine.unet, FrozenTrace) and engine.unet.traced_shapes == 1
    odd = req(0, height=large_pack.default_image_size + 8, width=large_pack.default_image_size + 8)
    engine.start()
    try:
        events: list = []
        engine.submit(odd, CodecSpec(), events.append)
        deadline = time.monotonic() + 60
        while not any(isinstance(e, (Finished, Failed)) for e in events):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.stop()
    assert any(isinstance(e, Finished) for e in events)
    assert engine.unet.traced_shapes == 1  # the odd shape ran eager
    shared = call_fast(large_pack.unet, torch.device("cpu"), True)
    with torch.no_grad():
        shared(*unet_inputs(large_pack, 1, side=large_pack.default_image_size + 8), return_dict=False)
    assert shared.traced_shapes == 2


@torch.no_grad()
def test_a_packs_traces_go_when_the_pack_goes(tiny_packs):
    """The traces live on the UNet they trace (not in a map that holds the UNet): once a pack is
    dropped, its UNet, its TracedUNet and the traced graphs are all freed."""
    import gc
    import weakref

    from tandem.packs import load_pack

    pack = load_pack(tiny_packs["large"], device="cpu")
    traced = call_fast(pack.unet, torch.device("cpu"), True)
    traced(*unet_inputs(pack, 2), return_dict=False)  # one shape traced and checked
    assert traced.traced_shapes == 1
    refs = [weakref.ref(pack.unet), weakref.ref(traced)]
    del pack, traced
    gc.collect()
    assert [r() for r in refs] == [None, None]
