"""Build script: pure-Python package plus, where nvcc is found, the CUDA module lowrank_ops._C.

``LOWRANK_OPS_BUILD_CUDA``: ``0`` never build ``_C``; ``1`` build it and fail if nvcc is
missing or the build fails; unset: build it when nvcc is found. ``LOWRANK_OPS_CUDA_ARCHS``
picks the GPU architectures (default ``80;90``). The build itself lives in
``lowrank_ops/core/cuda_build.py`` (standard library only), loaded here by file path because
the package is not installed yet.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_ENV = "LOWRANK_OPS_BUILD_CUDA"


def _load_cuda_build():
    spec = importlib.util.spec_from_file_location("_lowrank_ops_cuda_build", ROOT / "lowrank_ops" / "core" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cuda_build = _load_cuda_build()


class CudaExtension(Extension):
    """Built by nvcc through cuda_build, not by setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildCudaExt(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        built = cuda_build.build(out.parent, csrc_dir=ROOT / "csrc", verbose=self.verbose > 0)
        if built.name != out.name:  # setuptools and sysconfig disagree on the suffix: trust setuptools
            os.replace(built, out)
        print(f"lowrank_ops: built {out}")


def _ext_modules():
    mode = os.environ.get(BUILD_ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"${BUILD_ENV}: expected 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return []
    if cuda_build.find_nvcc() is None:
        if mode == "1":
            raise SystemExit(f"${BUILD_ENV}=1 but nvcc was not found (set $NVCC or $CUDA_HOME, or put nvcc on the PATH)")
        print("lowrank_ops: nvcc not found, skipping the CUDA module lowrank_ops._C", file=sys.stderr)
        return []
    if not (ROOT / "csrc" / "module.cpp").is_file():
        if mode == "1":
            raise SystemExit(f"${BUILD_ENV}=1 but csrc/module.cpp is missing")
        return []
    return [CudaExtension("lowrank_ops._C")]


setup(
    packages=find_packages(include=["lowrank_ops", "lowrank_ops.*"]) + ["lowrank_ops.kernels"],
    package_dir={"lowrank_ops": "lowrank_ops", "lowrank_ops.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildCudaExt},
)
