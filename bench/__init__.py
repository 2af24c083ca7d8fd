"""The benchmarks (BENCHMARKS.md has their results). Run from the repository root, as modules of
this package: `.venv/bin/python -m bench.NAME [...]`. As modules they import the installed `tandem`
and `services`, the testbed (`tools`, which is not installed: development only) and each other;
`python bench/NAME.py` still works for a bench that imports neither `tools` nor another bench.
Processes are started through services/common/launcher.py (a bench adds only hooks, such as the
namespace a host's process runs in); nothing here imports from `tests` (an import contract)."""
