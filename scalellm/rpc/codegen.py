"""Regenerates the protobuf code in scalellm/rpc/pb/ from proto/scalellm/v1/replica.proto.

Run from a source checkout (needs grpcio-tools, a dev dependency):

    python -m scalellm.rpc.codegen            # rewrites scalellm/rpc/pb/
    python -m scalellm.rpc.codegen OUT_DIR    # writes elsewhere (tests compare the two)

Only the message code (`replica_pb2.py` and its `.pyi` type stub) is generated: the service's method
table lives in convert.py, so the generated gRPC glue (and its grpcio version pin) is not needed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "scalellm/v1/replica.proto"
PB_DIR = Path(__file__).resolve().parent / "pb"
GENERATED_FILES = ("replica_pb2.py", "replica_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto into `out_dir`; returns the written files. Raises RuntimeError if protoc fails."""
    from grpc_tools import protoc  # dev dependency, imported only here

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                str(PROTO_ROOT / PROTO_FILE)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        generated_dir = Path(tmp) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED_FILES:
            target = out_dir / name
            shutil.copyfile(generated_dir / name, target)
            written.append(target)
    _fix_module_name(out_dir / "replica_pb2.py")
    return written


def _fix_module_name(path: Path) -> None:
    """protoc names the module after the proto package; name it after where it really lives."""
    text = path.read_text()
    path.write_text(text.replace("'scalellm.v1.replica_pb2'", "'scalellm.rpc.pb.replica_pb2'"))


def main() -> None:
    """Entry point: `python -m scalellm.rpc.codegen [OUT_DIR]`."""
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else PB_DIR
    for path in generate(out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
