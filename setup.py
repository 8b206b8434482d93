"""Generates convoy.protos from protos/*.proto with grpcio-tools before the build copies modules.

The generated modules are written beside the .proto files (git ignores them), so editable and
wheel installs see the same code. Nothing in them is edited by hand; the one rewrite below turns
protoc's top-level import of a sibling module into a package-relative one.
"""

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_DIR = Path(__file__).resolve().parent / "protos"


def generate_protos() -> None:
    from grpc_tools import protoc

    sources = sorted(PROTO_DIR.glob("*.proto"))
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={PROTO_DIR}",
        f"--pyi_out={PROTO_DIR}",
        f"--grpc_python_out={PROTO_DIR}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(s.name for s in sources))
    stems = [s.stem for s in sources]
    pattern = re.compile(r"^import (" + "|".join(stems) + r")_pb2 as ", re.MULTILINE)
    for generated in list(PROTO_DIR.glob("*_pb2.py")) + list(PROTO_DIR.glob("*_pb2_grpc.py")):
        text = generated.read_text()
        fixed = pattern.sub(r"from . import \1_pb2 as ", text)
        if fixed != text:
            generated.write_text(fixed)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
