"""What `tandem generate` shows: progress bars while it runs, then the breakdown of where the
time and the bytes went (as text, or JSON with --json), including the plan a scheduler gave and
the measured phases reported back to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.phases import CoarsePhase

if TYPE_CHECKING:
    from services.common.scheduler_client import ReceivedPlan
    from services.common.security import ClientSecurity
    from tandem.handoff import CodecSpec
    from tandem.request import GenerationRequest
    from tandem.resolve import PartialRequest


class ProgressBars:
    """One tqdm bar per phase on stderr, opened when the phase reports its first step."""

    LABELS = {"queue": "edge queue", "edge_steps": "edge steps", "transfer": "handoff bytes",
              "device_steps": "device steps", "decode": "decode"}

    def __init__(self) -> None:
        self.bars: dict = {}
        self.first_position = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            self.close()  # phases run one after the other: finish the previous bar first
            if phase == "queue":  # `done` is the queue position; count down to 0
                total, self.first_position = done + 1, done
            unit = {"transfer": "B", "queue": "slot", "decode": "image"}.get(phase, "step")
            bar = self.bars[phase] = tqdm(total=total, desc=self.LABELS.get(phase, phase), unit=unit, leave=True)
        value = self.first_position - done + 1 if phase == "queue" else done
        bar.update(value - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def report_plan(plan: ReceivedPlan, scheduler: str, result, timeout: float, security: ClientSecurity | None) -> dict:
    """Sends the measured phases of ``result`` for the plan (best effort); the plan as the breakdown shows it."""
    from services.common.scheduler_client import report

    reported = report(scheduler, plan.plan_id, dict(result.seconds), result.edge_steps, result.device_steps,
                      result.handoff_bytes, bool(result.fallback), timeout=min(timeout, 5.0), security=security)
    return {"id": plan.plan_id, "scheduler": scheduler, "predicted_seconds": dict(plan.predicted_seconds),
            "frame_size": plan.frame_size, "reported": reported, "predicted_handoff_bytes": plan.predicted_handoff_bytes,
            "link": {"bandwidth_bps": plan.link_bps, "rtt_s": plan.link_rtt_s, "sources": plan.link_sources}}


def in_process_breakdown(request: GenerationRequest, codec: CodecSpec, result, out: Path, edge_name: str,
                         ue_name: str, random: bool, mode: str, plan: dict | None, link: dict | None) -> dict[str, Any]:
    """The breakdown of an image made here (the edge steps in process or on an --edge)."""
    height, width = result.image.shape[:2]
    asked = {"prompt": request.prompt, "seed": request.seed, "user": request.user, "sampler": request.sampler,
             "total_steps": request.steps, "split": request.split}
    return _breakdown(out, int(width), int(height), asked, codec, result, edge_name, ue_name, random, result.fallback,
                      mode, None, plan, link)


def device_service_breakdown(given: PartialRequest, codec: CodecSpec, result, out: Path, edge: str | None,
                             device_service: str, plan: dict | None, link: dict | None) -> dict[str, Any]:
    """The same keys for a --ue run; what the device service chose from its pack's defaults and
    does not return (sampler, an unset --steps/--split) is None."""
    from PIL import Image

    with Image.open(out) as image:
        width, height = image.size
    split = given.split if given.split is not None else (None if result.fallback else result.edge_steps)
    asked = {"prompt": given.prompt, "seed": given.seed, "user": given.user, "sampler": given.sampler,
             "total_steps": result.edge_steps + result.device_steps, "split": split}
    edge_name = f"edge {edge}" if edge else "the device service's edge"
    return _breakdown(out, width, height, asked, codec, result, edge_name, result.device_pack, False,
                      result.fallback or None, "device-service", device_service, plan, link)


def _breakdown(out: Path, width: int, height: int, asked: dict[str, Any], codec: CodecSpec, result, edge_pack: str,
               ue_pack: str, random_pack: bool, fallback: str | None, mode: str, device_service: str | None,
               plan: dict | None, link: dict | None) -> dict[str, Any]:
    return {
        "out": str(out),
        "width": width,
        "height": height,
        **asked,
        "edge_steps": result.edge_steps,
        "device_steps": result.device_steps,
        "codec": codec.to_dict(),
        "handoff_bytes": result.handoff_bytes,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "edge_pack": edge_pack,
        "ue_pack": ue_pack,
        "random_pack": random_pack,
        "fallback": fallback,
        "mode": mode,
        "device_service": device_service,
        "plan": plan,
        "link": link,
    }


def show(report: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(report, indent=2) if as_json else as_text(report))


def as_text(report: dict[str, Any]) -> str:
    s = report["seconds"]
    codec = report["codec"]
    lines = [f"wrote {report['out']} ({report['width']}x{report['height']}, seed {report['seed']}, {report['mode']})"]
    if "queue" in s:
        lines.append(f"  queue  {s['queue']:.3f} s")
    lines += [
        f"  edge   {report['edge_pack']}: {report['edge_steps']} steps   {s.get('edge_steps', 0.0):.3f} s",
        f"  handoff {report['handoff_bytes']} bytes ({codec['encoding']}, merge ratio {codec['merge_ratio']:g})"
        f"   {s.get('transfer', 0.0):.3f} s",
        f"  device {report['ue_pack']}{' + ' + report['user'] if report['user'] else ''}: "
        f"{report['device_steps']} steps   {s.get('device_steps', 0.0):.3f} s",
        f"  decode {s.get('decode', 0.0):.3f} s   total {sum(s.values()):.3f} s",
    ]
    if report["plan"]:
        plan = report["plan"]
        lines.append(f"  plan   {plan['id'][:8]} from {plan['scheduler']} (frame of {plan['frame_size']}): "
                     f"predicted {plan['predicted_seconds'][CoarsePhase.TOTAL]:.3f} s")
    if report.get("link") and report["link"]["sent"]:
        lines.append(f"  link   {report['link']['sent']['text']}")
    if report["fallback"]:
        lines.append(f"  FALLBACK: {report['fallback']}")
    if report["random_pack"]:
        lines.append("  (tiny RANDOM packs: the image is noise; install the demo pack for real images)")
    return "\n".join(lines)
