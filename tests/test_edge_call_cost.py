"""A request whose latent shape is not the batch's main one costs the others a whole extra UNet
call per iteration: the edge measures that call's fixed cost (call_cost.CallCostFit) and paces
such a request by it (engine._pace + batching.due), so it costs the others about one usual request;
its images stay the same."""

from __future__ import annotations

import pytest

from services.edge_server.batching import BatchConfig
from services.edge_server.call_cost import MAX_OVERHEAD_ROWS, CallCostFit
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest

PROMPT = "a red circle at the left on a blue background"


def test_the_fit_recovers_a_calls_fixed_cost_in_rows():
    fit = CallCostFit()
    for rows in (1, 2, 3, 5, 8) * 3:
        fit.observe(rows, 0.012 + 0.004 * rows)
    assert fit.overhead_rows == pytest.approx(3.0)


@pytest.mark.parametrize("calls", [
    [],  # nothing measured yet
    [(4, 0.1)] * 10,  # one batch size: no slope
    [(1, 0.05), (2, 0.04), (4, 0.03)],  # slower with fewer rows: noise, not a cost model
    [(1, 0.001), (2, 0.002), (4, 0.004)],  # no fixed cost at all (a compute-bound call)
])
def test_no_pacing_beyond_pixels_until_the_fit_is_meaningful(calls):
    fit = CallCostFit()
    for rows, seconds in calls:
        fit.observe(rows, seconds)
    assert fit.overhead_rows == pytest.approx(0.0, abs=1e-9)


def test_the_fit_follows_recent_calls_and_is_bounded():
    fit = CallCostFit(window=8)
    for rows in (1, 2) * 8:
        fit.observe(rows, 0.010 + 0.010 * rows)  # a = b: one row
    assert fit.overhead_rows == pytest.approx(1.0)
    for rows in (1, 2) * 4:
        fit.observe(rows, 1.0 + 0.001 * rows)  # the old calls are out of the window
    assert fit.overhead_rows == MAX_OVERHEAD_ROWS
    with pytest.raises(ValueError, match="window"):
        CallCostFit(window=1)


def test_a_shapes_own_measured_call_prices_its_requests():
    """An odd shape's last call (eager, say: a larger fixed cost than the fit of the usual calls)
    is what its requests pay, in usual rows; before it was measured, the fit's fixed cost."""
    fit = CallCostFit()
    for rows in (1, 2, 4, 8) * 3:
        fit.observe(rows, 0.012 + 0.004 * rows, shape="usual")
    assert fit.seconds_per_row == pytest.approx(0.004)
    assert fit.weight("odd", members=2, pixels=1.0) == pytest.approx(1.0 + 3.0 / 2)  # not measured yet
    fit.observe(2, 0.040, shape="odd")  # its own call: 40 ms for 2 requests, ~10 usual rows (it joins the fit too)
    assert fit.weight("odd", members=2, pixels=1.0) == pytest.approx(0.040 / (2 * fit.seconds_per_row))
    assert fit.weight("odd", members=2, pixels=1.0) > 1.0 + fit.overhead_rows / 2  # more than the fit's guess
    assert fit.weight("odd", members=1, pixels=12.0) == 12.0  # never below its pixels
    assert CallCostFit().weight("odd", members=1, pixels=1.5) == 1.5  # nothing known: pixels alone


def req(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, steps=14, split=12, sampler="ddim", guidance_scale=3.0, seed=5, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


def _run(engine, requests: dict[str, GenerationRequest], watch: str, after: int) -> tuple[dict[str, bytes], int]:
    """Runs `requests` to their handoffs; returns the payloads and the steps `watch` had made after
    `after` iterations."""
    from services.edge_server.engine import Failed, Finished

    payloads: dict[str, bytes] = {}
    entries = {}
    for name, request in requests.items():
        def sink(event, name=name) -> None:
            assert not isinstance(event, Failed), event
            if isinstance(event, Finished):
                payloads[name] = event.payload

        entries[name] = engine.submit(request, CodecSpec(), sink, owner=name)
    iterations, watched = 0, 0
    while len(payloads) < len(requests):
        engine.step()
        iterations += 1
        if iterations == after:
            entry = entries[watch]
            watched = entry.request.split if entry.done else entry.running.step  # a finished one let its state go
    return payloads, watched


CONFIG = BatchConfig(max_batch_size=8, coalesce_s=0.0, coalesce_max_s=0.0, max_growth=0.0)
USUAL = {f"usual{i}": req(seed=i) for i in range(3)}  # 32x32, 12 edge steps: 12 iterations
ODD = {"odd": req(seed=9, height=64, width=16)}  # as many pixels, another latent shape


class FixedCost:
    """A call's fixed cost as if measured, the same throughout a test."""

    def __init__(self, rows: float):
        self.overhead_rows = rows

    def observe(self, rows: float, seconds: float, shape=None) -> None:
        pass

    def weight(self, shape, members: int, pixels: float) -> float:
        return pixels + self.overhead_rows / members


def _engine(large_pack, fixed_cost_rows: float):
    from services.edge_server.engine import EdgeEngine

    engine = EdgeEngine(large_pack, CONFIG, trace_unet=False)
    engine.call_cost = FixedCost(fixed_cost_rows)
    return engine


def test_an_odd_shaped_request_is_paced_by_its_calls_fixed_cost_and_its_handoff_is_unchanged(large_pack):
    alone, _ = _run(_engine(large_pack, 0.0), ODD, "odd", 1)
    with_others, odd_steps = _run(_engine(large_pack, 3.0), {**USUAL, **ODD}, "odd", after=12)
    # Beside the usual batch it weighs 1 (pixels) + 3 (a call's fixed cost, alone in its call):
    # it steps at iterations 1, 5 and 9 of their 12 (the first at once), then every iteration.
    assert odd_steps == 3
    assert with_others["odd"] == alone["odd"]  # pacing changes when it steps, never its numbers


def test_two_odd_requests_share_their_calls_fixed_cost(large_pack):
    two = {"odd": ODD["odd"], "odd2": req(seed=10, height=64, width=16)}
    _, odd_steps = _run(_engine(large_pack, 3.0), {**USUAL, **two}, "odd", after=12)
    assert odd_steps == 5  # weight 1 + 3/2 each: iterations 1, 3, 6, 8 and 11 of 12


def test_without_a_measured_fixed_cost_an_odd_request_steps_every_iteration(large_pack):
    _, odd_steps = _run(_engine(large_pack, 0.0), {**USUAL, **ODD}, "odd", after=12)
    assert odd_steps == 12  # pixels alone: as before the fit knew anything


def test_the_main_shape_is_the_one_most_users_share_not_one_users_many_requests(large_pack):
    """One user's four odd-shaped requests outweigh three users' usual ones in pixels, yet the usual
    shape stays the main one: the three users step every iteration, the one user's group pays its
    call (weight 1 + 3/4 each: about 4 of every 7 iterations)."""
    greedy = {f"odd{i}": req(seed=20 + i, height=64, width=16) for i in range(4)}
    engine = _engine(large_pack, 3.0)
    payloads: dict[str, bytes] = {}
    entries = {}
    for name, request in {**USUAL, **greedy}.items():
        owner = "greedy" if name.startswith("odd") else name

        def sink(event, name=name) -> None:
            from services.edge_server.engine import Finished

            if isinstance(event, Finished):
                payloads[name] = event.payload

        entries[name] = engine.submit(request, CodecSpec(), sink, owner=owner)
    for _ in range(12):
        engine.step()
    assert all(name in payloads for name in USUAL)  # 12 steps in 12 iterations: never paced
    odd_steps = [e.request.split if e.done else e.running.step for n, e in entries.items() if n.startswith("odd")]
    assert all(5 <= steps <= 8 for steps in odd_steps), odd_steps
