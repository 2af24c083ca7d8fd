"""How many CPU threads torch and OpenMP use in a Tandem process (torch-free; call before torch loads).

torch's default (one thread per core, OpenMP threads spinning while they wait) collapses when the
cores are shared: on a 2-core machine with one other busy process the generation ran 3.2x slower
than with one thread (24x in one loaded run). So the default is half the cores, 1 to 4 threads,
with OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of spinning). `--threads N` (CLI) or
TANDEM_THREADS=N (every command and service) overrides it; an explicit OMP_NUM_THREADS is kept.
"""

from __future__ import annotations

import os
import sys

ENV = "TANDEM_THREADS"


def default_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def parse_threads(text: str, source: str) -> int:
    """A positive thread count; ValueError naming `source` (a flag or variable) otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{source}: must be a positive integer, got {text!r}")
    return value


def configure_threads(threads: int | None = None) -> int:
    """Sets the thread count (argument, else TANDEM_THREADS, else OMP_NUM_THREADS, else the
    default) and the passive wait policy; returns the count. Before torch is imported this goes
    through the environment (OpenMP reads it once); after, through torch.set_num_threads."""
    if threads is None and os.environ.get(ENV):
        threads = parse_threads(os.environ[ENV], ENV)
    explicit = threads is not None
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    threads = threads or default_threads()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    if explicit and "torch" in sys.modules:  # torch already loaded (e.g. called in-process): only when asked
        sys.modules["torch"].set_num_threads(threads)
    return threads


def configure_threads_or_exit(prog: str, threads: int | None = None) -> int:
    """configure_threads for a command's entry point: a bad TANDEM_THREADS is one line, exit 2."""
    try:
        return configure_threads(threads)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
