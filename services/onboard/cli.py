"""tandem-onboard: one command from a pack pair to the profiles a scheduler plans with.

    tandem-onboard LARGE SMALL --out DIR [--users alice,bob] [--device-class NAME] [--quick]

1. checks the pair (latent channels, VAE, noise process);
2. measures the cost profile on this hardware (services.scheduler.learn.profiling: the edge step
   a + b·n on the large pack, the small pack's step and decode as device class NAME);
3. measures a quality profile with a pack-agnostic measure (services/onboard/quality.py: SSIM to
   the large pack's image of the same seed; LoRA users: to their all-device image), or, where the
   pack ships an evaluator (the demo pack), with the evaluator's accuracy (--evaluator DIR to name
   one, --no-evaluator for fidelity anyway);
4. writes DIR/cost_profile.json and DIR/quality_profile.json and prints the scheduler command.

A pair whose manifests say `random: true` (tiny test packs, tandem-pack's true-size pairs) has no
quality to measure: its images are noise. Its cost profile is measured as for any pair (--quick:
the cheapest faithful settings, since a true-size step takes tens of seconds on a CPU: 2 repeats
after 1 warm-up, edge batches 1 and 2, the two points a + b·n needs, handoff bytes checked against
real payloads at T 2 and 4); its quality profile says there is none (`random_weights`, every
option the same), so the scheduler plans by cost alone. --measure-random measures the SSIM
fidelity anyway (how a split changes a noise trajectory: a systems figure, not quality).

Both stages resume: a cost profile already in DIR is kept (--force measures again), quality points
already measured (DIR/quality_points.jsonl) are not measured again.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from services.scheduler.decide.costs import CostProfile, CostProfileError
from services.scheduler.decide.quality import PRICED_CODECS, QualityProfileError
from services.scheduler.defaults import DEFAULT_POLICY
from services.scheduler.learn.profiling import positive_ints

PROG = "tandem-onboard"


class OnboardError(Exception):
    """A bad flag, pack or pair: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the bad value, not a usage block
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description="Measure a pack pair's cost and quality profiles for "
                                     "the scheduler, on this hardware.")
    parser.add_argument("large", type=Path, help="edge (large) pack directory")
    parser.add_argument("small", type=Path, help="device (small) pack directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for the profiles (created)")
    parser.add_argument("--users", help="LoRA users to profile, comma-separated (default: every user of SMALL; "
                                        "'none' for the base model only)")
    parser.add_argument("--device-class", default="onboarded",
                        help="name of the device class the small pack's timings go to (onboarded)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="torch device (default: cuda if present)")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (T=4, k/T 0, 0.5, 1, r 0, 0.5, 2 prompts) and 2 timing repeats: minutes "
                             "(random weights: edge batches 1 and 2, handoff bytes checked at T 2 and 4)")
    parser.add_argument("--measure-random", action="store_true",
                        help="measure quality (SSIM fidelity) even where the packs' weights are random (their "
                             "manifests say random: true): it measures how the split changes noise, not quality "
                             "(default: a quality profile that says there is none)")
    parser.add_argument("--n", type=int, help="prompts per quality point (16; --quick: 2)")
    parser.add_argument("--steps", type=positive_ints, help="total steps T of the quality grid (10,20; --quick: 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as the services pick)")
    parser.add_argument("--trace-unet", action=argparse.BooleanOptionalAction, default=True,
                        help="time the edge's UNet traced on a CPU, as the edge server runs it unless --no-trace-unet (on)")
    parser.add_argument("--evaluator", type=Path, help="score quality with this evaluator directory (default: the "
                                                       "one shipped beside LARGE, if any: the demo pack's)")
    parser.add_argument("--no-evaluator", action="store_true", help="score fidelity even if the pack ships an evaluator")
    parser.add_argument("--codecs", default="int8",
                        help="handoff codecs measured beside fp16 so the scheduler can price and choose them "
                             "(comma-separated, default int8; 'none': fp16 only)")
    parser.add_argument("--force", action="store_true", help="measure the cost profile again even if DIR has one")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.codecs = () if args.codecs.strip() == "none" else tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    for codec in args.codecs:
        if codec not in PRICED_CODECS:
            parser.error(f"--codecs: unknown codec {codec!r} (choose from {', '.join(PRICED_CODECS)}, or none)")
    if args.n is not None and args.n < 1:
        parser.error(f"--n: must be >= 1, got {args.n}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: must be >= 1, got {args.threads}")
    if not args.device_class.strip():
        parser.error("--device-class: must not be empty")
    if args.evaluator is not None:
        from services.onboard.evaluator import EVALUATOR_FILES, is_evaluator

        if args.no_evaluator:
            parser.error("--evaluator and --no-evaluator: give one")
        if not is_evaluator(args.evaluator):
            parser.error(f"--evaluator: no evaluator at {args.evaluator} (needs {' and '.join(EVALUATOR_FILES)})")
    for name in ("large", "small"):
        path: Path = getattr(args, name)
        if not path.is_dir():
            parser.error(f"{name.upper()}: no pack directory at {path}")
    return args


def _log(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _users(requested: str | None, available: list[str]) -> list[str]:
    if requested is None:
        return available
    if requested.strip().lower() == "none":
        return []
    users = [u.strip() for u in requested.split(",") if u.strip()]
    unknown = [u for u in users if u not in available]
    if unknown:
        raise OnboardError(f"--users: the small pack has no user {', '.join(unknown)} "
                           f"(it has: {', '.join(available) or 'none'})")
    return users


# --quick on a pair with random weights (only costs are measured: at true size a step is tens of
# seconds on a CPU): the two edge batch sizes a + b·n needs, and handoffs after 1 and 2 real steps.
RANDOM_QUICK_BATCHES = (1, 2)
RANDOM_QUICK_HANDOFF_STEPS = (2, 4)


def _cost_profile(args: argparse.Namespace, out: Path, random_weights: bool = False) -> None:
    from services.scheduler.learn import profiling

    if out.is_file() and not args.force:
        try:
            CostProfile.load(out)  # kept only if the scheduler can plan with it
        except CostProfileError as exc:
            raise OnboardError(f"{exc} (--force measures it again)") from None
        _log(f"cost profile: keeping {out} (--force measures again)")
        return
    quick, cheapest = args.quick, args.quick and random_weights
    cfg = profiling.ProfilingConfig(args.large, args.small, args.device_class, args.device,
                                    repeats=2 if quick else 7, warmup=1 if quick else 2,
                                    batches=RANDOM_QUICK_BATCHES if cheapest else (1, 2, 4) if quick
                                    else profiling.DEFAULT_BATCHES, threads=args.threads,
                                    trace_unet=args.trace_unet,
                                    handoff_steps=RANDOM_QUICK_HANDOFF_STEPS if cheapest else profiling.HANDOFF_STEPS)
    _log(f"cost: {cfg.repeats} timed repeats after {cfg.warmup} warm-up of the edge step at batch "
         f"{', '.join(map(str, cfg.batches))} (UNet {'traced on a CPU' if cfg.trace_unet else 'eager'}), the device step and "
         f"decode; handoff bytes checked against real payloads at T {', '.join(map(str, cfg.handoff_steps))}"
         + (" (--quick on random weights: the cheapest faithful settings)" if cheapest else ""))
    measured, measurement = profiling.profile(cfg, lambda line: _log(f"cost: {line}"))
    profiling.write(measured, measurement, out)
    edge, handoff = measurement.edge, measurement.handoff
    exact = (f"predicted exactly ({handoff.payloads} real payloads)" if handoff.max_error_bytes == 0
             else f"predicted up to {handoff.max_error_bytes} B off (WARNING: the scheduler prices them so)")
    _log(f"cost profile: edge step {edge.a_s * 1e3:.1f} + {edge.b_s * 1e3:.1f}·n ms (R² {edge.r2:.3f}), "
         f"device step {measurement.small.step_s * 1e3:.1f} ms, decode {measurement.small.decode_s * 1e3:.1f} ms, "
         f"handoff bytes {exact} -> {out}")


def _no_quality_profile(args: argparse.Namespace, pair: str, users: list[str], out_dir: Path) -> Path:
    """Random weights: a quality profile that says there is none (flat), with the codecs asked for
    priced at no loss, so a scheduler ranks every option by its costs alone."""
    from services.scheduler.decide.quality import BASE_USER, random_weights_profile

    profile = random_weights_profile(pair, (BASE_USER, *users), args.codecs)
    path = out_dir / "quality_profile.json"
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    _log(f"quality: none: the packs' weights are random (their manifests say random: true), so their images are "
         f"noise and there is no quality to measure (--measure-random measures their SSIM fidelity anyway); "
         f"wrote a quality profile that says so (random_weights: every option the same): a scheduler on it "
         f"plans by cost alone -> {path}")
    return path


def _quality_profile(args: argparse.Namespace, large, small, users: list[str], out_dir: Path) -> Path:
    from dataclasses import replace

    from tqdm import tqdm

    from services.onboard.evaluator import EvaluatorScore, find_evaluator
    from services.onboard.prompts import load_prompts
    from services.onboard.quality import FULL_GRID, QUICK_GRID, PointStore, QualityMeasurer, measure, profile_json
    from services.scheduler.decide.quality import BASE_USER, QualityProfile

    grid = QUICK_GRID if args.quick else FULL_GRID
    grid = replace(grid, n_prompts=args.n or grid.n_prompts, steps=args.steps or grid.steps, codecs=args.codecs)
    everyone = [BASE_USER, *users]
    evaluator = None if args.no_evaluator else args.evaluator or find_evaluator(args.large)
    scorer = metric = None
    if evaluator is not None:
        try:
            scorer = EvaluatorScore(evaluator, grid.n_prompts, large.device)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise OnboardError(f"--evaluator: cannot load {evaluator}: {exc}") from None
        prompts, metric = scorer.prompts, scorer.metric(grid.n_prompts, grid.encoding)
        _log(f"quality: scored by the pack's evaluator {evaluator} (accuracy; --no-evaluator for fidelity)")
    else:
        prompts = load_prompts(args.large, grid.n_prompts)
    defaults = large.request_defaults()  # the pack's, as every request to it resolves them (tandem.resolve)
    # one file per measure, so a resumed run never mixes fidelity and accuracy points
    store = PointStore(out_dir / ("quality_points_evaluator.jsonl" if scorer else "quality_points.jsonl"))
    measurer = QualityMeasurer(large, small, prompts, grid, float(defaults.guidance_scale), defaults.sampler,
                               scorer)
    total = grid.size(len(everyone))
    _log(f"quality: {total} points (T {', '.join(map(str, grid.steps))}; users {', '.join(everyone)}; "
         f"{grid.n_prompts} prompts each), {len(store.points)} already measured")
    with tqdm(total=total, desc="quality points", unit="pt", disable=args.quiet, file=sys.stderr) as bar:
        def tick(point) -> None:
            if point is not None:
                score = f"accuracy {point.accuracy:.3f}" if point.accuracy is not None else f"SSIM {point.ssim:.3f}"
                bar.set_postfix_str(f"T={point.steps} k={point.split} r={point.merge_ratio:g} {point.user}: {score}")
            bar.update(1)

        measure(measurer, everyone, store, tick)
    profile = profile_json(store, grid, f"{large.name}+{small.name}", everyone, metric)
    try:
        QualityProfile.from_dict(profile)  # the scheduler must be able to read what we write
    except QualityProfileError as exc:
        raise OnboardError(f"the measured quality profile is not usable: {exc}") from None
    path = out_dir / "quality_profile.json"
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return path


def run(args: argparse.Namespace) -> int:
    from tandem.packs import PackError, check_pair, load_pack, quiet_loading

    started = time.perf_counter()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet_loading()
    try:
        large = load_pack(args.large, device=args.device)
        small = load_pack(args.small, device=args.device)
        check_pair(large, small)
    except PackError as exc:
        raise OnboardError(str(exc)) from None
    users = _users(args.users, small.users)
    _log(f"pair {large.name} + {small.name} on {large.device}: checked")
    cost_path = out_dir / "cost_profile.json"
    random_weights = (large.manifest.random or small.manifest.random) and not args.measure_random
    if random_weights:  # no quality to measure: the cost profiling loads the packs it times itself
        pair = f"{large.name}+{small.name}"
        del large, small
        gc.collect()
        _cost_profile(args, cost_path, random_weights=True)
        quality_path = _no_quality_profile(args, pair, users, out_dir)
    else:
        _cost_profile(args, cost_path)
        quality_path = _quality_profile(args, large, small, users, out_dir)
    _log(f"done in {time.perf_counter() - started:.0f} s; start a scheduler on these profiles with:")
    general = DEFAULT_POLICY.parent / "general"  # trained on profile families: no retraining for a new pair
    print(f"python -m services.scheduler --policy {general} --quality-profile {quality_path} --cost-profile {cost_path}")
    print("# (--policy greedy_ls also chooses the handoff codec per link; slower in large frames)")
    print(f"# and plan as this device class: tandem generate ... --scheduler HOST:PORT --device-class {args.device_class}")
    if random_weights:
        print("# the quality profile says none (random weights): the scheduler plans by cost alone")
    return 0


def main(argv: list[str] | None = None) -> int:
    from tandem.threads import configure_threads_or_exit

    args = parse_args(argv)
    configure_threads_or_exit(PROG, args.threads)
    try:
        return run(args)
    except OnboardError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
