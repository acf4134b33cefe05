"""KV-cache suite: GEAR decode attention against SDPA on an fp16 cache, and memory per token.

Every case is one context length T, batch b and query length q of a decode step: q (b, 32, q,
128) fp16 over a cache of 8 KV heads × T tokens × head dim 128 (Llama-3-8B / Mistral-7B attention
geometry), timed in one run on rotating operands (see :mod:`lowrank_ops.benchmarks.timing`).
q = 1 is a decode step; q > 1 a causal chunk of the cache's newest q tokens (assisted decoding's
draft check: every row under the bottom-right causal mask, ours with ``causal=True``; the CUDA
kernel does not serve it). The targets are the decode steps'.

baselines (on the exact fp16 K, V)
    ``sdpa``          ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)``
    ``sdpa:packed``   the GQA group folded into the query length, ``q`` viewed as
                      (b, 8, 4, 128) against K, V (b, 8, T, 128): what transformers does for one
                      query token; ``vs_sdpa`` divides the faster of the two by our time
    ``dequant+sdpa``  (full mode) ``GEARKV.decompress()`` (one Triton pass on a GPU) then
                      ``sdpa:packed``: the dequantize-every-step route of transformers'
                      ``QuantizedCache``, with our decompression
ours, per configuration (:data:`CONFIGS`), on a :func:`~lowrank_ops.kvcache.compress`-ed cache
    ``triton``        :func:`lowrank_ops.kvcache.attention` pinned to Triton (the split-sequence
                      kernel reading the compressed blocks); on CPU (``--cpu-smoke``) a
                      ``reference`` row (decompress + fp32 attention) stands in

Per row: median / p20 / p80 µs (CUDA-graph replay), eager µs, GB/s on the true byte count (the
cache's ``nbytes`` — codes, scales, zeros, outliers, factors, tail buffer — + q + out; the
baselines: fp16 K, V + q + out), fraction of the measured copy bandwidth, ``vs_sdpa`` (best SDPA
time / this, > 1 is faster), the memory of the cache (bytes per token per layer, bits per entry,
``mem_vs_fp16``) and two errors of the output: ``err_vs_ref`` (against the fp32 reference attention
on the same compressed cache, sequence 0: the kernel) and ``err_vs_fp16`` (against SDPA on the exact K, V:
the compression); ``triton`` rows on a GPU also name the autotune row the split kernel ran
(``kernel_config``: programs per SM, load-ahead, warps, stages, register cap). Targets (:data:`TARGETS`) are printed, never
asserted.

The JSON (``kvcache-<mode>.json``) is rewritten after every case, so a run cut short by its time
cap keeps what it measured.

Run: ``python -m lowrank_ops.benchmarks.kvcache [--quick] [--out DIR]``. Without CUDA it prints a
note and exits 0; ``--cpu-smoke`` runs the plumbing on CPU on tiny caches (wall clock; the
numbers mean nothing), Triton included only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from lowrank_ops.benchmarks import timing as T
from lowrank_ops.benchmarks.lowrank import parse_ints, pinned
from lowrank_ops.benchmarks.quant import _first_line, _time_into

# --------------------------------------------------------------------------- what is measured
# name -> GEARConfig options (power_iters 2 and B = 64 are the defaults; rows that the CUDA kernel
# serves name fp16 factors, factor_bits=16)
CONFIGS: dict[str, dict] = {
    "2b-r4-s2": dict(bits=2, rank=4, outlier_ratio=0.02, factor_bits=16),  # GEAR's setting, fp16 factors
    "2b-r4-s2-i8": dict(bits=2, rank=4, outlier_ratio=0.02),  # the default: int8 factors, 27.8 % of fp16
    "2b-r4-s2-g64": dict(bits=2, rank=4, outlier_ratio=0.02, group_size=64, factor_bits=16),  # fp16 factors, 29.3 %
    "4b": dict(bits=4, rank=0, outlier_ratio=0.0),  # KIVI-style 4-bit
    "2b": dict(bits=2, rank=0, outlier_ratio=0.0),  # KIVI-style 2-bit: what outliers + rank cost
}


@dataclass(frozen=True)
class Geometry:
    q_heads: int
    kv_heads: int
    head_dim: int


GPU_GEOMETRY = Geometry(32, 8, 128)
CPU_GEOMETRY = Geometry(8, 2, 64)

DRAFT_CHECK = 7  # query tokens of a draft check: a 6-token draft and the last accepted token
DEFAULT_DRAFT_CHECK = 21  # transformers' assisted generation starts with 20 draft tokens
FULL = {"contexts": [1024, 4096, 16384, 32768], "batches": [1, 4, 16],
        "q_lens": [1, DRAFT_CHECK, DEFAULT_DRAFT_CHECK],
        "configs": list(CONFIGS), "dequant_baseline": True, "geometry": GPU_GEOMETRY}
# bench/device_check.sh gives this ~75 s with autotune: the contexts of the targets, 4 decode cases
# x (2 SDPA rows + 4 configs), then two draft checks at 8k (cut first by the time cap); plain
# 2-bit shows what the outliers and the rank cost.
QUICK = {"contexts": [8192, 32768], "batches": [1, 16], "q_lens": [1, DRAFT_CHECK],
         "configs": ["2b-r4-s2", "2b-r4-s2-i8", "2b", "4b"], "dequant_baseline": False, "geometry": GPU_GEOMETRY,
         "skip": [(32768, 1, DRAFT_CHECK), (32768, 16, DRAFT_CHECK)]}
CPU_SMOKE = {"contexts": [80, 200], "batches": [1, 3], "q_lens": [1, 3], "configs": list(CONFIGS),
             "dequant_baseline": True, "geometry": CPU_GEOMETRY}
MODES = {"full": FULL, "quick": QUICK, "cpu-smoke": CPU_SMOKE}
BASELINES = ("sdpa", "sdpa:packed", "dequant+sdpa")


@dataclass(frozen=True)
class Case:
    """One decode step: context length (cached tokens, the q newest included), batch, query tokens."""

    context: int
    batch: int
    q_len: int = 1

    @property
    def label(self) -> str:
        return f"T={self.context} b={self.batch}" + (f" q={self.q_len}" if self.q_len > 1 else "")


def kv_cases(contexts: Sequence[int], batches: Sequence[int], skip: Sequence[tuple] = (),
             q_lens: Sequence[int] = (1,)) -> list[Case]:
    """Every (T, b, q) but ``skip``'s, one-token decode steps first."""
    return [Case(t, b, q) for q in q_lens for t in contexts for b in batches if (t, b, q) not in set(skip)]


# --------------------------------------------------------------------------- targets (printed, not asserted)
@dataclass(frozen=True)
class Target:
    text: str
    config: str
    kind: str  # "vs_sdpa" (ours / best SDPA >= goal) or "mem_vs_fp16" (bytes / fp16 bytes <= goal)
    goal: float
    min_context: int = 0


# Byte counts at head_dim 128, B = 64: 2b-r4-s2 stores 2 (codes) + 1 (scale + zero, G = 32) +
# 3 x 24 / 128 (outliers) + 0.5 (A) + 1 (B) = 5.06 bits per entry; 2b-r4-s2-i8 (the default, int8
# factors) 2 + 1 + 0.56 + 0.25 + 0.5 + 0.02 (fp32 column scales) = 4.33; 2b-r4-s2-g64 4.56 (scale +
# zero 0.5); 4b 4 + 1 = 5; plus the 64-token fp16 tail buffer (16 · 64 / T bits): ≈ 0.32x, 0.28x,
# 0.29x and 0.32x fp16 at T = 8k. The targets are the (2 bits, r = 4, s = 2 %): ≥ 2x SDPA
# at T ≥ 8k and ≤ 30 % of fp16 memory, all-in; fp16 factors at G = 32 cannot meet the second.
TARGETS = [
    Target("2b-r4-s2 >= 2x SDPA, T >= 8k", "2b-r4-s2", "vs_sdpa", 2.0, 8192),
    Target("2b-r4-s2-i8 >= 2x SDPA, T >= 8k", "2b-r4-s2-i8", "vs_sdpa", 2.0, 8192),
    Target("2b-r4-s2 memory <= 0.30x fp16, T >= 8k", "2b-r4-s2", "mem_vs_fp16", 0.30, 8192),
    Target("2b-r4-s2-i8 memory <= 0.30x fp16, T >= 8k", "2b-r4-s2-i8", "mem_vs_fp16", 0.30, 8192),
]


# --------------------------------------------------------------------------- environment
@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    geometry: Geometry
    triton_ok: bool = False
    triton_why: str = ""
    cuda_why: str = "no CUDA device"  # why the csrc kernel cannot run here ("" = it can)


@dataclass
class RunConfig:
    mode: str
    configs: Sequence[str] = tuple(CONFIGS)
    dequant_baseline: bool = False
    use_graph: bool = True
    eager: bool = True
    target_ms: float = T.DEFAULT_TARGET_MS
    time_budget_s: Optional[float] = None
    methods: Optional[set[str]] = None  # restrict our methods to these names (baselines always run)
    max_copies: int = T.MAX_COPIES


# --------------------------------------------------------------------------- operands
def gear_config(name: str):
    from lowrank_ops.kvcache import GEARConfig

    return GEARConfig(**CONFIGS[name])


def random_kv(case: Case, env: Env, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 keys and values (b, kv_heads, T, head_dim); keys get a few large channels (as real
    post-RoPE keys do), so per-channel quantization and the outliers see a realistic spread."""
    g = env.geometry
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    shape = (case.batch, g.kv_heads, case.context, g.head_dim)
    keys = torch.randn(shape, generator=gen, device=env.device, dtype=env.dtype)
    keys[..., : max(1, g.head_dim // 16)] *= 8
    values = torch.randn(shape, generator=gen, device=env.device, dtype=env.dtype)
    return keys, values


def random_q(case: Case, env: Env, count: int, seed: int) -> list[torch.Tensor]:
    g = env.geometry
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    return [torch.randn(case.batch, g.q_heads, case.q_len, g.head_dim, generator=gen, device=env.device,
                        dtype=env.dtype) for _ in range(count)]


def clone_kv(kv):
    """A GEARKV with every stored tensor copied (a rotating copy for the timer)."""
    return dataclasses.replace(kv, **{name: t.clone() for name, t in kv.tensors().items()})


def first_sequence(kv):
    """The GEARKV of batch element 0 alone (all stored tensors are batch-major)."""
    return dataclasses.replace(kv, **{name: t[:1] for name, t in kv.tensors().items()})


def chunk_mask(case: Case, device: torch.device) -> Optional[torch.Tensor]:
    """The (q, T) bool bottom-right causal mask of a chunk (None for one query token)."""
    from lowrank_ops.kvcache.ops import causal_allowed

    return causal_allowed(case.q_len, case.context, device) if case.q_len > 1 else None


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _sdpa_packed(q, k, v, mask=None):
    """The GQA group folded into the query rows (head-major, as q's layout), the mask repeated per head."""
    b, hq, q_len, d = q.shape
    group = hq // k.shape[1]
    mask = None if mask is None else mask.repeat(group, 1)
    out = F.scaled_dot_product_attention(q.view(b, k.shape[1], group * q_len, d), k, v, attn_mask=mask)
    return out.view(b, hq, q_len, d)


def _dequant_sdpa(q, kv, mask=None):
    k, v = kv.decompress(q.dtype)
    return _sdpa_packed(q, k, v, mask)


def _gear(q, kv):
    from lowrank_ops.kvcache import ops

    return ops.attention(q, kv, causal=True)  # one query token: a plain decode step


def attention_cost(case: Case, geometry: Geometry, cache_bytes: int, elem: int) -> T.OpCost:
    """Bytes: the cache once + q + out; flops: q·Kᵀ and p·V (2 · 2 · b · q_heads · q · T · head_dim,
    the masked half of a chunk's scores included)."""
    rows = case.batch * geometry.q_heads * case.q_len
    return T.OpCost(cache_bytes + 2 * elem * rows * geometry.head_dim, 4 * rows * case.context * geometry.head_dim)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- running
def _base_row(case: Case, name: str, kind: str, env: Env, config: Optional[str] = None) -> dict:
    g = env.geometry
    spec = CONFIGS.get(config or "", {})
    return {
        "suite": "kvcache", "family": "kvcache", "context": case.context, "batch": case.batch, "q_len": case.q_len,
        "q_heads": g.q_heads, "kv_heads": g.kv_heads, "head_dim": g.head_dim, "config": config,
        "bits": spec.get("bits"), "rank": spec.get("rank"), "outlier_ratio": spec.get("outlier_ratio"),
        "dtype": T.dtype_name(env.dtype), "method": name, "kind": kind, "backend": None, "auto": False,
        "status": "ok", "note": "",
    }


def _memory(cache_bytes: int, case: Case, env: Env) -> dict:
    from lowrank_ops.kvcache import dense_nbytes

    g = env.geometry
    fp16 = dense_nbytes(case.batch, g.kv_heads, case.context, g.head_dim)
    return {"cache_bytes": cache_bytes, "bytes_per_token_per_layer": cache_bytes / (case.batch * case.context),
            "bits_per_entry": 8 * cache_bytes / (2 * case.batch * g.kv_heads * case.context * g.head_dim),
            "mem_vs_fp16": cache_bytes / fp16}


def _fail(row: dict, exc: BaseException, env: Env, log: Callable[[str], None]) -> None:
    row.update(status="error", note=_first_line(exc)[:200])
    log(f"  ! T={row['context']} b={row['batch']} q={row['q_len']} {row.get('config') or ''} {row['method']}: "
        f"{_first_line(exc)}")
    log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)).rstrip())
    if env.device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()


def our_methods(env: Env) -> list[tuple[str, str, str]]:
    """(name, pinned backend, skip reason) of our rows for each configuration."""
    if env.device.type != "cuda":
        return [("reference", "reference", ""), ("triton", "triton", env.triton_why)]
    return [("cuda", "cuda", env.cuda_why), ("triton", "triton", env.triton_why)]


def run_case(case: Case, env: Env, cfg: RunConfig, copy_gbps: Optional[float], matmul_tflops: Optional[float],
             log: Callable[[str], None] = print) -> list[dict]:
    """Time the baselines and every configuration of one case; never raises (errors become rows)."""
    from lowrank_ops.kvcache import compress
    from lowrank_ops.kvcache.ops import attention_reference

    elem = T.element_size(env.dtype)
    l2 = T.cache_bytes(env.device)
    g = env.geometry
    dense_bytes = 2 * elem * case.batch * g.kv_heads * case.context * g.head_dim
    q_bytes = elem * case.batch * g.q_heads * case.q_len * g.head_dim

    def n_copies(nbytes: int) -> int:
        return T.rotation_copies(nbytes + q_bytes, l2, max_copies=cfg.max_copies, min_copies=min(2, cfg.max_copies))

    rows: list[dict] = []
    keys, values = random_kv(case, env, seed=1)
    q_probe = random_q(case, env, 1, seed=2)[0]
    mask = chunk_mask(case, env.device)
    exact = _sdpa_packed(q_probe, keys, values, mask)
    baselines = [("sdpa", functools.partial(_sdpa, mask=mask)),
                 ("sdpa:packed", functools.partial(_sdpa_packed, mask=mask))]
    count = n_copies(dense_bytes)
    sets = [(q, keys, values) if i == 0 else (q, keys.clone(), values.clone())
            for i, q in enumerate(random_q(case, env, count, seed=3))]
    cost = attention_cost(case, g, dense_bytes, elem)
    for name, fn in baselines:
        row = _base_row(case, name, "baseline", env)
        row.update(backend="torch", **_memory(dense_bytes, case, env))
        row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops))
        try:
            row["err_vs_fp16"] = rel_err(fn(q_probe, keys, values), exact)
            _time_into(row, fn, sets, env, cfg, cost, copy_gbps, matmul_tflops)
        except Exception as exc:
            _fail(row, exc, env, log)
        rows.append(row)
    sets = None

    for config in cfg.configs:
        try:
            kv = compress(keys, values, gear_config(config))
        except Exception as exc:
            row = _base_row(case, "(compress)", "ours", env, config)
            _fail(row, exc, env, log)
            rows.append(row)
            continue
        cost = attention_cost(case, g, kv.nbytes, elem)
        memory = _memory(kv.nbytes, case, env)
        # the fp32 reference of sequence 0 only (decompressing a 32k x 16 cache in fp32 would take ~30 GB)
        ref = attention_reference(q_probe[:1], first_sequence(kv), causal=case.q_len > 1)
        count = n_copies(kv.nbytes)
        sets = [(q, kv if i == 0 else clone_kv(kv)) for i, q in enumerate(random_q(case, env, count, seed=4))]
        methods = [(name, backend, skip) for name, backend, skip in our_methods(env)
                   if not cfg.methods or name in cfg.methods]
        if cfg.dequant_baseline:
            methods.insert(0, ("dequant+sdpa", None, ""))
        for name, backend_name, skip in methods:
            kind = "baseline" if name == "dequant+sdpa" else "ours"
            fn = functools.partial(_dequant_sdpa, mask=mask) if kind == "baseline" else _gear
            if name == "cuda" and case.q_len > 1:
                skip = skip or "a causal chunk: the CUDA kernel serves one query token (dispatch takes Triton)"
            row = _base_row(case, name, kind, env, config)
            # "auto" = what automatic dispatch takes under CUDA-graph capture, where the rows are timed
            # (eager calls of small caches take the CUDA kernel: lowrank_ops/kvcache/cuda_decode.py)
            row.update(backend=backend_name or "torch", auto=backend_name == ("triton" if env.device.type == "cuda" else "reference"),
                       **memory)
            row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops))
            if skip:
                row.update(status="skipped", note=skip)
                rows.append(row)
                continue
            try:
                with pinned(backend_name):
                    out = fn(q_probe, kv)
                    row.update(err_vs_ref=rel_err(out[:1], ref), err_vs_fp16=rel_err(out, exact))
                    _time_into(row, fn, sets, env, cfg, cost, copy_gbps, matmul_tflops)
                if backend_name == "triton" and env.device.type == "cuda":
                    from lowrank_ops.kernels.kvcache_attention import last_split_config
                    row["kernel_config"] = last_split_config()  # which autotune row (register cap) won
            except Exception as exc:
                _fail(row, exc, env, log)
            rows.append(row)
        sets = kv = None
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``vs_sdpa``: the faster SDPA baseline's time / this time, per case."""
    for group in T.group_rows(rows, ("context", "batch", "q_len")).values():
        sdpa = [r["median_us"] for r in group if r["method"] in ("sdpa", "sdpa:packed") and r.get("median_us")]
        best = min(sdpa) if sdpa else None
        for row in group:
            row["vs_sdpa"] = T.speedup(best, row.get("median_us"))


# --------------------------------------------------------------------------- summaries
def evaluate_targets(rows: Sequence[dict]) -> list[dict]:
    """One line per (target, context, batch) that has a measurement: value, goal, met."""
    out = []
    best = T.best_rows(rows, ("context", "batch", "q_len", "config"))
    for tgt in TARGETS:
        for (context, batch, q_len, config), row in sorted(best.items(), key=lambda kv: kv[0][:2]):
            if config != tgt.config or context < tgt.min_context or q_len != 1:
                continue
            out.append(T.target_line(tgt.text, {"context": context, "batch": batch}, T.method_cell(row),
                                     row.get(tgt.kind), tgt.goal, at_most=tgt.kind != "vs_sdpa"))
    return out


TABLE_COLUMNS = [
    T.Column("context", "T", 6),
    T.Column("batch", "b", 3),
    T.Column("q_len", "q", 2),
    T.Column(lambda r: r.get("config") or "-", "config", 9, align="<"),
    T.Column(T.method_cell, "method", 13, align="<"),
    T.Column("median_us", "med_us", 9, ".1f"),
    T.Column("eager_us", "eager_us", 9, ".1f"),
    T.Column("gbps", "GB/s", 6, ".0f"),
    T.COPY_PCT,
    T.Column("vs_sdpa", "xsdpa", 6, ".2f"),
    T.Column("bits_per_entry", "bits", 5, ".2f"),
    T.Column("err_vs_ref", "err_ref", 8, ".1e"),
    T.Column("err_vs_fp16", "err_fp16", 8, ".1e"),
]
SUMMARY_COLUMNS = [
    T.Column("context", "T", 6),
    T.Column("batch", "b", 3),
    T.Column("q_len", "q", 2),
    T.Column("config", "config", 12, align="<"),
    T.Column("sdpa_us", "sdpa_us", 9, ".1f"),
    T.Column("best", "best ours", 13, align="<"),
    T.Column("best_us", "ours_us", 9, ".1f"),
    T.Column("vs_sdpa", "xsdpa", 6, ".2f"),
    T.COPY_PCT,
    T.Column("bytes_per_token_per_layer", "B/tok/L", 8, ".0f"),
    T.Column("mem_vs_fp16", "xmem", 5, ".3f"),
]
TARGET_COLUMNS = T.target_columns(38, 13, [T.Column("context", "T", 6), T.Column("batch", "b", 3)])


def format_rows(rows: Sequence[dict], title: str = "") -> str:
    return T.format_table(rows, TABLE_COLUMNS, title=title, trailing=T.note_cell)


def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """One line per (context, batch, q_len, config): the best SDPA time, our fastest method, memory."""
    sdpa: dict[tuple, float] = {}
    configs: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["context"], row["batch"], row["q_len"])
        if row["method"] in ("sdpa", "sdpa:packed") and row.get("median_us"):
            sdpa[key] = min(sdpa.get(key, float("inf")), row["median_us"])
        elif row.get("config"):
            configs.setdefault((*key, row["config"]), []).append(row)
    out = []
    for (context, batch, q_len, config), group in configs.items():
        ours = [r for r in group if r.get("kind") == "ours" and r.get("median_us")]
        out.append({"context": context, "batch": batch, "q_len": q_len, "config": config,
                    "sdpa_us": sdpa.get((context, batch, q_len)),
                    "bytes_per_token_per_layer": group[0].get("bytes_per_token_per_layer"),
                    "mem_vs_fp16": group[0].get("mem_vs_fp16"), **T.best_of(group, ours, ("vs_sdpa",))})
    return out


def format_summary(payload: dict) -> str:
    rows, geo = payload.get("rows", []), payload.get("geometry", {})
    detail = f"{geo.get('q_heads')} q / {geo.get('kv_heads')} kv heads, d {geo.get('head_dim')}"
    return T.suite_summary("kvcache", payload, summarize_rows(rows), SUMMARY_COLUMNS, detail=detail,
                           targets=evaluate_targets(rows), target_cols=TARGET_COLUMNS)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = T.suite_parser("kvcache", "Benchmark GEAR decode attention against SDPA on an fp16 KV cache.",
                       "T {1k, 8k, 32k} x b {1, 16}, 2 configs")
    p.add_argument("--contexts", help="override context lengths, e.g. 1024,32768")
    p.add_argument("--batches", help="override batch sizes, e.g. 1,16")
    p.add_argument("--q-lens", help=f"override query tokens per step, e.g. 1,{DRAFT_CHECK} (> 1: causal chunks)")
    p.add_argument("--configs", help=f"only these configurations, from {','.join(CONFIGS)}")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m lowrank_ops.benchmarks.kvcache``, ``lowrank-ops bench --suite kvcache``)."""
    return T.suite_main(argv, "kvcache", build_parser(), format_summary, _plan, _run)


def _plan(args: argparse.Namespace, mode: str) -> tuple[list[int], list[int], list[int], list[str]]:
    spec = MODES[mode]
    contexts = parse_ints(args.contexts, "--contexts") if args.contexts else spec["contexts"]
    batches = parse_ints(args.batches, "--batches") if args.batches else spec["batches"]
    q_lens = parse_ints(args.q_lens, "--q-lens") if args.q_lens else spec["q_lens"]
    configs = T.pick_names(args.configs, spec["configs"], list(CONFIGS), "--configs")
    if max(q_lens) > min(contexts):
        raise ValueError(f"--q-lens: a chunk is the cache's newest tokens, expected at most the shortest context "
                         f"{min(contexts)}, got {max(q_lens)}")
    return contexts, batches, q_lens, configs


def _run(args: argparse.Namespace, mode: str, device: torch.device,
         plan: tuple[list[int], list[int], list[int], list[str]]) -> int:
    contexts, batches, q_lens, configs = plan
    spec = MODES[mode]
    # fp16 on CPU too: the cache format's scales are fp16 whatever the input, the reference upcasts
    env = Env(device, torch.float16, spec["geometry"])
    env.triton_ok, env.triton_why = T.probe_triton(device, "lowrank_ops.kernels.kvcache_attention")
    if device.type == "cuda":
        from lowrank_ops.core import cuda_ext

        env.cuda_why = "" if cuda_ext.available() else f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}"
    skip = spec.get("skip", ()) if not (args.contexts or args.batches or args.q_lens) else ()
    cases = kv_cases(contexts, batches, skip, q_lens)
    cfg = RunConfig(mode, configs=configs, dequant_baseline=spec["dequant_baseline"], use_graph=not args.no_graph,
                    target_ms=args.target_ms, time_budget_s=args.time_budget,
                    methods=T.methods_filter(args),
                    max_copies=2 if mode == "cpu-smoke" else T.MAX_COPIES)

    t_start = time.perf_counter()
    meta, copy_gbps, matmul_tflops = T.run_prologue(
        "kvcache", mode, device, env.dtype, f"{len(cases)} cases x {len(configs)} configs",
        {"triton": (env.triton_ok, env.triton_why)})

    header = {
        "suite": "kvcache", "mode": mode, "meta": meta, "copy_bandwidth_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops, "geometry": dataclasses.asdict(env.geometry),
        "configs": {name: CONFIGS[name] for name in configs},
        "targets": [dataclasses.asdict(t) for t in TARGETS],
        "timing": T.timing_info(device, cfg.use_graph, cfg.target_ms,
                                units="times in microseconds per decode step (one layer); bytes = cache nbytes "
                                      "(or fp16 K, V) + q + out; gbps = bytes / time; vs_sdpa = best SDPA / this"),
    }

    def describe(case: Case, case_rows: list[dict]) -> str:
        ours = [r for r in case_rows if r.get("kind") == "ours" and r.get("median_us") and r.get("config") == configs[0]]
        best = min(ours, key=lambda r: r["median_us"]) if ours else None
        return case.label + (f", {configs[0]} {T.method_cell(best)} {best['median_us']:.1f} us"
                             + (f" ({best['vs_sdpa']:.2f}x sdpa)" if best.get("vs_sdpa") else "") if best else "")

    T.run_and_save(
        "kvcache", mode, header, t_start, args.out, cases, lambda case: run_case(case, env, cfg, copy_gbps, matmul_tflops),
        lambda case, exc: {**_base_row(case, "(case)", "ours", env), "status": "error", "note": _first_line(exc)[:200]},
        describe, device, cfg.time_budget_s, format_rows=format_rows, format_summary=format_summary,
        legend="xsdpa = best SDPA time / this",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
