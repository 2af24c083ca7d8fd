"""The device side's scheduler client (services/common/scheduler_client.py): a scheduler being
restarted is tried again within the call's timeout; a plan is never issued twice; one that stays
away is not waited for again for a while, and the caller is told why it got no plan."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from services.common import scheduler_client
from services.common.launcher import free_port
from services.common.lifecycle import NO_REUSEPORT
from tandem.v1 import scheduler_pb2, scheduler_pb2_grpc


class CountingScheduler(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, delay_s: float = 0.0):
        self.plans = 0
        self.delay_s = delay_s

    def Plan(self, request, context):
        self.plans += 1
        time.sleep(self.delay_s)
        return scheduler_pb2.PlanResponse(plan_id=f"p{self.plans}", steps=4, split=2)


def free_address() -> str:
    return f"127.0.0.1:{free_port()}"


def serve(address: str, servicer: CountingScheduler) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(2), options=[NO_REUSEPORT])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server


@pytest.fixture(autouse=True)
def forget_absences():
    scheduler_client._away_since.clear()
    yield
    scheduler_client._away_since.clear()


def test_a_scheduler_that_comes_back_within_the_timeout_gives_the_plan():
    address, servicer = free_address(), CountingScheduler()
    started: list[grpc.Server] = []
    later = threading.Timer(0.6, lambda: started.append(serve(address, servicer)))
    later.start()
    try:
        errors: list[str] = []
        plan = scheduler_client.request_plan(address, "phone", timeout=10, on_error=errors.append)
        assert plan is not None and plan.plan_id == "p1", errors
        assert servicer.plans == 1  # the tries that found nobody issued nothing
        assert scheduler_client.waits_for(address)
    finally:
        later.join()
        for server in started:
            server.stop(None)


def test_a_scheduler_that_stays_away_is_named_and_then_tried_once_per_call():
    address = free_address()
    errors: list[str] = []
    assert scheduler_client.request_plan(address, "phone", timeout=0.5, on_error=errors.append) is None
    assert errors[-1].startswith("UNAVAILABLE: ") and len(errors[-1]) > len("UNAVAILABLE: ")  # the cause, not a deadline
    assert not scheduler_client.waits_for(address)
    assert not scheduler_client.report(address, "p1", {}, 2, 2, 100, timeout=5, on_error=errors.append)
    assert errors[-1].startswith("UNAVAILABLE")
    servicer = CountingScheduler()
    server = serve(address, servicer)
    try:  # back: the next calls get it (the channel reconnects within its backoff) and wait again
        deadline = time.monotonic() + 10
        while scheduler_client.request_plan(address, "phone", timeout=2) is None:
            assert time.monotonic() < deadline, "the scheduler was back but no plan came"
            time.sleep(0.1)
        assert scheduler_client.waits_for(address)
    finally:
        server.stop(None)


def test_a_slow_scheduler_is_not_asked_twice():
    address, servicer = free_address(), CountingScheduler(delay_s=1.0)
    server = serve(address, servicer)
    try:
        errors: list[str] = []
        assert scheduler_client.request_plan(address, "phone", timeout=0.3, on_error=errors.append) is None
        assert errors[-1].startswith("DEADLINE_EXCEEDED")
        time.sleep(1.0)  # the servicer's thread finishes the call it got
        assert servicer.plans == 1
        assert scheduler_client.waits_for(address)  # it was there, only slow
    finally:
        server.stop(None)
