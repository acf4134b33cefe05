"""Run by tests/test_launch_cache.py in a process of its own (real JIT functions, no interpreter):
every scenario's launches are recorded twice, through kernels/_launch.py's fast path and through
Triton's own path only, by bench/host_overhead.py's driver (compiles for sm_90, launches nothing,
one handle per binary), and must be the same launches: the same binary, grid and arguments.
Prints one JSON line: the number of launches compared and of those that took the fast path."""
import json
import os
import sys
import zlib
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import host_overhead  # noqa: E402

host_overhead.install()


def _pseudo_time(self, *args, config, **meta):
    """The autotuner's benchmark, replaced: a time fixed by the config and the call's
    meta-parameters, so calls of one kernel with different keys choose different configs."""
    scalars = sorted((k, v) for k, v in meta.items() if isinstance(v, (bool, int, str)))
    return [float(zlib.crc32(repr((str(config), scalars)).encode()))] * 3

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import _launch  # noqa: E402
from lowrank_ops.kernels.kvcache_attention import gear_decode_attention  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, compress  # noqa: E402


# a 32-element tile for N_BUCKET 2, 64 for 3: the autotuner's choice differs by key, while Triton
# specializes both values alike (an int that is neither 1 nor a multiple of 16)
@triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=8)],
                 key=["N_BUCKET"],
                 prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: [
                     c for c in configs if c.kwargs["BLOCK"] == (32 if nargs["N_BUCKET"] == 2 else 64)]})
@triton.jit
def _toy_kernel(x_ptr, y_ptr, n, scale, N_BUCKET, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if FLAG:
        x = x * scale
    tl.store(y_ptr + offs, x, mask=offs < n)


@triton.jit
def _toy_after_kernel(y_ptr):  # launched on as many programs as the tile the autotuner chose
    tl.store(y_ptr + tl.program_id(0), 0.0)


def toy_call(x, y, n, bucket, flag):
    """The toy kernel, then a second launch sized by the config it ran with (``best_config``, as
    the GEAR launcher sizes its combine step by the split kernel's)."""
    _launch.launch(_toy_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n, 0.5, bucket, FLAG=flag)
    _launch.launch(_toy_after_kernel, (_toy_kernel.best_config.kwargs["BLOCK"],), y)


def toy_calls():
    base16, base32 = torch.zeros(4096, dtype=torch.float16), torch.zeros(4096)
    for x in (base16, base16[1:], base32):
        for n in (1, 16, 17, 1000):
            for bucket in (2, 3):
                for flag in (False, True):
                    y = torch.empty_like(x)
                    yield lambda x=x, y=y, n=n, bucket=bucket, flag=flag: toy_call(x, y, n, bucket, flag)


def gear_calls():
    gen = torch.Generator().manual_seed(0)
    for config, batch, seq, masked in ((GEARConfig(), 1, 1024, False), (GEARConfig(), 2, 1025, True),
                                       (GEARConfig(bits=2, rank=0, outlier_ratio=0.0), 1, 1089, False)):
        keys, values = (torch.randn(batch, 8, seq, 128, generator=gen).half() for _ in range(2))
        with use_backend("reference"):
            kv = compress(keys, values, config)
        q = torch.randn(batch, 32, 1, 128, generator=gen).half()
        mask = torch.ones(batch, seq, dtype=torch.bool) if masked else None
        yield lambda q=q, kv=kv, mask=mask: gear_decode_attention(q, kv, mask, None)


def described(args):
    """A launch's arguments as comparable values (tensors by shape, dtype and strides)."""
    return tuple((tuple(a.shape), a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)


def record(calls, fast: bool, repeats: int = 2):
    """Every call, then every call again (so a repeat follows other keys' launches)."""
    _launch.FAST_PATH = fast
    host_overhead._Launcher.launches = launches = []
    for _ in range(repeats):
        for call in calls:
            call()
    host_overhead._Launcher.launches = None
    return [(function, grid, described(args)) for function, grid, args in launches]


def main():
    jit_runs = 0
    original = JITFunction.run

    def counting_run(self, *args, **kwargs):
        nonlocal jit_runs
        jit_runs += 1
        return original(self, *args, **kwargs)

    JITFunction.run = counting_run
    Autotuner._bench = _pseudo_time
    result = {"fast_path_available": _launch.FAST_PATH}
    for name, calls in (("toy", list(toy_calls())), ("gear", list(gear_calls()))):
        record(calls, fast=False, repeats=1)  # compile and autotune everything first
        jit_runs = 0
        fast = record(calls, fast=True)
        fast_jit_runs = jit_runs
        slow = record(calls, fast=False)
        assert fast == slow, f"{name}: launches differ:\n{fast}\n{slow}"
        result[name] = {"launches": len(fast), "through_triton": fast_jit_runs,
                        "binaries": len({f for f, _, _ in fast})}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
