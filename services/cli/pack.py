"""tandem-pack: true-size pack pairs with the published architectures and seeded random weights,
built offline into a cache directory (tandem/true_size.py).

    tandem-pack params sd15                 parameter counts next to the published ones (no weights)
    tandem-pack build sd15 [--out DIR]      DIR/large (SD 1.5) and DIR/small (BK-SDM-Small), fp16

The default DIR is $TANDEM_PACK_CACHE/NAME (default ~/.cache/tandem/packs/NAME). A complete pair
already there is kept (--force rebuilds it); a partial or corrupt one is named and rebuilt. Their
images are noise: the manifests say random, and so does every command that loads them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROG = "tandem-pack"


def default_cache() -> Path:
    base = os.environ.get("TANDEM_PACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem" / "packs"
    return Path(base)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from tandem.true_size import PAIRS

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="parameter counts of a pair's architectures, next to the published ones")
    params.add_argument("pair", choices=sorted(PAIRS))
    build = commands.add_parser("build", help="build a pair into a cache directory (fp16, random weights)")
    build.add_argument("pair", choices=sorted(PAIRS))
    build.add_argument("--out", type=Path, default=None, help=f"where (default: {default_cache()}/PAIR)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even when a complete pair is there")
    return parser.parse_args(argv)


def print_parameters(pair: str) -> bool:
    """Prints the table; True when every count is within 1% of the published one."""
    from tandem.true_size import PAIRS, parameter_table

    rows = parameter_table(PAIRS[pair])
    print("| pack | component | architecture | parameters | published | deviation |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        c = row.component
        print(f"| {row.pack} | {c.name} | {c.published_as} | {row.parameters:,} | {c.published_parameters:,} | "
              f"{row.deviation:+.2%} |")
    return all(abs(row.deviation) <= 0.01 for row in rows)


def print_weight_bytes(out: Path) -> None:
    for role in ("large", "small"):
        for component in sorted(p for p in (out / role).iterdir() if p.is_dir()):
            weights = sum(f.stat().st_size for f in component.glob("*.safetensors"))
            if weights:
                print(f"  {role}/{component.name}: {weights / 1e6:,.1f} MB of fp16 weights")


def build(args: argparse.Namespace) -> int:
    from tandem.packs import _available_memory
    from tandem.true_size import PAIRS, build_memory_bytes, build_pair, cached_pair

    out = args.out or default_cache() / args.pair
    if out.exists() and not args.force:
        why = cached_pair(out)
        if why is None:
            print(f"{PROG}: {out} holds a complete {args.pair} pair already (--force rebuilds it)")
            print_weight_bytes(out)
            print("their weights are random: images are noise; use them for time, memory and bytes")
            return 0
        print(f"{PROG}: {out} is not a complete pair ({why}): rebuilding it", file=sys.stderr)
    need, free = build_memory_bytes(PAIRS[args.pair]), _available_memory()
    if free is not None and need > free:
        print(f"{PROG}: error: building {args.pair} needs about {need / 2**30:.1f} GiB of memory; "
              f"this machine has {free / 2**30:.1f} GiB free", file=sys.stderr)
        return 2
    if not print_parameters(args.pair):
        print(f"{PROG}: error: a parameter count is more than 1% from the published one", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    large, small = build_pair(args.pair, out, seed=args.seed, progress=lambda line: print(f"{PROG}: {line}", flush=True))
    print(f"{PROG}: wrote {large} and {small} in {time.perf_counter() - t0:.0f} s")
    print_weight_bytes(out)
    print("their weights are random (seeded): images are noise; use them for time, memory and bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "params":
            return 0 if print_parameters(args.pair) else 1
        return build(args)
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the partial build is discarded at the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
