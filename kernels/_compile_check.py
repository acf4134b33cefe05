"""Compile lane: build every Triton kernel for real GPU targets on a machine without a GPU.

Each kernel module lists :class:`CompileCase` entries in ``COMPILE_CASES``; the modules are
named once, in :data:`KERNEL_MODULES`. Run as

    TRITON_INTERPRET=0 python -m lowrank_ops.kernels._compile_check [--arch 80 90] [--only NAME] [--all-configs]

to compile every case for every arch and print one JSON list of results (cubin and shared
memory size per compile; a kernel that needs more shared memory than the arch has fails).
It must run in its own process with the interpreter off: under ``TRITON_INTERPRET=1``
``@triton.jit`` makes interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

# Every Triton kernel module of the package (relative to lowrank_ops.kernels); add new families here.
KERNEL_MODULES = ("lowrank", "quant", "sparse", "kvcache_compress", "kvcache_attention")
ARCHS = (80, 90)


@dataclass(frozen=True)
class CompileCase:
    """One specialization of one kernel to compile.

    ``signature`` gives the Triton type of every runtime argument (``"*fp16"``, ``"i32"``,
    ``"fp32"``...), ``constexprs`` the value of every ``tl.constexpr`` argument that is not a
    block size. An ``@triton.autotune`` kernel takes block sizes, ``num_warps`` and
    ``num_stages`` from its first config (or from each config, ``--all-configs``); a plain
    ``@triton.jit`` kernel takes them from ``constexprs`` and ``options``.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


# Shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90) opt-in limits.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "i8": "int8", "u8": "uint8", "i16": "int16", "i32": "int32"}


def _example_args(signature: dict[str, str]) -> dict[str, Any]:
    """Stand-ins for the runtime arguments, enough for an autotuner's config pruning (dtypes)."""
    import torch

    return {
        name: torch.empty(0, dtype=getattr(torch, _TORCH_DTYPES[ty[1:]])) if ty.startswith("*") else 1
        for name, ty in signature.items()
    }


def variants(case: CompileCase, all_configs: bool) -> list[tuple[str, Any, dict[str, Any], dict[str, Any]]]:
    """``(label, jit_fn, constexprs, options)``: per autotune config that survives the kernel's
    pruning for this case (all of them, or the first), or the case itself for a plain kernel."""
    from triton.runtime.autotuner import Autotuner

    kernel = case.kernel
    if not isinstance(kernel, Autotuner):
        return [(case.name, kernel, dict(case.constexprs), dict(case.options))]
    configs = list(kernel.configs)
    if kernel.early_config_prune is not None:
        configs = kernel.early_config_prune(configs, _example_args(case.signature), **case.constexprs)
    index = {id(c): i for i, c in enumerate(kernel.configs)}  # label by position in the kernel's table
    return [
        (
            f"{case.name}#{index[id(config)]}",
            kernel.fn,
            {**case.constexprs, **config.kwargs},
            {"num_warps": config.num_warps, "num_stages": config.num_stages, **case.options},
        )
        for config in (configs if all_configs else configs[:1])
    ]


def compile_one(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any], arch: int):
    """Compile ``fn`` for ``sm_{arch}``; return ``(cubin bytes, shared memory bytes)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    types = {**signature, **{name: "constexpr" for name in constexprs}}
    missing = [name for name in fn.arg_names if name not in types]
    if missing:
        raise ValueError(f"no type or value for arguments {missing}")
    source = ASTSource(fn=fn, signature={name: types[name] for name in fn.arg_names}, constexprs=constexprs)
    compiled = compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return len(compiled.asm["cubin"]), compiled.metadata.shared


@functools.lru_cache(maxsize=None)
def all_cases() -> tuple[tuple[str, CompileCase], ...]:
    """``(module, case)`` for every case of every module in :data:`KERNEL_MODULES`."""
    out = []
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"lowrank_ops.kernels.{module}")
        out += [(module, case) for case in mod.COMPILE_CASES]
    return tuple(out)


def _compile_job(job: tuple[int, int, int, bool]) -> dict:
    """One compile, by index (jobs cross process boundaries; kernels do not pickle)."""
    case_index, variant_index, arch, all_configs = job
    module, case = all_cases()[case_index]
    label, fn, constexprs, options = variants(case, all_configs)[variant_index]
    row: dict[str, Any] = dict(module=module, case=case.name, variant=label, arch=arch)
    start = time.perf_counter()
    try:
        cubin, shared = compile_one(fn, case.signature, constexprs, options, arch)
        row.update(ok=shared <= SHARED_LIMIT[arch], cubin_bytes=cubin, shared_bytes=shared)
        if not row["ok"]:
            row["error"] = f"needs {shared} B of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}"
    except Exception:  # reported, not raised: one broken kernel must not hide the others
        row.update(ok=False, error=traceback.format_exc(limit=-6))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(
    archs: tuple[int, ...] = ARCHS, only: str | None = None, all_configs: bool = False, jobs: int = 1
) -> list[dict]:
    """Compile the selected cases for ``archs`` in ``jobs`` processes; one result row per compile."""
    todo = [
        (i, v, arch, all_configs)
        for i, (_, case) in enumerate(all_cases())
        if only is None or only in case.name
        for v in range(len(variants(case, all_configs)))
        for arch in archs
    ]
    if jobs <= 1:
        return [_compile_job(job) for job in todo]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_job, todo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--only", default=None, help="compile only cases whose name contains this")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args()
    print(json.dumps(run(tuple(args.arch), args.only, args.all_configs, args.jobs), indent=1))


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    main()
