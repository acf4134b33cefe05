"""The CPU emulation lane of the CUDA kernels: their own ``csrc/`` sources, built with the host
C++ compiler against ``csrc/emulate/cuda_emulation.h``, run on CPU tensors.

No GPU is lent to most sessions and CI has none, so before this lane a CUDA kernel was only
compiled here (the compile lane) and checked on whatever GPU a later session was lent. The
emulation runs the kernel's code path: its indexing, fragment layouts, pipelines and
synchronization, with every warp collective (shuffle, vote, ``__syncwarp``, mma, ldmatrix) and
block barrier a rendezvous of fibers, and every ``cp.async`` copy landing at the wait that retires
it (or at issue, ``LOWRANK_OPS_EMULATE_COPIES=issue``). What it cannot show: timing, register
pressure, bank conflicts, and arithmetic that the hardware rounds differently (mma sums in double
here; ex2.approx is exp2).

The module ``_C`` has every binding of ``lowrank_ops._C`` (all of csrc/'s kernels:
:data:`EMULATED_SOURCES`), takes host addresses where the real one takes device addresses, and is
loaded under its own name, never as ``lowrank_ops._C``; the CUDA wrappers run it through their
``target`` argument (:func:`target`). The module ``_selftest`` holds unit kernels for the
emulation itself (csrc/emulate/selftest.cu). Both are built once per source hash into the cache
directory (``$LOWRANK_OPS_CACHE_DIR``). Needs Linux (ucontext), a C++17 compiler (``$CXX``, else
c++/g++) and the CUDA toolkit's headers (cuda_fp16.h: found next to nvcc); pybind11.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from lowrank_ops.core import cuda_build, cuda_ext

EMULATED_SOURCES = ("gear_decode.cu", "lowrank_decode.cu", "quant_decode.cu", "sparse_decode.cu")
EMULATION_DIR = cuda_build.CSRC_DIR / "emulate"
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-DLOWRANK_OPS_EMULATE"]
COPIES_ENV = "LOWRANK_OPS_EMULATE_COPIES"  # "issue": cp.async lands at issue; else at the wait that retires it
ORDER_ENV = "LOWRANK_OPS_EMULATE_ORDER"  # "reverse": lanes run in reverse order between collectives
H100_SMS = 132  # the SM count the emulated launch plans assume (:func:`target`)


def find_cxx() -> str | None:
    """The host C++ compiler: ``$CXX``, else c++ or g++ on the PATH."""
    for c in (os.environ.get("CXX"), shutil.which("c++"), shutil.which("g++")):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (holding cuda_fp16.h): next to nvcc, under
    ``$CUDA_HOME`` / ``$CUDA_PATH``, or /usr/local/cuda."""
    nvcc = cuda_build.find_nvcc()
    roots = [Path(nvcc).resolve().parent.parent] if nvcc else []
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots.append(Path("/usr/local/cuda"))
    return next((r / "include" for r in roots if (r / "include" / "cuda_fp16.h").is_file()), None)


def unavailable_reason() -> str:
    """Why the emulation lane cannot build here ("" when it can)."""
    if not sys.platform.startswith("linux"):
        return f"the emulation's fibers need Linux (ucontext), this is {sys.platform}"
    if find_cxx() is None:
        return "no C++ compiler ($CXX, c++ or g++)"
    if cuda_include_dir() is None:
        return "the CUDA toolkit's headers (cuda_fp16.h next to nvcc) were not found"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed"
    return ""


def _sources(name: str) -> list[tuple[Path, bool]]:
    """(file, force-include the emulation header) for every translation unit of module ``name``:
    ``_C`` (the kernels and module.cpp's bindings) or ``_selftest`` (csrc/emulate/selftest.cu,
    unit kernels for the emulation itself)."""
    csrc = cuda_build.CSRC_DIR
    runtime = (EMULATION_DIR / "cuda_emulation.cpp", False)
    if name == "_selftest":
        return [(EMULATION_DIR / "selftest.cu", True), runtime]
    return [*[(csrc / src, True) for src in EMULATED_SOURCES], runtime, (csrc / "module.cpp", False)]


def _source_hash(cxx: str) -> str:
    h = hashlib.sha256()
    csrc = cuda_build.CSRC_DIR
    for p in sorted([*csrc.glob("*.cu"), *csrc.glob("*.h"), *csrc.glob("*.cuh"), *csrc.glob("*.cpp"),
                     *EMULATION_DIR.iterdir()]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((FLAGS, cxx, cuda_build.ext_filename(), Path(__file__).read_bytes())).encode())
    return h.hexdigest()[:16]


def _filename(name: str) -> str:
    """The file of emulated module ``name``: the extension's file name with ``name`` for its module's."""
    return name + cuda_build.ext_filename()[len(cuda_build.MODULE_NAME):]


def build(out_dir: Path, name: str = "_C", verbose: bool = False) -> Path:
    """Compile the emulated module ``name`` (:func:`_sources`) into ``out_dir`` and return its path
    (atomic: renamed into place)."""
    why = unavailable_reason()
    if why:
        raise cuda_build.CudaBuildError(f"the CUDA emulation cannot build here: {why}")
    cxx = find_cxx()
    incs = [*cuda_build.include_flags(cuda_build.CSRC_DIR), f"-I{cuda_include_dir()}"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowrank_ops_emulation_") as tmp:
        jobs = []
        for src, shim in _sources(name):
            obj = str(Path(tmp) / (src.name + ".o"))
            head = ["-include", str(EMULATION_DIR / "cuda_emulation.h"), "-x", "c++"] if shim else []
            jobs.append(([cxx, *FLAGS, *incs, *head, "-c", str(src), "-o", obj], obj))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            list(pool.map(lambda job: cuda_build._run(job[0], verbose), jobs))
        target = out_dir / _filename(name)
        partial = out_dir / (target.name + f".tmp{os.getpid()}")
        cuda_build._run([cxx, "-shared", *[obj for _, obj in jobs], "-o", str(partial)], verbose)
        os.replace(partial, target)
    return target


def target() -> cuda_ext.LaunchTarget:
    """The emulated module as a launch target for the CUDA wrappers' ``target`` argument: CPU
    tensors, stream 0, and 132 SMs (an H100's count: launch plans sized as on the GPU the kernels
    were timed on)."""
    return cuda_ext.LaunchTarget(load(), 0, H100_SMS, "cpu")


@functools.lru_cache(maxsize=None)
def load(name: str = "_C") -> ModuleType:
    """The emulated module ``name`` (built on first use, then cached on disk by source hash; see
    :func:`_sources`). Raises :class:`~lowrank_ops.core.cuda_build.CudaBuildError` when it cannot build."""
    cxx = find_cxx() or ""
    out = cuda_ext.default_cache_dir().parent / "emulation" / _source_hash(cxx)
    target = out / _filename(name)
    if not target.is_file():
        build(out, name)
    spec = importlib.util.spec_from_file_location(f"lowrank_ops_emulation.{name}", target)  # never lowrank_ops._C
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the emulated module from {target}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
