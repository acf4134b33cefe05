"""kernels/_launch.py's fast path makes exactly the launches Triton's own path makes.

tests/launch_cache_check.py runs in a process of its own (the kernels must be real JIT functions,
not the interpreter's) under bench/host_overhead.py's driver, which compiles for sm_90 and records
launches instead of making them, one handle per compiled kernel: a toy autotuned kernel over int
arguments 1, 16, 17 and 1000, aligned and misaligned fp16 and fp32 tensors, two autotune keys
(ints Triton specializes alike) with different configs and so different grids, and a constexpr
flag, each followed by a launch sized by the config it ran with; then the GEAR split and combine
kernels over three caches (default and plain 2-bit formats, batch 1 and 2, with and without a
mask). Every call runs, then every call again; the recorded (compiled kernel, grid, arguments)
with the fast path must equal those without it, and the fast path must have served every repeat.
Each of these breaks it: keying tensors by dtype without alignment, keying the autotuner's int key
by its specialization instead of its value, not restoring ``best_config`` on the fast path."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fast_launches_equal_tritons_own_and_serve_every_repeat():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "launch_cache_check.py")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fast_path_available"], "this Triton launches by another convention: the fast path is off"
    for name in ("toy", "gear"):
        launches, through_triton = result[name]["launches"], result[name]["through_triton"]
        # every call runs twice: the second always takes the fast path, so at most half go through Triton
        assert 0 < through_triton <= launches // 2, result
    assert result["toy"]["binaries"] >= 8, result  # dtypes x alignment x int specializations x configs
