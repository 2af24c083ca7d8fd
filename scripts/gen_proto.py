"""Regenerates the Python wire code from proto/ (run after editing a .proto; a test fails if stale).

    .venv/bin/python scripts/gen_proto.py [OUT_ROOT]

Writes tandem/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under OUT_ROOT (default: the repo root),
so the generated modules import as `tandem.v1.edge_pb2`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_root / "tandem" / "v1"
    (package / "__init__.py").write_text('"""Generated wire code (scripts/gen_proto.py); do not edit."""\n')
    return sorted(p for p in package.iterdir() if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path.relative_to(out))
