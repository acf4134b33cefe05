"""Host time per call of every family's decode path, measured on a machine without a GPU.

    python bench/host_overhead.py [--calls 2000] [--cases gear,quant,...]

An eager decode step (``model.generate`` without CUDA graphs) launches every compressed layer's
kernels from Python, one token at a time; at batch 1 a kernel runs for a few microseconds on the
GPU, so the host time per call (our argument checks and dispatch, then Triton's launch path)
decides whether the step is bound by the host. That time is spent on the CPU, so a CPU can
measure it: Triton gets a driver (:class:`NoLaunchDriver`) that compiles every kernel for sm_90
exactly as on an H100 and launches nothing, the layers run on CPU tensors with the Triton backend
pinned, and each call is timed from Python's side under ``torch.no_grad()`` (as ``generate()`` runs),
through Triton's own launch path and through
kernels/_launch.py's launch cache (which makes the same launches). What is not counted: the CUDA driver's own
launch call (cuLaunchKernel, a few microseconds per kernel, made in C by Triton's launcher, which
the stand-in replaces by a loop over the arguments) and the device time. Timings vary with the CPU:
compare rows of one run, or runs on one machine.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Optional, Sequence

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be real JIT functions, compiled
    del os.environ["TRITON_INTERPRET"]

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

H100 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
        "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Binaries:
    """The driver's utilities: a loaded binary is a handle that is never called, a new one per
    load (Triton loads each compiled kernel, one per specialization, once), so a recorded launch
    names the compiled kernel it ran."""

    def __init__(self):
        self.handles = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        return 1, next(self.handles), 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return dict(H100)


class _Launcher:
    """Stands in for Triton's C launcher: reads each tensor argument's address, launches nothing.
    ``launches`` (when a list) records (function, grid, arguments) for tests."""

    launches: Optional[list] = None

    def __init__(self, src, metadata):
        pass

    def __call__(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg.data_ptr()
        if _Launcher.launches is not None:
            _Launcher.launches.append((function, (grid_0, grid_1, grid_2), args))


class NoLaunchDriver(DriverBase):
    """A Triton driver for an H100 that is not there: kernels compile for sm_90; launches do nothing;
    the autotuner's benchmark is not run and every config ties, so it keeps the first that
    survives pruning (one compile per kernel)."""

    def __init__(self):
        self.utils = _Binaries()
        self.launcher_cls = _Launcher
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: 0
        self.set_current_device = lambda device: None

    @staticmethod
    def is_active():
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def tie(kernel_call, quantiles=None, **kwargs):
            return [1.0] * len(quantiles) if quantiles else 1.0
        return tie

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16, dtype=torch.int8)

    def clear_cache(self, cache):
        pass


def install() -> None:
    """Make :class:`NoLaunchDriver` Triton's active driver and let the Triton backend take CPU tensors."""
    from lowrank_ops.core import backend

    triton_driver.set_active(NoLaunchDriver())
    backend.triton_runs_on = lambda device: device.type in ("cpu", "cuda")


# --------------------------------------------------------------------------- the decode calls
def _linear(k: int, n: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(k, n, bias=False).half()


def _gear_operands(config: str) -> tuple[torch.Tensor, object]:
    """(q, compressed cache) of one decode step: batch 1, T = 1k, 32 q / 8 kv heads of 128."""
    from lowrank_ops.benchmarks import kvcache as KB
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.kvcache import compress

    env = KB.Env(torch.device("cpu"), torch.float16, KB.GPU_GEOMETRY)
    case = KB.Case(1024, 1)
    keys, values = KB.random_kv(case, env, seed=1)
    with use_backend("reference"):
        kv = compress(keys, values, KB.gear_config(config))
    return KB.random_q(case, env, 1, seed=2)[0], kv


def _gear(config: str) -> Callable[[], object]:
    from lowrank_ops.kvcache import attention

    q, kv = _gear_operands(config)
    return lambda: attention(q, kv)


def _gear_cuda_wrapper(config: str) -> Callable[[], object]:
    """The CUDA GEAR kernel's Python wrapper (``cuda_decode.launch``: workspace, launch plan, the
    pointers) with a module whose ``gear_decode`` does nothing. Not included: the dispatch check
    before it, which scans every tensor's alignment on a GPU (on CPU tensors it returns at once)."""
    import types

    from lowrank_ops.core.cuda_ext import LaunchTarget
    from lowrank_ops.kvcache import cuda_decode

    q, kv = _gear_operands(config)
    stub = LaunchTarget(types.SimpleNamespace(gear_decode=lambda *args: None), 0, H100["multiprocessor_count"], "cpu")
    return lambda: cuda_decode.launch(q, kv, None, q.shape[-1] ** -0.5, target=stub)


def _layer(make: Callable[[torch.nn.Linear], torch.nn.Module], k: int = 1024, n: int = 1024) -> Callable[[], object]:
    from lowrank_ops.core.backend import use_backend

    with use_backend("reference"):
        layer = make(_linear(k, n))
    x = torch.randn(1, k, dtype=torch.float16)
    return lambda: layer(x)


def cases() -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> a builder of one decode call (batch 1, fp16). Every row but the CUDA wrapper's runs
    Triton kernels only (low rank 64: its decode kernels; a larger rank or a LoRA adapter at batch 1
    take cuBLAS GEMMs, which here would time the CPU's matmul, not a launch path); the CUDA
    wrapper's row launches no Triton kernel, so its two columns time the same path."""
    from lowrank_ops import LowRankLinear, QuantLinear, SparseLinear

    return {
        "gear 2b-r4-s2-i8 (default), T=1k, 32/8 heads": lambda: _gear("2b-r4-s2-i8"),
        "gear 2b, T=1k, 32/8 heads": lambda: _gear("2b"),
        "gear default, CUDA kernel's wrapper (no Triton)": lambda: _gear_cuda_wrapper("2b-r4-s2-i8"),
        "LowRankLinear 1024x1024 r64 (decode kernels)": lambda: _layer(lambda lin: LowRankLinear.from_linear(lin, rank=64)),
        "QuantLinear 1024x1024 4b": lambda: _layer(lambda lin: QuantLinear.from_linear(lin, bits=4)),
        "QuantLinear 1024x1024 4b+1%": lambda: _layer(lambda lin: QuantLinear.from_linear(lin, bits=4, outliers=0.01)),
        "SparseLinear 1024x1024 2:4": lambda: _layer(lambda lin: SparseLinear.from_linear(lin, 2, 4)),
    }


def host_us(fn: Callable[[], object], calls: int) -> float:
    """Median wall time of one call over ``calls`` calls, in µs: the benchmarks' timer on CPU
    (:func:`lowrank_ops.benchmarks.timing.measure`; the first calls, which compile, excluded)."""
    from lowrank_ops.benchmarks import timing as T

    return T.measure(lambda: fn(), [()], torch.device("cpu"), warmup=3, min_samples=calls,
                     max_samples=calls).median_us


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--cases", default="", help="comma-separated substrings of the case names (default: all)")
    args = p.parse_args(argv)
    install()
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.kernels import _launch

    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    fast = _launch.FAST_PATH
    print(f"host time per decode call, Triton backend, launches stubbed, us (median of {args.calls} calls)")
    print(f"  {'case':<48} {'Triton path':>12} {'launch cache':>13}")
    for name, build in cases().items():
        if wanted and not any(w in name for w in wanted):
            continue
        fn = build()
        times = []
        with use_backend("triton"), torch.no_grad():  # as generate() runs
            for on in (False, fast):
                _launch.FAST_PATH = on
                times.append(host_us(fn, args.calls))
        _launch.FAST_PATH = fast
        cached = f"{times[1]:13.1f}" if fast else f"{'(off)':>13}"
        print(f"  {name:<48} {times[0]:12.1f} {cached}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
