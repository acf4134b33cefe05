"""Where the time goes in the configurations that miss their targets: device time per kernel.

    python bench/kernel_profile.py            # on a CUDA machine (bench/device_check.sh step "profile")

For each case, eager calls run under ``torch.profiler`` and every CUDA kernel's device time is
summed per kernel name and divided by the call count: the split between our kernels (and any
copy or helper kernel that should not be there) without the host-side gaps of eager launches.
The GEAR cases also give the CUDA kernel's per-kernel times where it serves the cache and its
CUDA-graph replay time for split plans of one to four CTAs per SM (the launcher aims at two; the
kernel fits three on sm_90), each with the default launches (programmatic dependent launches on
sm_90) and plain ones, and time the Triton call as a CUDA-graph replay for several sequence-split
counts (``num_splits``; "auto" is the launcher's choice), the knob that sets how many programs
a batch-1 step has, and for 32- against 64-token tiles (``tile_tokens``: at G = 32, 32-token
tiles fold the key scale into q). After each case the configs the autotuner
chose are printed, with every row's time in the latest autotuning (warps, pipeline depth and
the register caps that buy a third or fourth program per SM are not in the SASS counts).
After the GEAR kernel tables below, end to end: a random-init Llama-shaped model (32 q / 8 kv heads of 128, 4 layers, a
small MLP and vocabulary) decodes 64 greedy steps after an 8k prompt with DynamicCache + SDPA
and with GEARCache + the "gear" attention: milliseconds per step (one block compression per
layer among them; eager, as ``generate`` runs) and the cache's bytes; then what a decode step
pays every B tokens per layer: one block's compression (wall time,
batch 1 and 16, 8 kv heads, head_dim 128, the default config), its low-rank fit on the Triton
kernel and on the torch path, and ``torch.linalg.qr`` (which the fit used to call twelve times
per block) on the same matrices; then a whole layer's decompression (8k, batch 1 and 16, the
default config) on the Triton kernel and in torch, wall time and peak memory, and a causal chunk
of 16, 64 and 128 new tokens read by the decode kernel against decompress + SDPA (the choice
``hf.CHUNK_MAX_ROWS`` makes).
Prints tables only (the device tool returns at most 8 files; the step's output lands in
log.txt). Nothing here is asserted: the suites and the gpu lane do that.
"""
from __future__ import annotations

import collections
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from lowrank_ops.benchmarks import kvcache as KB
from lowrank_ops.benchmarks import quant as QB
from lowrank_ops.benchmarks import timing as T
from lowrank_ops.core import cuda_ext

CALLS = 10
GEAR_CASES = [(8192, 1), (8192, 16)]
GEAR_CONFIGS = ["2b", "2b-r4-s2", "2b-r4-s2-i8"]  # the last: the default int8 factors (not yet profiled)
SPLITS = [None, 16, 32, 64, 128]
TILE_TOKENS = [32, 64]
APPEND_BATCHES = [1, 16]
DECOMPRESS_CASES = [(8192, 1), (8192, 16)]
CHUNK_Q_LENS = [16, 64, 128]  # 64, 256 and 512 query rows at GQA 4: hf.CHUNK_MAX_ROWS = 256 in the middle
GENERATE = {"context": 8192, "batches": [1, 16], "steps": 64, "layers": 4}
QUANT_CASES = [(4096, 4096, 16, "4b+1%", "decode"), (4096, 4096, 256, "4b+1%", "tile"),
               (4096, 4096, 256, "4b", "tile"), (4096, 4096, 256, "4b", "dequant")]


def kernel_times(fn, calls: int = CALLS) -> list[tuple[str, float, int]]:
    """(kernel name, device µs per call, launches per call) of ``fn()``, largest first."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            count[event.name] += 1
    return sorted(((name[:60], us / calls, count[name] // calls) for name, us in total.items()), key=lambda r: -r[1])


def print_autotuned(*kernels) -> None:
    """The config each autotuned kernel chose for every key it has seen so far, and every row's
    time in its latest autotuning (the GEAR rows differ in warps, stages and register cap)."""
    for kernel in kernels:
        for key, config in getattr(kernel, "cache", {}).items():
            print(f"  autotuned {kernel.fn.__name__} {key[:6]}...: {config}")
        for config, ms in (getattr(kernel, "configs_timings", None) or {}).items():
            print(f"    last autotuning: {float(ms[0] if isinstance(ms, (list, tuple)) else ms) * 1e3:9.1f} us  {config}")


def print_kernels(title: str, rows: list[tuple[str, float, int]]) -> None:
    print(f"\n{title}: device time per call {sum(r[1] for r in rows):.1f} us")
    for name, us, n in rows:
        print(f"  {us:9.1f} us  x{n}  {name}")


def wall_us(fn, calls: int = CALLS) -> float:
    """Eager wall time per call of ``fn()`` (host included, synchronized), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def gear_generate(device: torch.device) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from lowrank_ops.kvcache import GEARConfig
    from lowrank_ops.kvcache.hf import GEAR_ATTENTION, GEARCache

    g, run = KB.GPU_GEOMETRY, GENERATE
    config = LlamaConfig(hidden_size=g.q_heads * g.head_dim, intermediate_size=1024, num_hidden_layers=run["layers"],
                         num_attention_heads=g.q_heads, num_key_value_heads=g.kv_heads, head_dim=g.head_dim,
                         vocab_size=1024, max_position_embeddings=2 * run["context"])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    caches = {"DynamicCache+sdpa": ("sdpa", lambda: DynamicCache(config=config)),
              "GEARCache()+gear": (GEAR_ATTENTION, lambda: GEARCache(GEARConfig(), model_config=config))}
    for batch in run["batches"]:
        ids = torch.randint(1, config.vocab_size, (batch, run["context"]), device=device)
        cells = []
        for name, (attention, make_cache) in caches.items():
            model.set_attn_implementation(attention)
            cache = make_cache()
            # past_key_values: the device image's transformers may predate its 5.x name, cache
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                token = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(run["steps"]):
                    token = model(input_ids=token, past_key_values=cache, logits_to_keep=1).logits.argmax(-1)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / run["steps"] * 1e3
            nbytes = cache.nbytes if isinstance(cache, GEARCache) else sum(
                layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            cells.append(f"{name} {ms:.2f} ms/step, cache {nbytes / 2**20:.1f} MiB")
            del cache
            torch.cuda.empty_cache()
        print(f"\ngenerate T={run['context']} b={batch}, {run['layers']} layers: " + " | ".join(cells))


def gear_append(device: torch.device) -> None:
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.kvcache import GEARConfig
    from lowrank_ops.kvcache.compress import compress_blocks, lowrank_basis

    cfg = GEARConfig()
    g = KB.GPU_GEOMETRY
    for batch in APPEND_BATCHES:
        keys, values = (torch.randn(batch, g.kv_heads, cfg.buffer_tokens, g.head_dim, device=device,
                                    dtype=torch.float16) for _ in range(2))
        blocks = keys.float().reshape(batch, g.kv_heads, 1, cfg.buffer_tokens, g.head_dim)
        cells = [f"compress one block {wall_us(lambda: compress_blocks(keys, values, cfg)):.0f}"]
        for name, pin in (("fit on triton", "triton"), ("fit on torch", "reference")):
            with use_backend(pin):
                cells.append(f"{name} {wall_us(lambda: lowrank_basis(blocks, cfg.rank, cfg.power_iters)):.0f}")
        y = blocks[..., : cfg.rank].contiguous()
        cells.append(f"torch.linalg.qr x1 {wall_us(lambda: torch.linalg.qr(y)):.0f}")
        print(f"\nGEAR append b={batch} (us, wall): " + " | ".join(cells))
        print_kernels(f"GEAR compress one block b={batch}", kernel_times(lambda: compress_blocks(keys, values, cfg)))


def gear_decompress(device: torch.device) -> None:
    from lowrank_ops.core.backend import use_backend
    from lowrank_ops.kvcache import attention, compress, dense_nbytes

    env = KB.Env(device, torch.float16, KB.GPU_GEOMETRY, triton_ok=True)
    for context, batch in DECOMPRESS_CASES:
        keys, values = KB.random_kv(KB.Case(context, batch), env, seed=1)
        kv = compress(keys, values, KB.gear_config("2b-r4-s2-i8"))
        del keys, values
        cells = []
        for name, pin in (("triton", "triton"), ("torch", "reference")):
            with use_backend(pin):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                kv.decompress()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                cells.append(f"{name} {wall_us(kv.decompress):.0f} us, peak {peak:.0f} MiB")
        fp16 = dense_nbytes(batch, kv.kv_heads, context, kv.head_dim) / 2**20
        print(f"\nGEAR decompress T={context} b={batch} (fp16 K + V: {fp16:.0f} MiB): " + " | ".join(cells))
        cells = []
        for q_len in CHUNK_Q_LENS:
            case = KB.Case(context, batch, q_len)
            q = KB.random_q(case, env, 1, seed=2)[0]
            mask = KB.chunk_mask(case, device)
            with use_backend("triton"):
                kernel = wall_us(lambda: attention(q, kv, causal=True))
                fallback = wall_us(lambda: KB._dequant_sdpa(q, kv, mask))
            cells.append(f"q={q_len}: kernel {kernel:.0f} / decompress + SDPA {fallback:.0f}")
        print("  causal chunk (us, wall): " + " | ".join(cells))
        del kv
        torch.cuda.empty_cache()


def gear(device: torch.device) -> None:
    from lowrank_ops.kernels.kvcache_attention import _gear_split_kernel, gear_decode_attention
    from lowrank_ops.kvcache import compress, cuda_decode

    env = KB.Env(device, torch.float16, KB.GPU_GEOMETRY, triton_ok=True)
    for context, batch in GEAR_CASES:
        case = KB.Case(context, batch)
        keys, values = KB.random_kv(case, env, seed=1)
        q = KB.random_q(case, env, 1, seed=2)[0]
        for config in GEAR_CONFIGS:
            kv = compress(keys, values, KB.gear_config(config))
            print_kernels(f"GEAR {config} T={context} b={batch}", kernel_times(lambda: KB._gear(q, kv)))
            if cuda_decode.supports(q, kv).ok:  # the CUDA kernel's split and combine kernels
                scale = q.shape[-1] ** -0.5
                print_kernels(f"GEAR {config} T={context} b={batch}, CUDA kernel",
                              kernel_times(lambda: cuda_decode.gear_decode(q, kv, None, scale)))
                steps, columns = cuda_decode.launch_geometry(q, kv)
                sms = cuda_ext.sm_count(device.index if device.index is not None else torch.cuda.current_device())
                cells = []
                for per_sm in (1, 2, 3, 4):
                    splits, _ = cuda_decode.split_plan(steps, columns, sms, ctas_per_sm=per_sm)
                    times = [T.measure(lambda q_: cuda_decode.launch(q_, kv, None, scale, num_splits=splits,
                                                                     dependent_launch=dependent),
                                       [(q,)], device, target_ms=20).median_us for dependent in (None, False)]
                    cells.append(f"{per_sm}/SM ({splits} splits): {times[0]:.1f} / {times[1]:.1f}")
                print("  CUDA graph us by plan (default launches, dependent on sm_90 / plain)  " + " | ".join(cells))
            for knob, settings in (("num_splits", SPLITS), ("tile_tokens", TILE_TOKENS)):
                cells = []
                for value in settings:
                    timing = T.measure(lambda q_: gear_decode_attention(q_, kv, None, None, **{knob: value}), [(q,)],
                                       device, target_ms=20)
                    cells.append(f"{value or 'auto'}: {timing.median_us:.1f}")
                print(f"  graph us by {knob:<11} " + " | ".join(cells))
            print_autotuned(_gear_split_kernel)
        del keys, values
        torch.cuda.empty_cache()


def quant(device: torch.device) -> None:
    for n, k, m, config, path in QUANT_CASES:
        fmt = QB.build_format(n, k, config, device)
        tensors = fmt.op_tensors()
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        with QB.forced_quant_path(path), QB.pinned("triton"):
            rows = kernel_times(lambda: QB._quant_fn(x, *tensors, bits=fmt.bits, group_size=fmt.group_size,
                                                     in_features=k))
        print_kernels(f"quant {config} {n}x{k} M={m} ({path})", rows)
    from lowrank_ops.kernels import quant as kernels

    print_autotuned(kernels._quant_tile_kernel, kernels._quant_decode_split_kernel)


def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_profile: needs a CUDA device; nothing to do")
        return 0
    device = torch.device("cuda")
    t0 = time.perf_counter()
    for part in (gear, gear_generate, gear_append, gear_decompress, quant):  # the dispatch decision's numbers first
        try:
            part(device)
        except Exception as exc:  # one part failing must not hide the other's numbers
            print(f"\n{part.__name__}: failed: {type(exc).__name__}: {exc}")
    print(f"\nkernel_profile: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
