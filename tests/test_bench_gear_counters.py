"""bench/gear_counters.py (device_check.sh's counters step) on a CPU machine: its parser on ncu's
raw CSV, and the whole parent -> ncu -> child round trip with a stand-in ncu (no GPU, no Nsight
Compute here), so the first real run on a lent GPU does not spend device time on plumbing."""
import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPLIT = "void lowrank_ops::gear_split_kernel<2, 128, 4, false>(GearDecodeArgs)"
HEADER = ('"ID","Process ID","Kernel Name","Grid Size","launch__grid_size","launch__block_size",'
          '"gpu__time_duration.sum","smsp__inst_executed.sum",'
          '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",'
          '"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"')
UNITS = '"","","","","","","nsecond","inst","","",""'


@pytest.fixture(scope="module")
def counters():
    spec = importlib.util.spec_from_file_location("gear_counters", REPO / "bench" / "gear_counters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def raw_csv(kernels_per_call):
    """ncu-like output: a preamble, the header, the units row, then per call its marker (grid =
    call number) and its kernels (time 1000 * call number ns)."""
    lines = ["==PROF== Connected to process 1234", HEADER, UNITS]
    kid = 0
    for call, kernels in enumerate(kernels_per_call, start=1):
        lines.append(f'"{kid}","1","_ncu_marker","({call}, 1, 1)","{call}","1","1,024","4","0.5","0","0"')
        kid += 1
        for name in kernels:
            lines.append(f'"{kid}","1","{name}","(264, 1, 1)","264","128","{1000 * call:,}","1,013,760",'
                         f'"2.5","1.25","0.005"')
            kid += 1
    return "\n".join(lines) + "\n==PROF== Disconnected from process 1234\n"


def test_raw_csv_rows_are_grouped_by_call_and_read_in_their_units(counters):
    rows, units = counters.parse_raw_csv(raw_csv([[SPLIT, "_gear_combine_kernel"], [SPLIT]]))
    assert len(rows) == 5 and units["gpu__time_duration.sum"] == "nsecond"
    calls = counters.calls_of(rows, ["first", "second"])
    assert [(label, len(kernels)) for label, kernels in calls] == [("first", 2), ("second", 1)]
    split = calls[1][1][0]
    assert counters.duration_us(split, units) == pytest.approx(2.0)
    assert counters.per_warp(split, "smsp__inst_executed.sum") == pytest.approx(1_013_760 / (264 * 4))
    assert counters.short_kernel_name(split["Kernel Name"]) == "gear_split_kernel<2,128,4,false>"
    assert counters.top_stalls(split) == "long_scoreboard 2.50 wait 1.25"  # barrier 0.005 is below 0.01
    table = counters.format_table(calls, units)
    assert "first  (2 kernels, 2.0 us)" in table and "second  (1 kernels, 2.0 us)" in table
    assert "960" in table  # instructions per warp


def test_a_marker_without_launch_metrics_is_read_from_the_grid_column_and_no_table_is_empty(counters):
    assert counters.marker_index({"Kernel Name": "_ncu_marker", "Grid Size": "(7, 1, 1)"}) == 7
    assert counters.marker_index({"Kernel Name": SPLIT, "launch__grid_size": "7"}) is None
    assert counters.parse_raw_csv("==ERROR== nothing profiled\n") == ([], {})


def test_bad_arguments_are_refused_by_name(counters):
    with pytest.raises(ValueError, match="--cases"):
        counters.parse_cases("8192,16")
    with pytest.raises(ValueError, match="--methods"):
        counters.parse_names("triton,flash", counters.METHODS, "--methods")
    assert counters.parse_cases("8192x16, 80x1") == [(8192, 16), (80, 1)]


FAKE_NCU = """\
#!{python}
# Stands in for ncu: refuses an unknown section before launching, else runs the child and
# prints a raw CSV with one marker and one kernel per call the child reports.
import json, subprocess, sys
args = sys.argv[1:]
if "MemoryWorkloadAnalysis_Tables" in args:
    print("==ERROR== Could not find section 'MemoryWorkloadAnalysis_Tables'")
    sys.exit(1)
child = args[args.index("--child") - 2:]
assert args[:args.index("--child") - 2].count("--section") == 5 and "--profile-from-start" in args
rc = subprocess.run(child).returncode
labels = json.load(open(child[child.index("--labels-out") + 1]))
sys.path.insert(0, {tests!r})
from test_bench_gear_counters import raw_csv
print(raw_csv([["_gear_split_kernel"] for _ in labels]), end="")
sys.exit(rc)
"""


def test_parent_runs_the_child_under_ncu_and_prints_one_row_per_kernel(tmp_path, counters):
    """The stand-in refuses the full section list, so the parent retries with the core five; the
    child runs the pinned Triton kernel (interpreted) and the SDPA baseline on CPU."""
    ncu = tmp_path / "ncu"
    ncu.write_text(FAKE_NCU.format(python=sys.executable, tests=str(REPO / "tests")))
    ncu.chmod(ncu.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gear_counters.py"), "--ncu", str(ncu),
                           "--device", "cpu", "--cases", "80x2", "--configs", "2b-r4-s2-i8",
                           "--methods", "sdpa:packed,triton,reference"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "ncu refused before launching anything" in out and "ncu: 3 kernels in 3 of 3 calls" in out
    for label in ("T=80 b=2 sdpa:packed", "T=80 b=2 2b-r4-s2-i8 triton", "T=80 b=2 2b-r4-s2-i8 reference"):
        assert f"{label}  (1 kernels" in out
    assert "T=80 b=2 2b-r4-s2-i8 triton | _gear_split_kernel: long_scoreboard 2.50 wait 1.25" in out


def test_device_check_has_a_counters_and_a_sanitize_step():
    script = (REPO / "bench" / "device_check.sh").read_text()
    assert "bench/gear_counters.py" in script and "compute-sanitizer" in script
    for step in ("counters", "sanitize"):
        assert f"step {step} " in script
