"""bench/links.py's own logic, without a testbed: a class's device hosts start each request
together (one scheduler frame) unless --unsynced, and its objective check ties two arms whose
difference is within the noise of the latency term, not a different plan's quality."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from service_procs import ROOT


@pytest.fixture(scope="module")
def links():
    threads = os.environ.get("OMP_NUM_THREADS")
    spec = importlib.util.spec_from_file_location("bench_links", ROOT / "bench" / "links.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    if threads is None:  # the bench sets a default for its own processes; leave this one's as it was
        os.environ.pop("OMP_NUM_THREADS", None)
    return module


class FakeHost:
    """A device host whose requests take ``seconds`` each; records when each one ran."""

    def __init__(self, label: str, seconds: float, log: list):
        self.label, self.seconds, self.log = label, seconds, log
        self.lock = threading.Lock()

    def run(self, job: dict):
        began = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.log.append((self.label, job["index"], job["arm"]["name"], began, time.monotonic()))
        return job["arm"]["name"]


def settings(links, together: bool):
    packs = links.Packs(Path("large"), Path("small"), Path("costs.json"), Path("quality.json"), 4.0, "dpm")
    return links.Settings(rounds=2, budget_s=1.0, out=Path("out"), packs=packs, policy="exact", load_at_start=0.0,
                          together=together)


def slots(log: list) -> dict:
    """(label -> [(began, ended)] in the order the host ran its requests)."""
    by_host: dict[str, list] = {}
    for label, _index, _arm, began, ended in sorted(log, key=lambda entry: entry[3]):
        by_host.setdefault(label, []).append((began, ended))
    return by_host


def test_hosts_start_each_request_together_unless_unsynced(links):
    arms = (links.Arm("adaptive"), links.Arm("fp16 r=0", 10, 5))
    log: list = []
    hosts = [FakeHost("fast", 0.005, log), FakeHost("slow", 0.5, log)]
    assert len(links.run_arms(hosts, arms, settings(links, together=True))) == 4 * len(hosts)
    by_host = slots(log)
    for j in range(1, 4):  # every host starts request j after every host finished request j - 1
        assert min(by_host[h][j][0] for h in by_host) >= max(by_host[h][j - 1][1] for h in by_host)
    log.clear()
    links.run_arms(hosts, arms, settings(links, together=False))
    by_host = slots(log)
    assert by_host["fast"][3][0] < by_host["slow"][0][1]  # free-running: the fast host is far ahead


def result(links, arm: str, objective: float, sem_s: float = 0.005):
    return links.ArmResult("LTE", arm, 16, 0.5, 0.6, 0.55, 50.0, 0.0, objective, sem_s, 0.05, 0.1,
                           Counter({"int8 r=0.25 k=3 T=10": 1, "fp16 r=0 k=5 T=10": 1}), 10.0, 80.0, Counter())


def objective_check(links, adaptive: float, fixed: float):
    change = links.RateChange([50.0, 2.0], 1, 2.0, 1)
    results = [result(links, "adaptive", adaptive), result(links, "fp16 r=0", fixed)]
    (check,) = [t for t in links.check_targets(results, change, False, latency_weight=0.03) if "objective" in t.name]
    return check


def test_the_objective_check_ties_within_the_latency_terms_noise(links):
    # noise: 0.03/s x 2 x hypot(5 ms, 5 ms) = 0.00042
    assert objective_check(links, 0.8430, 0.8433).met  # the same plans, a few ms apart
    assert objective_check(links, 0.8440, 0.8430).met
    missed = objective_check(links, 0.9554, 0.9609)  # another plan's quality: a real loss
    assert not missed.met and "latency noise ±0.0004" in missed.figure
    # noisier latencies (50 ms), a wider tie: ±0.0030
    noisy = replace(result(links, "fp16 r=0", 0.8433), latency_sem_s=0.05)
    change = links.RateChange([50.0, 2.0], 1, 2.0, 1)
    checks = links.check_targets([result(links, "adaptive", 0.8410), noisy], change, False, latency_weight=0.03)
    assert [t.met for t in checks if "objective" in t.name] == [True]


def test_an_arm_takes_from_the_plan_what_it_does_not_fix_as_tandem_generate_does(links):
    """One home for applying a plan (PartialRequest.with_plan): the merge strategy included."""
    from types import SimpleNamespace

    from tandem.resolve import resolve

    plan = SimpleNamespace(steps=10, split=8, encoding="int8", merge_ratio=0.25, merge_strategy="denoised")
    defaults = replace(settings(links, together=True).packs, sampler="ddim").defaults
    request, codec = resolve(links.Arm("adaptive").request("a cat", 3).with_plan(plan), defaults)
    assert (request.steps, request.split, request.seed, request.guidance_scale, request.height) == (10, 8, 3, 4.0, 512)
    assert (codec.encoding, codec.merge_ratio, codec.strategy) == ("int8", 0.25, "denoised")
    request, codec = resolve(links.Arm("fp16 r=0", 10, 5).request("a cat", 3).with_plan(plan), defaults)
    assert (request.steps, request.split, codec.encoding, codec.merge_ratio) == (10, 5, "fp16", 0.0)
