"""Build ``lowrank_ops._C`` from ``csrc/`` with nvcc alone (no torch C++ API).

Standard library only: ``setup.py`` loads this file by path (before the package is installed)
and :mod:`lowrank_ops.core.cuda_ext` uses it to build into a cache directory. pybind11 is
imported only to find its headers, when a build actually runs.

What it does: every ``csrc/*.cu`` and ``csrc/module.cpp`` is compiled to an object file, in
parallel, the ``.cu`` files for every requested architecture (``-gencode``, SASS per arch plus
PTX of the newest for forward compatibility); then nvcc links one shared library with the CUDA
runtime linked statically (``-cudart static``), so the module imports on a machine without a
GPU or driver and does not depend on the libcudart that torch ships.

Environment:
  ``LOWRANK_OPS_CUDA_ARCHS``  architectures, e.g. ``"80;90"`` (default ``80;90``)
  ``NVCC``                    the nvcc to use (else ``$CUDA_HOME/bin/nvcc``, the PATH, /usr/local/cuda)
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DEFAULT_ARCHS = ("80", "90")
ARCHS_ENV = "LOWRANK_OPS_CUDA_ARCHS"
MODULE_NAME = "_C"
CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"  # the source checkout's csrc/

COMMON_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]


class CudaBuildError(RuntimeError):
    """nvcc is missing or a compile/link step failed (the message carries nvcc's output)."""


def find_nvcc() -> str | None:
    """Path of nvcc, or None: ``$NVCC``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, PATH, /usr/local/cuda."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def ext_filename() -> str:
    """``_C`` plus this interpreter's extension suffix, e.g. ``_C.cpython-312-x86_64-linux-gnu.so``."""
    return MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def parse_archs(archs: object = None) -> list[str]:
    """``["80", "90"]`` from a list, ``"80;90"``/``"8.0,9.0"``/``"sm_90"``, ``$LOWRANK_OPS_CUDA_ARCHS`` or the default."""
    if archs is None:
        archs = os.environ.get(ARCHS_ENV) or list(DEFAULT_ARCHS)
    if isinstance(archs, str):
        archs = archs.replace(",", ";").replace(" ", ";").split(";")
    out = []
    for a in archs:
        a = str(a).strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not a:
            continue
        if not a.rstrip("af").isdigit():
            raise ValueError(f"CUDA arch: expected something like '90' or 'sm_90', got {a!r}")
        if a not in out:
            out.append(a)
    if not out:
        raise ValueError("CUDA arch: empty list")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = archs[-1]
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX for newer GPUs
    return flags


def sources(csrc_dir: Path | str = CSRC_DIR) -> list[Path]:
    """All ``*.cu`` files plus ``module.cpp`` (the bindings) in ``csrc_dir``."""
    csrc_dir = Path(csrc_dir)
    module = csrc_dir / "module.cpp"
    if not module.is_file():
        raise CudaBuildError(f"{module} not found: is csrc/ part of this checkout?")
    return sorted(csrc_dir.glob("*.cu")) + [module]


def include_flags(csrc_dir: Path) -> list[str]:
    try:
        import pybind11  # noqa: PLC0415 (only needed for a build)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CudaBuildError("pybind11 is needed to build lowrank_ops._C: pip install pybind11") from exc
    incs = [str(csrc_dir), pybind11.get_include(), sysconfig.get_paths()["include"]]
    plat = sysconfig.get_paths().get("platinclude")
    if plat and plat not in incs:
        incs.append(plat)
    return [f"-I{i}" for i in incs]


def source_hash(csrc_dir: Path | str = CSRC_DIR, archs: object = None, nvcc: str | None = None) -> str:
    """Digest of the sources, headers, archs, flags, nvcc path and Python ABI (cache key)."""
    csrc_dir = Path(csrc_dir)
    h = hashlib.sha256()
    files = sorted(p for p in csrc_dir.iterdir() if p.suffix in (".cu", ".cpp", ".h", ".cuh", ".hpp"))
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((parse_archs(archs), COMMON_FLAGS, nvcc or find_nvcc(), ext_filename(), Path(__file__).read_bytes())).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], verbose: bool) -> str:
    if verbose:
        print(" ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise CudaBuildError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return proc.stdout


def build(
    out_dir: Path | str,
    *,
    csrc_dir: Path | str = CSRC_DIR,
    archs: object = None,
    nvcc: str | None = None,
    extra_flags: list[str] | None = None,
    verbose: bool = False,
) -> Path:
    """Compile ``csrc/`` into ``out_dir/_C<EXT_SUFFIX>`` and return that path.

    ``extra_flags`` go to every nvcc compile (e.g. ``["-Xptxas", "-v"]``). Raises
    :class:`CudaBuildError` when nvcc is missing or a step fails. The output appears
    atomically (written under a temporary name, then renamed).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set $NVCC or $CUDA_HOME, or put nvcc on the PATH)")
    csrc_dir = Path(csrc_dir).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch_list = parse_archs(archs)
    srcs = sources(csrc_dir)
    incs = include_flags(csrc_dir)
    extra = list(extra_flags or [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowrank_ops_build_") as tmp:
        jobs = []
        for src in srcs:
            obj = str(Path(tmp) / (src.name + ".o"))
            cmd = [nvcc, *COMMON_FLAGS, *incs, *extra, "-c", str(src), "-o", obj]
            if src.suffix == ".cu":
                cmd[1:1] = [*gencode_flags(arch_list), "--threads", str(len(arch_list) + 1)]
            jobs.append((cmd, obj))
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            logs = list(pool.map(lambda job: _run(job[0], verbose), jobs))
        target = out_dir / ext_filename()
        partial = out_dir / (ext_filename() + f".tmp{os.getpid()}")
        link = [nvcc, "-shared", "-cudart", "static", "-Xcompiler", "-fPIC", *[o for _, o in jobs], "-o", str(partial)]
        logs.append(_run(link, verbose))
        os.replace(partial, target)
    if verbose:
        for log in logs:
            if log.strip():
                print(log, file=sys.stderr)
        print(f"built {target} for sm_{',sm_'.join(arch_list)} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python lowrank_ops/core/cuda_build.py OUT_DIR [ARCHS] [-v]``: build by hand."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--archs", default=None, help="e.g. '80;90' (default $LOWRANK_OPS_CUDA_ARCHS or 80;90)")
    p.add_argument("--ptxas-verbose", action="store_true", help="print register/spill use per kernel")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    extra = ["-Xptxas", "-v"] if a.ptxas_verbose else None
    path = build(a.out_dir, archs=a.archs, extra_flags=extra, verbose=a.verbose or a.ptxas_verbose)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
