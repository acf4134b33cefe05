"""bench/host_overhead.py runs here (no GPU): two of its rows, a few calls each, in a process of its
own (the Triton kernels must be real JIT functions, compiled for sm_90 by its no-launch driver).
Plumbing only: the times are printed, never asserted."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_host_overhead_prints_both_columns_for_its_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "host_overhead.py"), "--calls", "3",
                           "--cases", "LowRankLinear,CUDA kernel's wrapper"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.search(r"\d+\.\d\s+\d+\.\d\s*$", line)]
    assert len(rows) == 2 and any("LowRankLinear" in r for r in rows) and any("CUDA kernel's wrapper" in r for r in rows)
