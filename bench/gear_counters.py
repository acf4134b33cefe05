"""Hardware counters of the GEAR decode kernels: why they issue so few instructions per cycle.

    python bench/gear_counters.py      # on a CUDA machine with Nsight Compute (device_check step "counters")

The static analysis (docs/gear-speed.md) says the full configuration needs about half the H100's
peak issue rate to be twice as fast as SDPA; the H100 measured 28-37 % for the Triton kernel and
never timed the rebuilt CUDA kernel. Timing alone cannot say what the warps wait for, so this runs
one call of each (case, configuration, method) under ``ncu`` (its own process, re-running this
file with ``--child``) and prints, per kernel: time, instructions per warp (against the SASS
counts), issue-slot use, active and eligible warps per scheduler, achieved occupancy, DRAM
throughput, registers, shared-memory bank conflicts and the largest warp-stall reasons, then
every stall reason of every kernel.

The child compresses each cache, warms every call up (autotuning, compiles) outside the profiled
range and then runs the calls inside it (``cudaProfilerStart`` / ``Stop``; ncu runs with
``--profile-from-start off``), each after a marker kernel whose grid size is the call's number,
so the parser can tell which kernels belong to which call. ncu's raw CSV has one row per kernel
and one column per metric; only the tables are printed (the device tool returns at most eight
files and the device check's output lands in log.txt), or ncu's own output where no row parses.
Metrics are collected by sections, which every ncu release names the same: a metric name that an
ncu build lacks would stop the whole run, a missing metric only leaves a "-" here. Clocks are
left alone (``--clock-control none``), as in the benchmarks, rather than locked to base by ncu.
Nothing is asserted: the table is for reading.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    import torch

MARKER = "_ncu_marker"
# Every section first; if this ncu lacks one (it refuses before launching anything), the core five.
SECTIONS = [["SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats",
             "MemoryWorkloadAnalysis_Tables"],
            ["SpeedOfLight", "LaunchStats", "Occupancy", "SchedulerStats", "WarpStateStats"]]
DEFAULT_CASES = "8192x16,8192x1"
DEFAULT_CONFIGS = "2b,2b-r4-s2,2b-r4-s2-i8"
METHODS = ("sdpa", "sdpa:packed", "triton", "cuda", "reference")  # our methods: pinned backends
DEFAULT_METHODS = "sdpa,sdpa:packed,triton,cuda"
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
TIME_UNITS_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


@dataclass(frozen=True)
class Column:
    """One column of the printed table: a header, a width and how to read it from a kernel row."""

    header: str
    width: int
    value: Callable[[dict, dict], Optional[float]]
    digits: int = 1


def number(row: dict, name: str) -> Optional[float]:
    """The metric ``name`` of a parsed row as a float (ncu writes thousands separators), or None."""
    text = row.get(name, "").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def duration_us(row: dict, units: dict) -> Optional[float]:
    value = number(row, "gpu__time_duration.sum")
    scale = TIME_UNITS_US.get(units.get("gpu__time_duration.sum", "nsecond"))
    return None if value is None or scale is None else value * scale


def warps_launched(row: dict) -> Optional[float]:
    grid, block = number(row, "launch__grid_size"), number(row, "launch__block_size")
    return None if grid is None or block is None else grid * math.ceil(block / 32)


def per_warp(row: dict, name: str) -> Optional[float]:
    total, warps = number(row, name), warps_launched(row)
    return None if total is None or not warps else total / warps


def bank_conflicts(row: dict) -> Optional[float]:
    parts = [number(row, f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum") for op in ("ld", "st")]
    return None if all(p is None for p in parts) else sum(p or 0.0 for p in parts)


COLUMNS = [
    Column("us", 8, duration_us),
    Column("inst/warp", 10, lambda r, u: per_warp(r, "smsp__inst_executed.sum"), 0),
    Column("issue%", 7, lambda r, u: number(r, "smsp__issue_active.avg.pct_of_peak_sustained_active")),
    Column("act/sch", 8, lambda r, u: number(r, "smsp__warps_active.avg.per_cycle_active"), 2),
    Column("elig/sch", 9, lambda r, u: number(r, "smsp__warps_eligible.avg.per_cycle_active"), 2),
    Column("occ%", 6, lambda r, u: number(r, "sm__warps_active.avg.pct_of_peak_sustained_active")),
    Column("dram%", 6, lambda r, u: number(r, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")
           or number(r, "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
    Column("sm%", 6, lambda r, u: number(r, "sm__throughput.avg.pct_of_peak_sustained_elapsed")),
    Column("regs", 5, lambda r, u: number(r, "launch__registers_per_thread"), 0),
    Column("grid", 7, lambda r, u: number(r, "launch__grid_size"), 0),
    Column("bank", 9, lambda r, u: bank_conflicts(r), 0),
]


# --------------------------------------------------------------------------- ncu's raw CSV
def parse_raw_csv(text: str) -> tuple[list[dict], dict]:
    """(kernel rows, units) of ``ncu --csv --page raw`` output: one dict per profiled kernel,
    metric name -> value text, in launch order; ``units`` maps a metric to its unit. Lines ncu
    prints before the table (``==PROF==`` ...) are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return [], {}
    table = list(csv.reader(lines[start:]))
    header, body = table[0], [r for r in table[1:] if len(r) == len(table[0])]
    units = {}
    if body and not body[0][0].strip():  # the units row: no ID
        units = dict(zip(header, body.pop(0)))
    return [dict(zip(header, r)) for r in body], units


def marker_index(row: dict) -> Optional[int]:
    """The call number a marker kernel's row stands for (its grid size), None for other kernels."""
    if MARKER not in row.get("Kernel Name", ""):
        return None
    grid = number(row, "launch__grid_size")
    if grid is None:
        match = re.match(r"\((\d+)", row.get("Grid Size", ""))
        grid = float(match.group(1)) if match else None
    return None if grid is None else int(grid)


def calls_of(rows: Sequence[dict], labels: Sequence[str]) -> list[tuple[str, list[dict]]]:
    """The profiled kernels grouped by call: each marker opens the call its grid size numbers (1-based)."""
    calls: list[tuple[str, list[dict]]] = []
    for row in rows:
        index = marker_index(row)
        if index is not None:
            calls.append((labels[index - 1] if 0 < index <= len(labels) else f"call {index}", []))
        elif calls:
            calls[-1][1].append(row)
    return calls


def short_kernel_name(name: str) -> str:
    """``void lowrank_ops::gear_split_kernel<2, 128, 4, false>(GearDecodeArgs)`` ->
    ``gear_split_kernel<2,128,4,false>``."""
    name = re.sub(r"^void\s+", "", name.strip())
    name = re.sub(r"\(.*\)$", "", name)
    name = re.sub(r"^(\w+::)+", "", name)
    return name.replace(" ", "")


def top_stalls(row: dict, count: Optional[int] = 4) -> str:
    """The ``count`` largest stall reasons (warps stalled per issued instruction; all above 0.01
    for None)."""
    stalls = [(m.group(1), number(row, name)) for name in row if (m := STALL.match(name))]
    stalls = sorted(((n, v) for n, v in stalls if v is not None and v > 0.01), key=lambda s: -s[1])[:count]
    return " ".join(f"{n} {v:.2f}" for n, v in stalls) or "-"


def format_table(calls: Sequence[tuple[str, list[dict]]], units: dict) -> str:
    def cell(col: Column, row: dict) -> str:
        v = col.value(row, units)
        return f"{'-' if v is None else f'{v:.{col.digits}f}':>{col.width}}"

    head = f"{'call / kernel':<44}" + "".join(f"{c.header:>{c.width}}" for c in COLUMNS) + "  top stalls (warps per issue)"
    out = [head, "-" * len(head)]
    for label, kernels in calls:
        total = sum(duration_us(k, units) or 0.0 for k in kernels)
        out.append(f"{label}  ({len(kernels)} kernels, {total:.1f} us)")
        for k in kernels:
            name = short_kernel_name(k.get("Kernel Name", "?"))[:42]
            out.append(f"  {name:<42}" + "".join(cell(c, k) for c in COLUMNS) + "  " + top_stalls(k))
    return "\n".join(out)


# --------------------------------------------------------------------------- the profiled process
def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"8192x16,8192x1"`` -> [(8192, 16), (8192, 1)] (context x batch)."""
    from lowrank_ops.benchmarks.lowrank import parse_shapes

    return parse_shapes(text, "--cases", "CONTEXTxBATCH items like 8192x16")


def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated names, each one of ``allowed`` (``what`` names the option in the refusal)."""
    from lowrank_ops.benchmarks.timing import pick_names

    return pick_names(text, (), allowed, what)


def plan_calls(cases: Sequence[tuple[int, int]], configs: Sequence[str], methods: Sequence[str],
               device: torch.device, geometry: Optional[object] = None) -> list[tuple[str, Callable[[], object]]]:
    """(label, call) of every (case, method, configuration) that can run here; a method that
    cannot serve a configuration is reported and left out. SDPA rows run once per case."""
    import torch

    from lowrank_ops.benchmarks import kvcache as KB
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.kvcache import compress, cuda_decode

    env = KB.Env(device, torch.float16, geometry or KB.GPU_GEOMETRY, triton_ok=device.type == "cuda")
    calls = []

    def pinned(backend: str, q, kv) -> Callable[[], object]:
        def run():
            with use_backend(backend):
                return KB._gear(q, kv)
        return run

    for context, batch in cases:
        case = KB.Case(context, batch)
        keys, values = KB.random_kv(case, env, seed=1)
        q = KB.random_q(case, env, 1, seed=2)[0]
        for method in (m for m in methods if m.startswith("sdpa")):
            fn = KB._sdpa if method == "sdpa" else KB._sdpa_packed
            calls.append((f"{case.label} {method}", lambda fn=fn, q=q, k=keys, v=values: fn(q, k, v)))
        for config in configs:
            kv = compress(keys, values, KB.gear_config(config))
            for method in (m for m in methods if not m.startswith("sdpa")):
                if method == "cuda" and not (verdict := cuda_decode.supports(q, kv)).ok:
                    print(f"{case.label} {config}: cuda left out: {verdict.why}", file=sys.stderr)
                    continue
                calls.append((f"{case.label} {config} {method}", pinned(method, q, kv)))
    return calls


def run_child(args: argparse.Namespace) -> int:
    """Warm every call up, then run each once inside the profiled range after its marker."""
    import torch

    Path(args.labels_out + ".started").touch()  # ncu launched this process (its options were accepted)
    device = torch.device(args.device)
    geometry = None
    if device.type != "cuda":  # the CPU check of this plumbing (tests): small heads, reference backend
        from lowrank_ops.benchmarks import kvcache as KB
        geometry = KB.CPU_GEOMETRY
    calls = plan_calls(parse_cases(args.cases), parse_names(args.configs, _config_names(), "--configs"),
                       parse_names(args.methods, METHODS, "--methods"), device, geometry)
    for _, fn in calls:
        fn()
        fn()
    marker = _marker(device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.profiler.start()
    for index, (_, fn) in enumerate(calls, start=1):
        marker(index)
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.profiler.stop()
    Path(args.labels_out).write_text(json.dumps([label for label, _ in calls]))
    print(f"gear_counters child: {len(calls)} calls profiled", file=sys.stderr)
    return 0


def _config_names() -> list[str]:
    from lowrank_ops.benchmarks import kvcache as KB

    return list(KB.CONFIGS)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _marker(device: torch.device) -> Callable[[int], None]:
    """A launch of a one-store Triton kernel on ``index`` programs (nothing off CUDA)."""
    import torch

    if device.type != "cuda":
        return lambda index: None
    import triton
    import triton.language as tl

    @triton.jit
    def _ncu_marker(ptr):  # one program per call number; each writes its own word
        tl.store(ptr + tl.program_id(0), 0)

    scratch = torch.empty(4096, dtype=torch.int32, device=device)

    def launch(index: int) -> None:
        _ncu_marker[(index,)](scratch)
    launch(1)  # compile it outside the profiled range
    return launch


# --------------------------------------------------------------------------- the parent
def find_ncu() -> Optional[str]:
    """``ncu`` on the PATH, else the newest under /opt/nvidia/nsight-compute or next to nvcc."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) + sorted(glob.glob("/usr/local/cuda*/bin/ncu"))
    return candidates[-1] if candidates else None


def ncu_command(ncu: str, sections: Sequence[str], child: Sequence[str]) -> list[str]:
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw",
           "--print-units", "base"]
    for section in sections:
        cmd += ["--section", section]
    return cmd + list(child)


def run_parent(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gear_counters: needs a CUDA device; nothing to do")
        return 0
    ncu = args.ncu or find_ncu()
    if ncu is None:
        print("gear_counters: no ncu (Nsight Compute) on this machine; nothing to do")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / "labels.json"
        child = [sys.executable, os.path.abspath(__file__), "--child", "--cases", args.cases, "--configs",
                 args.configs, "--methods", args.methods, "--device", args.device, "--labels-out", str(labels_path)]
        for sections in SECTIONS:
            proc = subprocess.run(ncu_command(ncu, sections, child), stdout=subprocess.PIPE, text=True)
            print(f"gear_counters: ncu exited {proc.returncode} with sections {' '.join(sections)}")
            if Path(str(labels_path) + ".started").exists():  # ncu took its options and ran the child
                break
            print(f"ncu refused before launching anything; its output:\n{proc.stdout[-1500:]}")
        if not labels_path.exists():
            print("gear_counters: the profiled process did not finish")
            return 1
        labels = json.loads(labels_path.read_text())
    rows, units = parse_raw_csv(proc.stdout)
    calls = calls_of(rows, labels)
    print(f"ncu: {sum(len(kernels) for _, kernels in calls)} kernels in {len(calls)} of {len(labels)} calls")
    if not calls:
        print(f"no call's kernels parsed; ncu's output ends:\n{proc.stdout[-6000:]}")
        return 1
    print(format_table(calls, units))
    print("\nevery stall reason (warps stalled per issued instruction, above 0.01)")
    for label, kernels in calls:
        for k in kernels:
            print(f"{label} | {short_kernel_name(k.get('Kernel Name', '?'))}: {top_stalls(k, count=None)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="CONTEXTxBATCH list (default %(default)s)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="GEAR configurations of the kvcache suite")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {', '.join(METHODS)} (default %(default)s)")
    p.add_argument("--ncu", help="the ncu executable (default: found on the PATH or in the usual places)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the plumbing check (reference backend)")
    p.add_argument("--child", action="store_true", help="(internal) the profiled process")
    p.add_argument("--labels-out", help="(internal, child) where the call labels go")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_child(args) if args.child else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
