"""The results of scripts/gpu_check.sh as one markdown page and one JSON summary (no torch needed).

    python scripts/gpu_check_report.py --out DIR --stages STAGES.tsv --card CARD.csv --budget-s 450 \
        --elapsed-s 300 [--dry-run]

Reads, from DIR, what the stages wrote (batching.md, cuda_tests.xml, profiles/*.json: each
profile checked by the scheduler's own loader, CostProfile.load) and writes DIR/README.md and
DIR/stages.json. STAGES.tsv holds one line per stage: name, status, exit code, seconds, note.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.scheduler.decide.costs import CostProfile, CostProfileError  # noqa: E402

PROFILES = ("demo_cuda.json", "sd15_cuda.json")


def read_stages(path: Path) -> list[dict[str, Any]]:
    stages = []
    for line in path.read_text().splitlines():
        name, status, rc, seconds, note = (line.split("\t") + [""] * 5)[:5]
        stages.append({"name": name, "status": status, "rc": int(rc or 0), "seconds": int(seconds or 0), "note": note})
    return stages


def read_card(path: Path | None, dry_run: bool) -> str:
    """The card's name and memory from nvidia-smi's CSV (a header line, then one line per GPU)."""
    if dry_run:
        return "none (dry run on the CPU)"
    lines = path.read_text().strip().splitlines() if path and path.is_file() else []
    return "; ".join(line.strip() for line in lines[1:]) or "unknown (nvidia-smi gave nothing)"


def read_tests(path: Path) -> dict[str, Any]:
    """Counts and the not-passed cases of pytest's JUnit XML."""
    if not path.is_file():
        return {"ran": False}
    counts = {"passed": 0, "skipped": 0, "failed": 0}
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                reason = (child.get("message") or "").splitlines()[0][:200] if child.get("message") else ""
        counts[outcome] += 1
        if outcome != "passed":
            cases.append({"test": case.get("name"), "outcome": outcome, "reason": reason})
    return {"ran": True, **counts, "not_passed": cases}


def read_profile(path: Path) -> dict[str, Any]:
    """The profile's measured figures, once CostProfile.load has accepted the file."""
    if not path.is_file():
        return {"file": path.name, "ok": False, "error": "not written"}
    try:
        CostProfile.load(path)
    except (CostProfileError, OSError, ValueError) as exc:
        return {"file": path.name, "ok": False, "error": str(exc)}
    measured = json.loads(path.read_text()).get("measured", {})
    edge, small = measured.get("edge", {}), measured.get("small", {})
    return {"file": path.name, "ok": True, "device": measured.get("device"), "edge_pack": edge.get("pack"),
            "a_ms": edge.get("a_s", 0) * 1000, "b_ms": edge.get("b_s", 0) * 1000, "r2": edge.get("r2"),
            "small_pack": small.get("pack"), "step_ms": small.get("step_s", 0) * 1000,
            "decode_ms": small.get("decode_s", 0) * 1000}


def markdown(summary: dict[str, Any], batching: str) -> str:
    lines = [f"# GPU check: {summary['card']}", ""]
    if summary["dry_run"]:
        lines += ["Dry run: tiny packs on the CPU; the figures say nothing about a GPU.", ""]
    lines += [f"{summary['finished']}; {summary['total_s']} s of a {summary['budget_s']} s budget; "
              f"{'every stage passed' if summary['ok'] else 'NOT every stage passed'}.", "",
              "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in summary["stages"]]
    tests = summary["tests"]
    lines += ["", "## CUDA tests (cuda_tests.xml)", ""]
    if tests["ran"]:
        lines.append(f"{tests['passed']} passed, {tests['skipped']} skipped, {tests['failed']} failed.")
        lines += [f"- {c['test']}: {c['outcome']}: {c['reason']}" for c in tests["not_passed"]]
    else:
        lines.append("Not run.")
    lines += ["", "## Batching and memory (batching.md)", "", batching.strip() or "Not written.", "",
              "## Cost profiles (profiles/, checked by CostProfile.load)", "",
              "| file | device | edge pack | a (ms) | b (ms/request) | R² | device pack | step (ms) | decode (ms) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in summary["profiles"]:
        if p["ok"]:
            lines.append(f"| {p['file']} | {p['device']} | {p['edge_pack']} | {p['a_ms']:.2f} | {p['b_ms']:.2f} | "
                         f"{p['r2']:.4f} | {p['small_pack']} | {p['step_ms']:.2f} | {p['decode_ms']:.2f} |")
        else:
            lines.append(f"| {p['file']} | {p['error']} | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", type=Path, required=True)
    parser.add_argument("--card", type=Path)
    parser.add_argument("--budget-s", type=int, required=True)
    parser.add_argument("--elapsed-s", type=int, required=True, help="the run's seconds so far")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    stages = read_stages(args.stages)
    profiles = [read_profile(args.out / "profiles" / name) for name in PROFILES]
    tests = read_tests(args.out / "cuda_tests.xml")
    summary = {
        "card": read_card(args.card, args.dry_run), "dry_run": args.dry_run,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget_s": args.budget_s, "total_s": args.elapsed_s,
        "ok": all(s["status"] == "ok" for s in stages) and all(p["ok"] for p in profiles)
        and tests.get("failed", 1) == 0,
        "stages": stages, "tests": tests, "profiles": profiles,
    }
    batching = args.out / "batching.md"
    (args.out / "stages.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "README.md").write_text(markdown(summary, batching.read_text() if batching.is_file() else ""))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
