"""Compile lane: build every Triton kernel for real GPU targets on a machine without a GPU.

Each kernel module lists :class:`CompileCase` entries in ``COMPILE_CASES``; the modules are
named once, in :data:`KERNEL_MODULES`. Run as

    TRITON_INTERPRET=0 python -m lowrank_ops.kernels._compile_check [--arch 80 90] [--only NAME] [--all-configs]

to compile every case for every arch and print one JSON list of results (cubin and shared
memory size per compile; a kernel that needs more shared memory than the arch has fails), or
with ``--main-loop`` to count the SASS instructions of chosen cases' main loops.
It must run in its own process with the interpreter off: under ``TRITON_INTERPRET=1``
``@triton.jit`` makes interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import importlib
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

# Every Triton kernel module of the package (relative to lowrank_ops.kernels); add new families here.
KERNEL_MODULES = ("lowrank", "quant", "sparse", "kvcache_compress", "kvcache_lowrank", "kvcache_decompress",
                  "kvcache_attention")
ARCHS = (80, 90)


@dataclass(frozen=True)
class CompileCase:
    """One specialization of one kernel to compile.

    ``signature`` gives the Triton type of every runtime argument (``"*fp16"``, ``"i32"``,
    ``"fp32"``...), ``constexprs`` the value of every ``tl.constexpr`` argument that is not a
    block size. An ``@triton.autotune`` kernel takes block sizes, ``num_warps`` and
    ``num_stages`` from its first config (or from each config, ``--all-configs``) that survives
    its pruning for runtime arguments 1 (or the values in ``args``); a plain ``@triton.jit``
    kernel takes them from ``constexprs`` and ``options``.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


# Shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90) opt-in limits.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "i8": "int8", "u8": "uint8", "i16": "int16", "i32": "int32"}


def _example_args(case: CompileCase) -> dict[str, Any]:
    """Stand-ins for the runtime arguments, enough for an autotuner's config pruning (dtypes;
    integers 1 unless the case names them)."""
    import torch

    return {
        name: torch.empty(0, dtype=getattr(torch, _TORCH_DTYPES[ty[1:]])) if ty.startswith("*")
        else case.args.get(name, 1)
        for name, ty in case.signature.items()
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
        configs = kernel.early_config_prune(configs, _example_args(case), **case.constexprs)
    index = {id(c): i for i, c in enumerate(kernel.configs)}  # label by position in the kernel's table
    return [
        (
            f"{case.name}#{index[id(config)]}",
            kernel.fn,
            {**case.constexprs, **config.kwargs},
            {"num_warps": config.num_warps, "num_stages": config.num_stages,
             **({"maxnreg": config.maxnreg} if config.maxnreg else {}), **case.options},
        )
        for config in (configs if all_configs else configs[:1])
    ]


def _compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any], arch: int,
             divisible: tuple[str, ...] = ()):
    """Triton's compiled kernel for ``sm_{arch}``. ``divisible``: runtime arguments declared
    multiples of 16 (for pointers: 16-byte aligned), as Triton's launcher specializes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    types = {**signature, **{name: "constexpr" for name in constexprs}}
    missing = [name for name in fn.arg_names if name not in types]
    if missing:
        raise ValueError(f"no type or value for arguments {missing}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in divisible}
    source = ASTSource(fn=fn, signature={name: types[name] for name in fn.arg_names}, constexprs=constexprs,
                       attrs=attrs)
    return compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_one(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], options: dict[str, Any], arch: int):
    """Compile ``fn`` for ``sm_{arch}``; return ``(cubin bytes, shared memory bytes)``."""
    compiled = _compile(fn, signature, constexprs, options, arch)
    return len(compiled.asm["cubin"]), compiled.metadata.shared


def main_loop(case: CompileCase, overrides: dict[str, Any], divisible_ints: tuple[str, ...] = (),
              arch: int = 90, config: int = 0) -> tuple[list[str], int]:
    """``(opcodes of the main loop, registers per thread)`` of ``case`` (its kernel's autotune row
    ``config``, constexprs updated by ``overrides``) compiled for ``sm_{arch}`` as a real launch
    specializes it (every pointer 16-byte aligned, ``divisible_ints`` multiples of 16),
    disassembled by the nvdisasm Triton ships (registers: its cuobjdump). The main loop is the
    longest span from a label to a branch back to it that holds tensor-core instructions (HMMA,
    or HGMMA for wgmma). These static counts are the instruction budgets the README and docs/gear-speed.md quote and
    ``tests/test_kernels_sass_budget.py`` holds."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    rows = variants(case, True)
    chosen = [row for row in rows if row[0] == f"{case.name}#{config}"] or rows[config:config + 1]  # plain jit: one row
    if not chosen:
        raise ValueError(f"{case.name}: no autotune row {config}")
    _, fn, constexprs, options = chosen[0]
    pointers = tuple(name for name, ty in case.signature.items() if ty.startswith("*"))
    compiled = _compile(fn, case.signature, {**constexprs, **overrides}, options, arch, pointers + divisible_ints)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        lines = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    loops = [[m.group(1) for line in lines[first:last + 1]
              if (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line))]
             for first, last in spans]
    loops = [ops for ops in loops if any(op.startswith(("HMMA", "HGMMA")) for op in ops)]
    if not loops:
        raise ValueError(f"{case.name}: no loop with tensor-core instructions in the SASS")
    return max(loops, key=len), int(re.search(r"REG:(\d+)", usage).group(1))


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
        if only is None or any(part in case.name for part in only.split(","))
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
    parser.add_argument("--only", default=None,
                        help="compile only cases whose name contains this (or one of these, comma-separated)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--main-loop", metavar="JSON", help='instead: [{"case": NAME, "set": {...}, "divisible": '
                        '[INT ARG, ...], "config": AUTOTUNE ROW}, ...] -> the sm_90 main-loop instruction count, '
                        'opcodes and registers per thread of each')
    args = parser.parse_args()
    if args.main_loop:
        cases = {case.name: case for _, case in all_cases()}
        rows = []
        for spec in json.loads(args.main_loop):
            ops, registers = main_loop(cases[spec["case"]], spec.get("set", {}), tuple(spec.get("divisible", ())),
                                       config=spec.get("config", 0))
            opcodes = collections.Counter(op.split(".")[0] for op in ops)
            rows.append(dict(spec, instructions=len(ops), opcodes=opcodes, registers=registers))
        print(json.dumps(rows, indent=1))
        return
    print(json.dumps(run(tuple(args.arch), args.only, args.all_configs, args.jobs), indent=1))


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    main()
