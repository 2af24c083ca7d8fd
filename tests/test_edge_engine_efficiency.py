"""Edge engine efficiency (issue 18, item 1): requests arriving together start together, a running
batch grows by a bounded step cost per iteration, admission encodes prompts in one call and
gives the same states as `tandem.pipeline.start`, and progress events are thinned.

The batching policy is pure, so its timing is tested with an injected clock; the engine and the
server are tested by the batch composition they report, never by wall time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from service_procs import ROOT, edge_server, free_port, metric_value

from services.edge_server.batching import BatchConfig, Batcher
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest

PROMPTS = ["a red circle at the left on a blue background", "a green square at the top on a black background",
           "a yellow triangle at the center on a white background"]


@dataclass(eq=False)
class Item:
    submitted_at: float
    cancelled: bool = False
    deadline: float | None = None
    finished: bool = False


def req(i: int = 0, **kw) -> GenerationRequest:
    base = dict(prompt=PROMPTS[i % len(PROMPTS)], steps=6, split=6, sampler="dpmpp_2m", guidance_scale=3.0, seed=i,
                height=32, width=32)
    return GenerationRequest(**{**base, **kw})


# --- 1. the coalescing window (pure, injected clock) ----------------------------------------

def test_an_idle_engine_holds_a_lone_request_no_longer_than_the_window():
    batcher: Batcher[Item] = Batcher(BatchConfig(max_batch_size=16, coalesce_s=0.005))
    lone = Item(submitted_at=10.0)
    batcher.submit(lone)
    held = batcher.next_iteration(10.001)
    assert held.batch == [] and held.hold_until == pytest.approx(10.005)
    assert batcher.next_iteration(10.004).batch == []
    started = batcher.next_iteration(10.005)  # the window is over: it starts alone
    assert started.batch == [lone] and started.hold_until is None


def test_requests_arriving_within_the_window_start_together():
    batcher: Batcher[Item] = Batcher(BatchConfig(max_batch_size=16, coalesce_s=0.005))
    items = [Item(submitted_at=10.0 + i * 0.002) for i in range(8)]  # 2 ms apart: one burst
    for item in items[:3]:
        batcher.submit(item)
    assert batcher.next_iteration(10.0045).batch == []
    for item in items[3:]:
        batcher.submit(item)
    assert batcher.next_iteration(10.0180).hold_until == pytest.approx(10.019)  # 5 ms after the last
    first = batcher.next_iteration(10.019)
    assert first.batch == items and first.admitted == items


def test_a_burst_that_keeps_coming_is_held_no_longer_than_the_cap():
    batcher: Batcher[Item] = Batcher(BatchConfig(max_batch_size=64, coalesce_s=0.005, coalesce_max_s=0.02))
    now = 0.0
    while now < 0.02:  # an arrival every 4 ms, forever
        batcher.submit(Item(submitted_at=now))
        assert batcher.next_iteration(now).batch == []
        now = round(now + 0.004, 6)
    assert len(batcher.next_iteration(0.02).batch) == 5  # at the cap, 20 ms after the first


def test_a_full_batch_or_a_busy_engine_is_never_held():
    full: Batcher[Item] = Batcher(BatchConfig(max_batch_size=4, coalesce_s=1.0, coalesce_max_s=1.0))
    items = [Item(submitted_at=0.0) for _ in range(4)]
    for item in items:
        full.submit(item)
    assert full.next_iteration(0.0).batch == items  # no one else could join: no wait
    newcomer = Item(submitted_at=0.5)
    items[0].finished = True
    full.submit(newcomer)
    assert newcomer in full.next_iteration(0.5).admitted  # something runs: join at once
    off: Batcher[Item] = Batcher(BatchConfig(coalesce_s=0.0))
    lone = Item(submitted_at=0.0)
    off.submit(lone)
    assert off.next_iteration(0.0).batch == [lone]


def test_cancelled_and_expired_requests_still_leave_during_the_window():
    batcher: Batcher[Item] = Batcher(BatchConfig(coalesce_s=1.0, coalesce_max_s=1.0))
    gone, late, kept = Item(0.0, cancelled=True), Item(0.0, deadline=0.1), Item(0.0)
    for item in (gone, late, kept):
        batcher.submit(item)
    step = batcher.next_iteration(0.2)
    assert step.cancelled == [gone] and step.expired == [late] and step.batch == [] and step.hold_until == 1.0


# --- 2. bounded growth of a running batch (pure) --------------------------------------------

def test_a_running_batch_grows_by_a_bounded_step_cost_per_iteration():
    config = BatchConfig(max_batch_size=32, coalesce_s=0.0, max_growth=0.5, fixed_cost=8.0)
    # a + b·n with a = 8b: from n = 1, 4 more make the step (8 + 5) / (8 + 1) = 1.44x slower <= 1.5x.
    assert [config.admissible(n) for n in (0, 1, 4, 8, 16)] == [32, 4, 6, 8, 12]
    assert BatchConfig(max_growth=0.0).admissible(5) == 16  # no cap
    assert BatchConfig(max_growth=0.01).admissible(1) == 1  # at least one always joins
    batcher: Batcher[Item] = Batcher(config)
    first = Item(0.0)
    batcher.submit(first)
    batcher.next_iteration(0.0)
    for _ in range(20):
        batcher.submit(Item(0.1))
    sizes = [len(batcher.next_iteration(0.1 + i).batch) for i in range(4)]
    assert sizes == [5, 11, 20, 21]  # +4 (the cap at n = 1), +6 (n = 5), +9 (n = 11), the last one
    for running, grown in zip([1] + sizes, sizes):
        assert (8 + grown) / (8 + running) <= 1.5 or grown - running == 1


def test_bad_batch_configs_are_refused():
    for bad in (dict(coalesce_s=-1.0), dict(coalesce_s=0.1, coalesce_max_s=0.05), dict(max_growth=-0.1),
                dict(fixed_cost=-1.0)):
        with pytest.raises(ValueError):
            BatchConfig(**bad)


# --- 3. batched admission gives the states `start` gives -------------------------------------

def test_batched_start_equals_start_one_by_one(large_pack):
    from services.edge_server.conditioning import Starter
    from tandem.pipeline import start

    requests = [req(0), req(1, negative_prompt="blurry"), req(2, guidance_scale=1.0), req(3, sampler="ddim", steps=9),
                req(4, negative_prompt="blurry", height=40, width=24), req(5, prompt="an orange circle")]
    starter = Starter(large_pack)
    started = starter.start(requests)
    assert starter.encoder_calls == 1  # every prompt and both negatives in one call
    for request, got in zip(requests, started):
        want = start(large_pack, request)
        assert got.error is None and got.state is not None
        assert torch.equal(got.state.latent, want.latent)
        assert torch.equal(got.state.guidance.cond, want.guidance.cond)
        assert (got.state.guidance.uncond is None) == (want.guidance.uncond is None)
        if want.guidance.uncond is not None:
            assert torch.equal(got.state.guidance.uncond, want.guidance.uncond)
        assert got.state.guidance.scale == want.guidance.scale
        assert got.state.schedule.digest() == want.schedule.digest()
    again = starter.start([req(7), req(8, negative_prompt="blurry")])
    assert starter.encoder_calls == 2 and again[1].state.guidance.uncond is started[1].state.guidance.uncond


def test_a_request_that_cannot_start_fails_alone(large_pack):
    from services.edge_server.conditioning import Starter

    started = Starter(large_pack).start([req(0), req(1, sampler="no-such-sampler"), req(2)])
    assert started[0].state is not None and started[2].state is not None
    assert started[1].state is None and "no-such-sampler" in str(started[1].error)


# --- 4. the engine: composition of its batches, thinned progress -----------------------------

def run_engine(pack, requests, **engine_kw):
    from services.edge_server.engine import EdgeEngine, Finished

    events: dict[int, list] = {i: [] for i in range(len(requests))}
    engine = EdgeEngine(pack, **engine_kw)
    engine.start()
    try:
        for i, request in enumerate(requests):
            engine.submit(request, CodecSpec("fp32"), events[i].append)
        deadline_hit = not all(_wait_finished(events[i], Finished) for i in events)
    finally:
        engine.stop()
    assert not deadline_hit
    return engine, events


def _wait_finished(events, kind, timeout=120.0):
    import time

    end = time.monotonic() + timeout
    while not any(isinstance(e, kind) for e in events):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_eight_requests_submitted_together_run_their_first_step_together(large_pack):
    # A window far longer than the submissions take; the eighth fills the batch and ends it.
    engine, _ = run_engine(large_pack, [req(i) for i in range(8)],
                           config=BatchConfig(max_batch_size=8, coalesce_s=60.0, coalesce_max_s=60.0))
    assert engine.stats.batch_sizes == {8: 6}  # six steps, always all eight: nobody started alone
    assert engine.starter.encoder_calls == 1


def test_progress_is_thinned_but_keeps_the_first_and_last_step(large_pack):
    from services.edge_server.engine import Progress

    requests = [req(0, steps=8, split=7), req(1, steps=8, split=7)]
    _, sparse = run_engine(large_pack, requests, progress_interval_s=3600.0)
    _, dense = run_engine(large_pack, requests, progress_interval_s=0.0)
    for i in range(2):
        assert [e.step for e in sparse[i] if isinstance(e, Progress)] == [1, 7]
        assert [e.step for e in dense[i] if isinstance(e, Progress)] == list(range(1, 8))


# --- 5. the server: flags, and batches seen through its metrics -------------------------------

def test_a_burst_through_grpc_starts_as_one_batch(tiny_packs, tmp_path):
    from services.ue_client.transport import fetch_handoff

    with edge_server(tiny_packs["large"], tmp_path, "--max-batch", "6", "--coalesce-ms", "60000",
                     "--coalesce-max-ms", "60000") as server:
        async def burst():
            # six users: one user's would run four at a time (--max-running-per-user)
            return await asyncio.gather(*(fetch_handoff(server.address, req(i, user=f"client{i}"), CodecSpec(), 120)
                                          for i in range(6)))

        assert all(r.payload for r in asyncio.run(burst()))
        text = server.metrics()
    assert metric_value(text, "tandem_edge_batch_size_count") == 6  # six steps ...
    assert metric_value(text, "tandem_edge_batch_size_bucket", 'le="4.5"') == 0  # ... none with fewer than 6


@pytest.mark.parametrize("flag,value", [("--coalesce-ms", "-1"), ("--max-growth", "nan"),
                                        ("--progress-interval", "-0.5")])
def test_bad_engine_flags_are_one_line(tiny_packs, flag, value):
    command = [sys.executable, "-m", "services.edge_server", "--pack", str(tiny_packs["large"]), "--device", "cpu",
               "--port", str(free_port()), "--metrics-port", "0", flag, value]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"tandem-edge: error: {flag}: must be a number >= 0, got {float(value)}" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_coalescing_cap_below_the_gap_is_one_line(tiny_packs):
    command = [sys.executable, "-m", "services.edge_server", "--pack", str(tiny_packs["large"]), "--device", "cpu",
               "--port", str(free_port()), "--metrics-port", "0", "--coalesce-ms", "20", "--coalesce-max-ms", "5"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "tandem-edge: error: --coalesce-max-ms: must be >= --coalesce-ms (20.0), got 5.0" in done.stderr
