"""Generates convoy.protos from protos/*.proto with grpcio-tools before the build copies modules,
and builds the native front end (server/native, a Rust crate) into convoy.server._native.

The generated modules are written beside the .proto files (git ignores them), so editable and
wheel installs see the same code. Nothing in them is edited by hand; the one rewrite below turns
protoc's top-level import of a sibling module into a package-relative one.

The extension is optional: without a Rust toolchain the install goes on without it, and
`convoy serve` says at start that it serves with the Python front end and why. It is built
against the stable ABI (abi3, CPython 3.11+), so one wheel serves every later CPython.
"""

import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools_rust import Binding, RustExtension

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


NATIVE = RustExtension(
    "convoy.server._native",
    path="server/native/py/Cargo.toml",
    binding=Binding.PyO3,
    py_limited_api="cp311",
    optional=True,
    debug=False,
)

setup(
    cmdclass={"build_py": BuildPyWithProtos},
    rust_extensions=[NATIVE],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
