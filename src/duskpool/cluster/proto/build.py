"""Regenerate duskpool_pb2*.py from duskpool.proto (needs grpcio-tools): python -m duskpool.cluster.proto.build"""

from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).parent

if __name__ == "__main__":
    root = HERE.parents[2]  # src/, so imports read `duskpool.cluster.proto.duskpool_pb2`
    proto = HERE / "duskpool.proto"
    code = protoc.main(["protoc", f"-I{root}", f"--python_out={root}", f"--grpc_python_out={root}",
                        f"--pyi_out={root}", str(proto.relative_to(root))])
    raise SystemExit(code)
