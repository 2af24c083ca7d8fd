"""Device-side attacks of issue 14, measured after the fix, side by side in one run.

    .venv/bin/python -m bench.attack_device [--large DIR --small DIR] [--rounds 3] [--cancelled 12]

1. RSS of the device service after each hostile handoff (tools/testbed/fake_edge.py) vs before it.
2. User tokens that reach an edge known only from a scheduler's plan over plaintext (target 0).
3. Device steps run after a call was cancelled (target ≤ 1 per call).
4. Latency of a valid request right after N cancelled calls vs the same request without them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from services.cli import generate as cli
from services.common.launcher import ONE_THREAD, device_service, metric_value, rss_bytes, running, scheduler_service
from services.ue_client.client import generate_on_device_service
from tandem.v1 import device_pb2, device_pb2_grpc, edge_pb2

ROOT = Path(__file__).resolve().parent.parent  # where tools.testbed.fake_edge runs from (tools is not installed)

PROMPT = "a red circle at the left on a blue background"
ATTACKS = ("other", "big", "fewer", "flood")
MIB = 1024 * 1024


def generate(ue, prompt: str, split: int = 2, steps: int = 4) -> device_pb2.DeviceResult:
    message = edge_pb2.GenerateRequest(prompt=prompt, steps=steps, split=split)
    return generate_on_device_service(ue.address, message, None, timeout=60)


def rss_per_attack(ue, rounds: int) -> None:
    generate(ue, f"warm: {PROMPT}")
    print("| attack | fallback reason (first) | RSS before | RSS after | ratio |")
    print("|---|---|---|---|---|")
    for attack in ATTACKS:
        before = rss_bytes(ue.proc)
        reasons = {generate(ue, f"{attack}: {PROMPT}").fallback for _ in range(rounds)}
        after = rss_bytes(ue.proc)
        print(f"| {attack} | {sorted(reasons)[0][:90]} | {before / MIB:.0f} MiB | {after / MIB:.0f} MiB "
              f"| {after / before:.3f} |")


def tokens_to_unverified_edge(edge, small: Path, tmp: Path) -> None:
    def count(label: str) -> float:
        return metric_value(edge.metrics(), "fake_edge_generate_total", f'token="{label}"')

    yes, no = count("yes"), count("no")
    with scheduler_service(tmp, "--edge", edge.address, env=ONE_THREAD) as sched, \
            contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        for i in range(3):
            cli.main(["generate", f"other: {PROMPT}", "--small", str(small), "--device", "cpu", "--steps", "4",
                      "--scheduler", sched.address, "--device-class", "phone", "--token", "user-secret",
                      "--out", str(tmp / f"plan{i}.png"), "--quiet", "--json"])
    sent, calls = count("yes") - yes, count("yes") - yes + count("no") - no
    print(f"\ntokens at the scheduler-named plaintext edge: {sent:.0f} of {calls:.0f} calls")


def cancelled_then_valid(ue, cancelled: int, steps: int, rounds: int) -> None:
    def timed() -> float:
        began = time.perf_counter()
        generate(ue, PROMPT, split=0)
        return time.perf_counter() - began

    message = device_pb2.DeviceServiceGenerateRequest(request=edge_pb2.GenerateRequest(prompt=PROMPT, steps=steps, split=0))

    def after_cancelled_calls() -> float:
        started = threading.Event()

        def watch(call) -> None:
            with contextlib.suppress(grpc.RpcError):
                for response in call:
                    if response.progress.phase == "device_steps":
                        started.set()

        with grpc.insecure_channel(ue.address) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            calls = [stub.Generate(message, timeout=600) for _ in range(cancelled)]
            for call in calls:
                threading.Thread(target=watch, args=(call,), daemon=True).start()
            started.wait(60)  # the first call is inside its device steps, the others wait their turn
            for call in calls:
                call.cancel()
            return timed()

    after_before = metric_value(ue.metrics(), "tandem_ue_steps_after_cancel_total")
    # Interleaved, so that load from other processes on the machine hits both alike.
    alone, after = [], []
    for _ in range(rounds):
        alone.append(timed())
        after.append(after_cancelled_calls())
    steps_after = metric_value(ue.metrics(), "tandem_ue_steps_after_cancel_total") - after_before
    total = rounds * cancelled
    print(f"\ndevice steps run after cancel, {total} calls of {steps} steps: {steps_after:.0f} "
          f"({steps_after / total:.2f} per call)")
    print(f"valid 4-step request, median of {rounds}: alone {statistics.median(alone):.3f} s, right after "
          f"{cancelled} cancelled calls {statistics.median(after):.3f} s "
          f"(ratio {statistics.median(after) / statistics.median(alone):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, default=Path("tandem/demo_pack/large"))
    parser.add_argument("--small", type=Path, default=Path("tandem/demo_pack/small"))
    parser.add_argument("--rounds", type=int, default=5, help="requests per attack; rounds of the cancel test")
    parser.add_argument("--cancelled", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200, help="steps of each cancelled call")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        with running("tools.testbed.fake_edge", "--pack", str(args.large), "--device", "cpu", log_dir=tmp, cwd=ROOT,
                     env=ONE_THREAD) as edge, \
                device_service(args.small, tmp, "--edge", edge.address, "--edge-token", "device-secret",
                               env=ONE_THREAD) as ue:
            rss_per_attack(ue, args.rounds)
            tokens_to_unverified_edge(edge, args.small, tmp)
            cancelled_then_valid(ue, args.cancelled, args.steps, args.rounds)


if __name__ == "__main__":
    main()
