"""Generates the gRPC stubs from comfyrelay's proto at build time, into the build directory only.

The proto is found at ``proto/`` beside this file (an unpacked sdist) or at the repository's ``proto/``
two levels up (``pip install ./clients/python`` from a checkout). The runtime requirements follow the
generator: stubs made by grpcio-tools X need grpcio >= X and a protobuf at least as new as the one it
used.
"""

import importlib.metadata
import importlib.resources
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO = "comfyrelay/v1/comfyrelay.proto"


def proto_root() -> pathlib.Path:
    for candidate in (HERE / "proto", HERE.parent.parent / "proto"):
        if (candidate / PROTO).is_file():
            return candidate
    raise RuntimeError(f"cannot find {PROTO}: build from a comfyrelay checkout (pip install ./clients/python)")


class BuildWithStubs(build_py):
    """Runs grpc_tools.protoc into build_lib after the hand-written modules are copied."""

    def run(self) -> None:
        super().run()
        from grpc_tools import protoc

        out = pathlib.Path(self.build_lib)
        (out / "comfyrelay" / "v1").mkdir(parents=True, exist_ok=True)
        include = importlib.resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root()}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")
        (out / "comfyrelay" / "v1" / "__init__.py").write_text(
            '"""Generated at build time from proto/comfyrelay/v1/comfyrelay.proto."""\n'
        )


def runtime_requirements() -> list:
    tools = importlib.metadata.version("grpcio-tools")
    protobuf = importlib.metadata.version("protobuf")
    return [
        f"grpcio>={tools}",
        f"protobuf>={protobuf}",
        "grpcio-status>=1.66",
        "googleapis-common-protos>=1.63",
    ]


setup(cmdclass={"build_py": BuildWithStubs}, install_requires=runtime_requirements())
