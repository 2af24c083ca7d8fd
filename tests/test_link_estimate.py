"""The device's link estimate (services/ue_client/link.py): robust per-edge medians with bounds and
a minimum sample count, persisted atomically for the CLI; a corrupt state file is ignored with
one warning. End to end: the CLI sends it with each Plan request (--link-mbps overriding its
rate) and the scheduler plans with it."""

from __future__ import annotations

import json
import math
import time

import grpc
import pytest
from service_procs import device_service, edge_server, scheduler_service

from services.cli import generate as cli
from services.ue_client.link import LinkBook, LinkSample, load_book, save_book, state_path
from tandem.link import MIN_RATE_BYTES, MIN_SAMPLES, WINDOW, LinkEstimate
from tandem.tiny_pack import build_sd_geometry_pair
from tandem.v1 import device_pb2, device_pb2_grpc
from tools.testbed.delay_proxy import DelayProxy

SD_FP16 = 67_000  # bytes of an SD-sized fp16 handoff


def sample(mbps: float, rtt_s: float = 0.04, nbytes: int = SD_FP16) -> LinkSample:
    return LinkSample(nbytes, nbytes * 8 / (mbps * 1e6), rtt_s)


def test_nothing_is_claimed_before_the_minimum_sample_count():
    book = LinkBook()
    assert book.estimate("edge:1") == LinkEstimate() and not book.estimate().known
    for _ in range(MIN_SAMPLES - 1):
        book.record("edge:1", sample(10))
    assert book.estimate("edge:1").bandwidth_bps == 0 and book.estimate("edge:1").rtt_s == 0
    book.record("edge:1", sample(10))
    estimate = book.estimate("edge:1")
    assert math.isclose(estimate.bandwidth_bps, 10e6) and math.isclose(estimate.rtt_s, 0.04)
    assert estimate.rate_samples == estimate.rtt_samples == MIN_SAMPLES
    assert estimate.describe() == f"10 Mbit/s, rtt 40 ms (measured, {MIN_SAMPLES} handoffs)"


def test_a_small_handoff_gives_a_round_trip_but_no_rate():
    book = LinkBook()
    for _ in range(3):
        book.record("e:1", LinkSample(2_700, 0.0004, 0.03))  # the demo pack's 2.7 KB: the stack's time
    estimate = book.estimate("e:1")
    assert estimate.bandwidth_bps == 0 and math.isclose(estimate.rtt_s, 0.03)
    assert LinkSample(MIN_RATE_BYTES - 1, 0.1, 0.01).rate_bps is None
    assert LinkSample(MIN_RATE_BYTES, 0.0, 0.01).rate_bps is None  # not timed


def test_one_absurd_sample_does_not_move_the_median_and_impossible_ones_are_dropped():
    book = LinkBook()
    for mbps in (10, 10, 10):
        book.record("e:1", sample(mbps))
    book.record("e:1", sample(9e5, rtt_s=9.0))  # one wild measurement, inside the physical bounds
    assert math.isclose(book.estimate("e:1").bandwidth_bps, 10e6)
    assert math.isclose(book.estimate("e:1").rtt_s, 0.04)
    for bad in (LinkSample(SD_FP16, 1e-12, math.nan), LinkSample(SD_FP16, math.inf, -1.0), LinkSample(SD_FP16, 1e-3, 60.0)):
        book.record("e:1", bad)  # round trips nan, negative or over 10 s never count
    assert book.estimate("e:1").rtt_samples == 4


def test_a_rate_change_is_followed_within_the_window():
    book = LinkBook()
    for _ in range(WINDOW):
        book.record("e:1", sample(50))
    followed = None
    for n in range(1, WINDOW + 1):
        book.record("e:1", sample(2))
        if math.isclose(book.estimate("e:1").bandwidth_bps, 2e6):
            followed = n
            break
    assert followed == WINDOW // 2 + 1  # a median: the majority of the window


def test_estimates_are_per_edge_the_last_edge_is_the_default_and_edges_are_bounded():
    book = LinkBook(max_edges=2)
    for _ in range(2):
        book.record("a:1", sample(5))
        book.record("b:1", sample(20))
    assert math.isclose(book.estimate("a:1").bandwidth_bps, 5e6)
    assert math.isclose(book.estimate().bandwidth_bps, 20e6)  # no edge named: the one measured last
    book.record("c:1", sample(1))
    assert book.estimate("a:1") == LinkEstimate()  # least recently used, forgotten
    assert book.estimate("b:1").known


def test_the_book_round_trips_through_its_file(tmp_path):
    path = tmp_path / "sub" / "links.json"
    book = LinkBook()
    for mbps in (8, 9, 10):
        book.record("e:1", sample(mbps))
    save_book(book, path)
    loaded, warning = load_book(path)
    assert warning is None and loaded.estimate("e:1") == book.estimate("e:1")
    assert [p.name for p in path.parent.iterdir()] == ["links.json"]  # no temporary file left behind


def test_a_missing_file_is_an_empty_book_without_a_warning(tmp_path):
    book, warning = load_book(tmp_path / "none.json")
    assert warning is None and not book.estimate().known


@pytest.mark.parametrize("text", ["{not json", "[]", '{"version": 99, "edges": {}}',
                                  '{"version": 1, "edges": {"e:1": {"rates_bps": ["x"], "rtts_s": []}}}',
                                  '{"version": 1, "edges": {"e:1": {"rates_bps": 5, "rtts_s": []}}}'])
def test_a_corrupt_file_is_ignored_with_one_warning(tmp_path, text):
    path = tmp_path / "links.json"
    path.write_text(text)
    book, warning = load_book(path)
    assert not book.estimate().known
    assert warning is not None and str(path) in warning and "\n" not in warning


def test_out_of_bounds_samples_in_the_file_are_dropped(tmp_path):
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"version": 1, "edges": {"e:1": {"rates_bps": [1e6, 2e6, -5.0, 1e30],
                                                                  "rtts_s": [0.01, 0.02, 99.0], "updated": time.time()}}}))
    book, warning = load_book(path)
    estimate = book.estimate("e:1")
    assert warning is None and estimate.rate_samples == 2 and estimate.rtt_samples == 2
    assert math.isclose(estimate.bandwidth_bps, 1.5e6)


def test_a_saved_estimate_is_used_only_while_it_is_recent(tmp_path):
    from services.ue_client.link import MAX_AGE_S

    now = [1_000_000.0]
    book = LinkBook(clock=lambda: now[0])
    for mbps in (8, 9, 10):
        book.record("e:1", sample(mbps))
    now[0] += 60
    book.record("e:2", sample(20))
    book.record("e:2", sample(20))
    data = json.loads(json.dumps(book.to_dict()))
    fresh = LinkBook.from_dict(data, clock=lambda: now[0] + 10)
    assert fresh.estimate("e:1") == book.estimate("e:1") and fresh.estimate("e:2").known
    # an hour after e:1's last sample (but not e:2's), only e:2 is left, and it is the default
    later = LinkBook.from_dict(data, clock=lambda: now[0] - 60 + MAX_AGE_S + 1)
    assert not later.estimate("e:1").known and later.estimate("e:2").known and later.estimate() == later.estimate("e:2")
    assert not LinkBook.from_dict(data, clock=lambda: now[0] + MAX_AGE_S + 1).estimate().known
    # a file from before the age was recorded: its estimates are of unknown age, not used, no warning
    path = tmp_path / "links.json"
    del data["edges"]["e:2"]["updated"]
    path.write_text(json.dumps(data))
    loaded, warning = load_book(path)
    assert warning is None and not loaded.estimate("e:2").known


def test_state_path_honours_the_override_then_xdg(tmp_path):
    assert state_path({"TANDEM_LINK_STATE": str(tmp_path / "x.json")}) == tmp_path / "x.json"
    assert state_path({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "tandem" / "links.json"


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_a_bad_link_override_is_one_line(tmp_path, capsys, value):
    argv = ["generate", "a cat", "--scheduler", "127.0.0.1:1", "--link-mbps", value, "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tandem: error: --link-mbps: must be a positive number")


# --- end to end: a device's successive images over a slowed link --------------------------------

@pytest.fixture(scope="module")
def sd_packs(tmp_path_factory):
    """SD-sized handoffs (67 KB at fp16): large enough to time on a slowed loopback link."""
    return build_sd_geometry_pair(tmp_path_factory.mktemp("sd-packs"))


SLOW = {"rate_bps": 8e6, "delay_s": 0.002}  # 1 MB/s each way, then 2 ms: a 67 KB handoff takes ~70 ms


def reported_round_trip(*reports: dict) -> float:
    """The median round's fixed cost the scheduler takes from these reports (split 2: the time
    before the first progress event less one edge step, see live.core.measured_phases)."""
    costs = sorted(r["seconds"]["queue"] - min(r["seconds"]["edge_steps"], r["seconds"]["queue"]) for r in reports)
    return (costs[(len(costs) - 1) // 2] + costs[len(costs) // 2]) / 2
PLAN_ARGS = ("--steps", "3", "--split", "2", "--codec", "fp16", "--merge-ratio", "0", "--device-class", "cpu")


@pytest.mark.slow
def test_successive_images_send_the_measured_link_and_the_scheduler_plans_with_it(sd_packs, tmp_path_factory,
                                                                                 capsys, monkeypatch):
    """Real edge and scheduler processes, the CLI as the device, the edge behind a delaying proxy
    (every 4 KB read waits, so an SD-sized 67 KB handoff takes measurably long on loopback). From the
    second measured handoff on, each Plan request carries the device's estimate and the plan is
    predicted from its rate (and the round trip from this user's own reports); --link-mbps
    overrides the rate; a device without a state file of its own is planned from its own reports;
    a corrupt state file is ignored with one warning."""
    tmp = tmp_path_factory.mktemp("e2e-links")
    large, small = sd_packs
    state = tmp / "links.json"
    monkeypatch.setenv("TANDEM_LINK_STATE", str(state))

    def generate(name: str, *args: str) -> dict:
        argv = ["generate", "a cat", "--small", str(small), "--device", "cpu", *PLAN_ARGS, "--scheduler", sched.address,
                "--edge", proxy.address, "--out", str(tmp / name), "--json", "--quiet", *args]
        assert cli.main(argv) == 0
        out, err = capsys.readouterr()
        report = json.loads(out)
        assert report["fallback"] is None and report["plan"]["reported"]
        return {**report, "stderr": err}

    with scheduler_service(tmp) as sched, edge_server(large, tmp) as edge, \
            DelayProxy(edge.address, **SLOW) as proxy:
        first = generate("1.png")
        second = generate("2.png")
        third = generate("3.png")
        override = generate("4.png", "--link-mbps", "3")
        monkeypatch.setenv("TANDEM_LINK_STATE", str(tmp / "elsewhere.json"))  # this device forgot what it measured
        forgotten = generate("5.png")
        state.write_text("{half a file")
        monkeypatch.setenv("TANDEM_LINK_STATE", str(state))
        corrupt = generate("6.png")

    for report in (first, second, third):
        measured = report["link"]["measured"]
        assert measured["handoff_bytes"] == report["handoff_bytes"] > 60_000 and measured["rate_bps"] > 0
    # Before two measured handoffs the device claims nothing and the scheduler uses its profile.
    assert first["link"]["sent"]["source"] == second["link"]["sent"]["source"] == "unknown"
    assert first["plan"]["link"]["sources"] == "rate: profile, rtt: profile"
    # Then the device's estimate is sent, and the plan is predicted from its rate.
    sent, plan = third["link"]["sent"], third["plan"]
    assert sent["source"] == "measured" and sent["rate_samples"] == sent["rtt_samples"] == 2
    rates = sorted(r["link"]["measured"]["rate_bps"] for r in (first, second))
    assert math.isclose(sent["bandwidth_bps"], sum(rates) / 2)  # the median of two
    assert plan["link"]["bandwidth_bps"] == sent["bandwidth_bps"] and sent["rtt_s"] > 0
    # The round trip: the round's whole fixed cost from this user's two reports beats the device's RTT.
    assert plan["link"]["sources"] == "rate: device, rtt: reports"
    assert math.isclose(plan["link"]["rtt_s"], reported_round_trip(first, second), abs_tol=3e-4)
    assert plan["predicted_handoff_bytes"] > 0  # a slow device: its plan uses the edge (alone: the whole band)
    assert math.isclose(plan["predicted_seconds"]["transfer"],
                        plan["predicted_handoff_bytes"] * 8 / sent["bandwidth_bps"] + plan["link"]["rtt_s"],
                        rel_tol=1e-6)
    # --link-mbps overrides the rate only.
    assert override["link"]["sent"]["source"] == "override" and override["plan"]["link"]["bandwidth_bps"] == 3e6
    assert override["plan"]["link"]["sources"] == "rate: device, rtt: reports"
    # Without its own estimate the device is planned from its own earlier reports.
    assert forgotten["link"]["sent"]["source"] == "unknown"
    assert forgotten["plan"]["link"]["sources"] == "rate: reports, rtt: reports"
    assert forgotten["plan"]["link"]["bandwidth_bps"] > 0 and forgotten["plan"]["link"]["rtt_s"] > 0
    # A corrupt state file: one warning, planned as if nothing had been measured, then rewritten.
    assert corrupt["link"]["sent"]["source"] == "unknown"
    assert [line for line in corrupt["stderr"].splitlines() if "link state" in line] == \
        [f"tandem: WARNING: link state {state} is corrupt (Expecting property name enclosed in double quotes: "
         "line 1 column 2 (char 1)); ignoring it"]
    assert json.loads(state.read_text())["version"] == 1


@pytest.mark.slow
def test_the_device_service_measures_its_link_and_the_cli_sends_it_along(sd_packs, tmp_path_factory, capsys):
    """--ue: the long-running device service keeps the link per edge in memory, answers
    GetLinkEstimate, and the CLI sends that estimate with its plan request."""
    tmp = tmp_path_factory.mktemp("e2e-ue-links")
    large, small = sd_packs

    def generate(name: str) -> dict:
        argv = ["generate", "a cat", "--ue", ue.address, *PLAN_ARGS, "--scheduler", sched.address,
                "--out", str(tmp / name), "--json", "--quiet"]
        assert cli.main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["fallback"] is None and report["plan"]["reported"]
        return report

    with scheduler_service(tmp) as sched, edge_server(large, tmp) as edge, DelayProxy(edge.address, **SLOW) as proxy, \
            device_service(small, tmp, "--edge", proxy.address) as ue, grpc.insecure_channel(ue.address) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        before = stub.GetLinkEstimate(device_pb2.GetLinkEstimateRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetLinkEstimate(device_pb2.GetLinkEstimateRequest(edge_address="10.9.9.9:1"), timeout=30)
        reports = [generate(f"{i}.png") for i in range(3)]
        after = stub.GetLinkEstimate(device_pb2.GetLinkEstimateRequest(edge_address=proxy.address), timeout=30)

    assert (before.edge_address, before.rate_samples, before.bandwidth_bps) == (proxy.address, 0, 0.0)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "edge_address" in exc.value.details()
    assert after.rate_samples == after.rtt_samples == 3 and after.bandwidth_bps > 0 and after.rtt_seconds > 0
    for report in reports:
        assert report["link"]["measured"]["rate_bps"] > 0
    assert [r["link"]["sent"]["source"] for r in reports] == ["unknown", "unknown", "measured"]
    sent, plan = reports[2]["link"]["sent"], reports[2]["plan"]
    rates = sorted(r["link"]["measured"]["rate_bps"] for r in reports[:2])
    assert math.isclose(sent["bandwidth_bps"], sum(rates) / 2, rel_tol=1e-9)
    assert plan["link"]["bandwidth_bps"] == sent["bandwidth_bps"] and plan["link"]["sources"] == "rate: device, rtt: reports"
    assert math.isclose(plan["link"]["rtt_s"], reported_round_trip(*reports[:2]), abs_tol=3e-4)
