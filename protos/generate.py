"""Generate the Python stubs of clipsearch.v1 next to the .proto files.

Run `make proto` (or `python protos/generate.py [OUT_DIR]`). The generated files are
committed so that installing the package needs no code generator; a test regenerates
them and fails if the committed copies are stale or were edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc  # a dev dependency: the generated files are committed

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(PROTO_ROOT.glob("clipsearch/v1/*.proto"))


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "clipsearch" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
