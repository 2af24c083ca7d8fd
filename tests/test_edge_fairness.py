"""Fair shares on the edge (issue 29, item 2): waiting requests start round-robin by user, not first
come first served, and per-user caps on waiting and running requests refuse a greedy user's excess
with RESOURCE_EXHAUSTED naming the cap while everyone else is served.

The queue and the batcher are pure and tested with made-up requests; the engine in process with
the tiny pack (stepped by hand, no thread); the caps and the identity through a real server."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from service_procs import edge_server, metric_value

from services.common.wire import request_to_proto
from services.edge_server.batching import BatchConfig, Batcher, OwnerQueueFull, QueueFull
from services.edge_server.fairness import FairQueue
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2_grpc

PROMPT = "a red circle at the left on a blue background"


@dataclass(eq=False)
class Item:
    owner: str
    name: str = ""
    submitted_at: float = 0.0
    cancelled: bool = False
    deadline: float | None = None
    finished: bool = False
    left: int = 1  # iterations still to run


def batcher(**kw) -> Batcher[Item]:
    """Admits into free slots at once (no coalescing window, no growth cap)."""
    return Batcher(BatchConfig(**{"max_batch_size": 2, "coalesce_s": 0.0, "coalesce_max_s": 0.0, "max_growth": 0.0,
                                  **kw}))


def run(b: Batcher[Item], iterations: int, on_done=lambda item: None) -> list[Item]:
    """Steps `b` as the engine does (each admitted item runs `left` iterations); returns the
    items in the order they were admitted."""
    admitted = []
    for i in range(iterations):
        step = b.next_iteration(float(i))
        admitted += step.admitted
        for item in step.batch:
            item.left -= 1
            if item.left <= 0:
                item.finished = True
                on_done(item)
    return admitted


# --- the queue and the batcher (pure) ---------------------------------------------------------

def test_the_fair_queue_takes_owners_in_turn_each_its_oldest():
    q: FairQueue[Item] = FairQueue(lambda item: item.owner)
    items = [Item("g", f"g{i}") for i in range(3)] + [Item("a", "a0"), Item("b", "b0"), Item("a", "a1")]
    for item in items:
        q.append(item)
    assert [i.name for i in q] == ["g0", "a0", "b0", "g1", "a1", "g2"]  # what pop would give
    assert len(q) == 6 and q.owners == 3 and q.count("g") == 3
    assert q.pop(skip=lambda owner: owner == "g").name == "a0"  # a skipped owner keeps its turn
    assert [q.pop().name for _ in range(5)] == ["g0", "b0", "a1", "g1", "g2"]
    assert q.pop() is None and not q


def test_three_light_users_start_before_the_greedy_users_second():
    """Before: one FIFO; the greedy user's 20 requests, queued first, all started before the
    three others' one each."""
    b = batcher()
    greedy = [Item("greedy", f"g{i}") for i in range(20)]
    light = [Item(user, user) for user in ("alice", "bob", "carol")]
    for item in greedy:
        b.submit(item)
    positions = [b.submit(item) for item in light]
    assert positions == [1, 2, 3]  # each behind the greedy user's first only
    order = [item.name for item in run(b, 30)]
    assert order[:5] == ["g0", "alice", "bob", "carol", "g1"]
    assert order[5:] == [f"g{i}" for i in range(2, 20)]


def backlogged(b: Batcher[Item], backlog: dict[str, int], iterations: int, steps: int = 3) -> Counter[str]:
    """Each user keeps `backlog[user]` requests outstanding (submitting a new one as one completes,
    as many as the edge takes); returns the requests completed per user."""
    done: Counter[str] = Counter()

    def submit(user: str) -> None:
        try:
            b.submit(Item(user, left=steps))
        except QueueFull:  # its cap: it tries again at its next completion
            pass

    def on_done(item: Item) -> None:
        done[item.owner] += 1
        submit(item.owner)

    for user, count in backlog.items():
        for _ in range(count):
            submit(user)
    run(b, iterations, on_done)
    return done


def assert_equal_shares(done: Counter[str], users: list[str], tolerance: float = 0.2) -> None:
    mean = sum(done[u] for u in users) / len(users)
    assert mean > 0
    for user in users:
        assert abs(done[user] - mean) <= tolerance * mean, (done, mean)


@pytest.mark.parametrize("caps", [dict(), dict(max_queued_per_owner=8, max_running_per_owner=4)])
def test_backlogged_users_complete_equal_shares_whatever_their_backlog(caps):
    """Before: first come first served gave each user a share proportional to its backlog (the
    greedy user's 20 outstanding against 2: about 3/4 of all completions)."""
    users = ["greedy", "alice", "bob", "carol"]
    done = backlogged(batcher(max_batch_size=4, **caps), {"greedy": 20, "alice": 2, "bob": 2, "carol": 2}, 600)
    assert_equal_shares(done, users)


def test_the_queued_cap_refuses_only_the_user_at_it_naming_the_cap():
    """Queued: beyond what the user may run (2 here). All may arrive before any starts (an idle
    engine's coalescing window): 2 + 3 are taken, the 6th is refused; another user's is not."""
    b = batcher(max_batch_size=4, max_queue=64, max_queued_per_owner=3, max_running_per_owner=2)
    for i in range(5):
        b.submit(Item("user greedy", f"g{i}", left=100))
    with pytest.raises(OwnerQueueFull) as exc:
        b.submit(Item("user greedy", "g5"))
    assert "user greedy already has 5 requests waiting on this edge and 0 running" in str(exc.value)
    assert "--max-queued-per-user 3" in str(exc.value)
    b.submit(Item("user bob", "b0"))  # another user is not refused
    assert [i.name for i in run(b, 1)] == ["g0", "b0", "g1"]
    with pytest.raises(OwnerQueueFull, match="3 requests waiting on this edge and 2 running"):
        b.submit(Item("user greedy", "g5"))
    b.next_iteration(1.0)
    b._running[0].finished = True  # one of its requests ends: it may queue one more
    b.next_iteration(2.0)
    b.submit(Item("user greedy", "g5"))


def test_without_a_running_cap_the_queued_cap_counts_beyond_the_batch():
    b = batcher(max_batch_size=4, max_queued_per_owner=2)
    for i in range(6):
        b.submit(Item("u", f"u{i}"))
    with pytest.raises(OwnerQueueFull):
        b.submit(Item("u", "u6"))


def test_a_user_at_its_running_cap_leaves_free_slots_to_the_others():
    b = batcher(max_batch_size=8, max_running_per_owner=2)
    for i in range(6):
        b.submit(Item("greedy", f"g{i}", left=100))
    first = b.next_iteration(0.0)
    assert [i.name for i in first.admitted] == ["g0", "g1"]  # 6 free slots, yet 2: its cap
    assert b.waiting_count == 4 and b.running_of("greedy") == 2
    b.submit(Item("bob", "b0", left=100))
    assert [i.name for i in b.next_iteration(1.0).admitted] == ["b0"]
    first.admitted[0].finished = True  # one of greedy's ends: its next one takes the slot
    assert [i.name for i in b.next_iteration(2.0).admitted] == ["g2"]


def test_cancelled_and_expired_waiting_requests_leave_their_users_queue():
    b = batcher(max_batch_size=1, max_queued_per_owner=2)
    running, cancelled, expired = Item("u", "r", left=100), Item("u", "c"), Item("u", "e", deadline=5.0)
    b.submit(running)
    b.next_iteration(0.0)
    b.submit(cancelled)
    b.submit(expired)
    cancelled.cancelled = True
    step = b.next_iteration(6.0)
    assert step.cancelled == [cancelled] and step.expired == [expired] and b.waiting_of("u") == 0
    b.submit(Item("u", "again"))  # its waiting slots are free again


def test_the_coalescing_window_spans_every_users_requests():
    b: Batcher[Item] = Batcher(BatchConfig(max_batch_size=16, coalesce_s=0.005, coalesce_max_s=0.05))
    b.submit(Item("a", submitted_at=10.0))
    b.submit(Item("b", submitted_at=10.003))
    assert b.next_iteration(10.004).hold_until == pytest.approx(10.008)  # the newest arrival's window
    assert len(b.next_iteration(10.009).admitted) == 2


# --- the engine (in process, tiny pack) ---------------------------------------------------------

def req(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, steps=6, split=3, sampler="ddim", guidance_scale=3.0, seed=5, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


def test_the_engine_gives_backlogged_users_equal_completed_shares(large_pack):
    """Four users keep requests outstanding on one engine (the greedy one 12, the others 2);
    over a window their completed counts are equal within 20 %."""
    from services.edge_server.engine import EdgeEngine, Failed, Finished

    engine = EdgeEngine(large_pack, BatchConfig(max_batch_size=3, coalesce_s=0.0, coalesce_max_s=0.0, max_growth=0.0),
                        trace_unet=False)
    done: Counter[str] = Counter()
    failed: list[Failed] = []

    def submit(user: str, seed: int) -> None:
        def sink(event) -> None:
            if isinstance(event, Finished):
                done[user] += 1
                submit(user, seed + 100)  # stays backlogged
            elif isinstance(event, Failed):
                failed.append(event)

        engine.submit(req(seed=seed), CodecSpec(), sink, owner=f"user {user}")

    backlog = {"greedy": 12, "alice": 2, "bob": 2, "carol": 2}
    for user, count in backlog.items():
        for i in range(count):
            submit(user, i)
    while sum(done.values()) < 40:
        engine.step()
    assert not failed
    assert_equal_shares(done, list(backlog))


# --- the server: flags, caps and identity ------------------------------------------------------

def test_the_caps_are_on_by_default_and_read_their_variables(monkeypatch, capsys):
    from services.edge_server.server import parse_args

    args = parse_args([])
    assert (args.max_queued_per_user, args.max_running_per_user) == (8, 4)
    monkeypatch.setenv("TANDEM_EDGE_MAX_QUEUED_PER_USER", "3")
    monkeypatch.setenv("TANDEM_EDGE_MAX_RUNNING_PER_USER", "0")
    args = parse_args([])
    assert (args.max_queued_per_user, args.max_running_per_user) == (3, 0)
    with pytest.raises(SystemExit):
        parse_args(["--max-running-per-user", "-1"])
    assert "--max-running-per-user: must be >= 0, got -1" in capsys.readouterr().err


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_greedy_token_user_gets_its_share_and_resource_exhausted_beyond_it(tiny_packs, tmp_path):
    """With tokens, alice's requests count against alice whether or not they name her: one runs
    (her running cap), two wait (her queued cap) although slots are free, the next is refused
    naming the cap; bob, from the same host and naming nobody, is served meanwhile."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": "alice", "tok-bob": "bob"}))
    alice, bob = [("authorization", "Bearer tok-alice")], [("authorization", "Bearer tok-bob")]
    long = request_to_proto(req(steps=200, split=200, height=128, width=128), CodecSpec())
    named = request_to_proto(req(steps=200, split=200, height=128, width=128, user="alice"), CodecSpec())
    with edge_server(tiny_packs["large"], tmp_path, "--tokens", str(tokens), "--max-batch", "4",
                     "--max-queued-per-user", "2", "--max-running-per-user", "1", "--max-image-side", "128",
                     "--max-request-cost", "0") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            held = [stub.Generate(long, timeout=120, metadata=alice)]
            events = iter(held[0])
            while next(events).WhichOneof("event") != "progress":  # it runs
                pass
            for message in (named, long):
                call = stub.Generate(message, timeout=120, metadata=alice)
                assert next(iter(call)).WhichOneof("event") == "queued"
                held.append(call)
            _wait_for(lambda: metric_value(server.metrics(), "tandem_edge_running_requests") == 1
                      and metric_value(server.metrics(), "tandem_edge_queue_depth") == 2)
            for message in (long, named):
                with pytest.raises(grpc.RpcError) as exc:
                    list(stub.Generate(message, timeout=30, metadata=alice))
                assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "user alice already has 2 requests waiting" in exc.value.details()
                assert "--max-queued-per-user 2" in exc.value.details()
            done = list(stub.Generate(request_to_proto(req(), CodecSpec()), timeout=60, metadata=bob))
            assert done[-1].WhichOneof("event") == "handoff"
            assert metric_value(server.metrics(), "tandem_edge_queue_depth") == 2  # alice's still wait
            for call in held:
                call.cancel()
