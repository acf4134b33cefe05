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

import pytest

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


def test_the_environment_variable_turns_the_fast_path_off():
    def fast_path(**extra):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LOWRANK_OPS_LAUNCH_CACHE")}
        proc = subprocess.run([sys.executable, "-c", "from lowrank_ops.kernels import _launch; print(_launch.FAST_PATH)"],
                              capture_output=True, text=True, env={**env, **extra}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    assert fast_path() == "True"
    assert fast_path(LOWRANK_OPS_LAUNCH_CACHE="0") == "False"
    assert fast_path(TRITON_INTERPRET="1") == "False"


@pytest.mark.gpu
def test_on_a_gpu_the_fast_path_gives_the_outputs_of_tritons_path():
    """On a GPU (the gpu lane): every family's Triton decode path, and the GEAR attention, give
    bit-identical outputs with the launch cache and without it (the same kernels, configs and
    arguments: deterministic), for calls the cache serves (each repeated) and under CUDA-graph
    capture and replay."""
    import torch

    from lowrank_ops import LowRankLinear, QuantLinear, SparseLinear, use_backend
    from lowrank_ops.kernels import _launch
    from lowrank_ops.kvcache import GEARConfig, attention, compress

    if not _launch.FAST_PATH:  # reported as a skip with the version: every launch takes Triton's path there
        import triton

        pytest.skip(f"the launch cache is off with Triton {triton.__version__} (another launch convention or no "
                    "native specialization function): nothing to compare")
    torch.manual_seed(0)
    dev = "cuda"
    linear = torch.nn.Linear(512, 384, bias=True).half().to(dev)
    layers = [LowRankLinear.from_linear(linear, rank=64), QuantLinear.from_linear(linear, bits=4, outliers=0.01),
              SparseLinear.from_linear(linear, 2, 4)]
    x = torch.randn(1, 512, dtype=torch.float16, device=dev)
    keys, values = (torch.randn(2, 8, 1000, 128, dtype=torch.float16, device=dev) for _ in range(2))
    kv = compress(keys, values, GEARConfig())
    q = torch.randn(2, 32, 1, 128, dtype=torch.float16, device=dev)
    calls = [lambda layer=layer: layer(x) for layer in layers] + [lambda: attention(q, kv)]

    def outputs(fast: bool) -> list:
        _launch.FAST_PATH = fast
        try:
            with use_backend("triton"), torch.no_grad():
                eager = [[call() for _ in range(3)] for call in calls]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = [call() for call in calls]
                graph.replay()
                torch.cuda.synchronize()
                return [e for group in eager for e in group] + [c.clone() for c in captured]
        finally:
            _launch.FAST_PATH = True

    slow, fast = outputs(False), outputs(True)
    for i, (a, b) in enumerate(zip(slow, fast)):
        assert torch.equal(a, b), f"output {i} differs between Triton's path and the launch cache"
