"""Generate the Python stubs of clipsearch.v1 next to the .proto files.

Run `make proto` (or `python protos/generate.py [OUT_DIR]`). The generated files are
committed so that installing the package needs no code generator; a test regenerates
them and fails if the committed copies are stale or were edited by hand.

Four files: the messages (`_pb2.py`), the gRPC stubs and servicer (`_pb2_grpc.py`), and
their typed interfaces from mypy-protobuf (`_pb2.pyi`, `_pb2_grpc.pyi`), so that every
RPC of `ClipSearchStub` / `ClipSearchAsyncStub` has its request and response types. The
versions of grpcio-tools and mypy-protobuf are pinned in the [dev] extra: the output is
reproducible byte for byte from the same versions.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc  # a dev dependency: the generated files are committed

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(PROTO_ROOT.glob("clipsearch/v1/*.proto"))
PLUGINS = ("protoc-gen-mypy", "protoc-gen-mypy_grpc")  # from mypy-protobuf


def plugin_path(name: str) -> str:
    """A protoc plugin of this interpreter's environment (found even if it is not on PATH)."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install mypy-protobuf (or `make setup-dev`)")
    return found


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        *(f"--plugin={name}={plugin_path(name)}" for name in PLUGINS),
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "clipsearch" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT):
        print(path)
