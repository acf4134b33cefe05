"""Quantization suite: ``quant_linear`` against dense fp16 and tinygemm int4 baselines.

For every shape N×K (out × in features) and batch M it times, in one run and on rotating
operands (see :mod:`lowrank_ops.benchmarks.timing`):

baselines
    ``dense``     ``torch.matmul(x, Wᵀ)`` on a dense fp16 W (N, K): the layer we replace
    ``int4pack``  ``torch._weight_int4pack_mm`` (tinygemm int4, group 128), weight packed with
                  ``torch._convert_weight_to_int4pack``; skipped with the reason where this torch
                  build does not have it or its signature does not fit (it varies across versions;
                  on CUDA tinygemm may take bf16 activations only, then it is timed in bf16, noted)
ours, per configuration (``quant_linear`` on a :class:`~lowrank_ops.quant.format.QuantFormat`)
    ``4b``        4-bit g128, uniform, no outliers                (RTN)
    ``4b+1%``     4-bit g128 + 1 % CSR outliers                   (RTN)
    ``3b+1%``     3-bit g128 + 1 % CSR outliers                   (RTN)
    ``4b+r64``    4-bit g128 + rank-64 compensation ``(x Vᵀ) Uᵀ`` (the ``4b`` weight plus random
                  fp16 factors: the kernel's work does not depend on their values, and a rank-64
                  SVD of every shape would cost more than the timing)
    ``3b-lut``    3-bit per-row lookup table                      (``method="lut"``)
    ``3b-g32qs+1%`` 3-bit g32 with SpQR-style second-level statistics + 1 % outliers (RTN):
                  3.31 bits before outliers, the quality of g32 for the bytes of g128
  methods: ``cuda`` (the op pinned to the CUDA backend; "skipped: <reason>" when
  ``use_backend("cuda")`` refuses the call), ``triton`` (pinned to Triton, automatic path:
  ``decode`` for M ≤ 16, ``tile`` above), ``triton:tile`` (M ≤ 16: ``ops.quant_path`` forced to
  the tile kernel) and ``triton:dequant`` (M > 16: forced to the opt-in dequant path). On CPU (``--cpu-smoke``) a ``reference`` row stands in.

Per row: median / p20 / p80 µs (CUDA-graph replay), eager µs, GB/s on the true byte count
(``format.nbytes`` + x + y; for the baselines their own weights + x + y), fraction of the
measured copy bandwidth, ``vs_dense`` and ``vs_int4pack`` (baseline time / this time, > 1 is
faster). The targets (:data:`TARGETS`) are printed next to the results, never asserted.

Run: ``python -m lowrank_ops.benchmarks.quant [--quick] [--out DIR]`` (or
``lowrank-ops bench --suite quant``). Without CUDA it prints a note and exits 0; ``--cpu-smoke``
runs the plumbing on CPU on tiny shapes, wall clock (the numbers mean nothing).
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
from typing import Callable, Iterator, Optional, Sequence

import torch

from lowrank_ops.benchmarks import timing as T
from lowrank_ops.benchmarks.lowrank import pinned, planned_shapes

# --------------------------------------------------------------------------- what is measured
# name -> quantize() options (rank: random compensation factors added to the weight, see above)
CONFIGS: dict[str, dict] = {
    "4b": dict(bits=4, group_size=128, outliers=0.0, method="rtn", rank=0),
    "4b+1%": dict(bits=4, group_size=128, outliers=0.01, method="rtn", rank=0),
    "3b+1%": dict(bits=3, group_size=128, outliers=0.01, method="rtn", rank=0),
    "4b+r64": dict(bits=4, group_size=128, outliers=0.0, method="rtn", rank=64),
    "3b-lut": dict(bits=3, group_size=128, outliers=0.0, method="lut", rank=0),
    "3b-g32qs+1%": dict(bits=3, group_size=32, outliers=0.01, method="rtn", rank=0, quantize_stats=True),
}
INT4PACK_GROUP = 128
INT4PACK_INNER_K_TILES = 8

FULL = {"shapes": [(4096, 4096), (4096, 11008), (11008, 4096)], "batches": [1, 4, 16, 64, 256, 1024],
        "configs": list(CONFIGS)}
# bench/device_check.sh gives this ~90 s: 2 shapes x 3 batches = 6 cases, each 2 baselines +
# 5 configs x (triton [+ triton:tile at M <= 16] + cuda).
QUICK = {"shapes": [(4096, 4096), (11008, 4096)], "batches": [1, 16, 256], "configs": list(CONFIGS)}
CPU_SMOKE = {"shapes": [(64, 256)], "batches": [1, 20], "configs": list(CONFIGS)}
MODES = {"full": FULL, "quick": QUICK, "cpu-smoke": CPU_SMOKE}


@dataclass(frozen=True)
class Case:
    """One shape and batch size: the baselines once, then every configuration."""

    n: int  # out_features
    k: int  # in_features
    m: int  # rows of x

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


def quant_cases(shapes: Sequence[tuple[int, int]], batches: Sequence[int]) -> list[Case]:
    return [Case(n, k, m) for (n, k) in shapes for m in batches]


# --------------------------------------------------------------------------- targets (printed, not asserted)
@dataclass(frozen=True)
class Target:
    text: str
    config: str
    batches: tuple  # M values it applies to; () = every M >= min_m
    kind: str  # "vs_dense" / "vs_int4pack" (ours ≥ goal) or "cost_vs_4b" (time / 4b time ≤ goal)
    goal: float
    min_m: int = 0


TARGETS = [
    Target("4-bit g128 batch 1 >= 3.5x dense", "4b", (1,), "vs_dense", 3.5),
    Target("4-bit g128 batch 1 faster than int4pack", "4b", (1,), "vs_int4pack", 1.0),
    Target("4-bit g128 batch 16 >= 3x dense", "4b", (16,), "vs_dense", 3.0),
    Target("3-bit + 1% outliers batch 1 >= 4x dense", "3b+1%", (1,), "vs_dense", 4.0),
    Target("1% outliers cost <= 10% (vs 4b)", "4b+1%", (), "cost_vs_4b", 1.10),
    Target("rank-64 compensation cost <= 10% (vs 4b)", "4b+r64", (), "cost_vs_4b", 1.10),
    *[Target(f"{c} batch >= 256 >= 0.9x dense", c, (), "vs_dense", 0.9, min_m=256) for c in CONFIGS],
]


# --------------------------------------------------------------------------- environment
@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    triton_ok: bool = False
    triton_why: str = ""


def probe_env(device: torch.device, dtype: torch.dtype) -> Env:
    env = Env(device, dtype)
    env.triton_ok, env.triton_why = T.probe_triton(device, "lowrank_ops.kernels.quant")
    return env


@contextlib.contextmanager
def forced_quant_path(path: Optional[str]) -> Iterator[None]:
    """Force the Triton route of ``quant_linear`` by overriding ``ops.quant_path`` (looked up at call
    time, so it holds for eager calls and for the Python run a CUDA-graph capture records)."""
    if path is None:
        yield
        return
    from lowrank_ops.quant import ops

    original = ops.quant_path
    ops.quant_path = lambda m, n, k: path
    try:
        yield
    finally:
        ops.quant_path = original


def auto_choice(x: torch.Tensor, n: int, bits: int = 4, has_lut: bool = False,
                group_size: int = 128) -> tuple[Optional[str], Optional[str]]:
    """(backend, triton path) ``quant_linear`` picks for this call with no pin, or (None, None).

    The CUDA kernel's verdict depends on the format (bits 3/4, group size): the defaults are the
    4-bit g128 uniform case."""
    try:
        from lowrank_ops.core import backend
        from lowrank_ops.quant import ops

        if backend.pinned_backend() is not None:
            return None, None
        chosen = ops._quant_backend(x, bits, has_lut, group_size)
        return chosen, (ops.quant_path(x.shape[0], n, x.shape[1]) if chosen == "triton" else None)
    except Exception:
        return None, None


# --------------------------------------------------------------------------- operands
def _randn(shape, std, device, dtype, gen) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device.type == "cpu" else dtype)
    return (t * std).to(dtype)


def build_format(n: int, k: int, config: str, device: torch.device, seed: int = 0):
    """The :class:`QuantFormat` of a random (N, K) weight for one configuration, built on ``device``."""
    from lowrank_ops.quant.compress import quantize

    spec = CONFIGS[config]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    w = _randn((n, k), k ** -0.5, device, torch.float16, gen)
    fmt = quantize(w, bits=spec["bits"], group_size=spec["group_size"], outliers=spec["outliers"],
                   method=spec["method"], quantize_stats=spec.get("quantize_stats", False), dtype=torch.float16)
    if spec["rank"]:
        r = spec["rank"]
        fmt = dataclasses.replace(fmt, lr_u=_randn((n, r), 0.01, device, torch.float16, gen),
                                  lr_v=_randn((r, k), k ** -0.5, device, torch.float16, gen))
    return fmt


def clone_tensors(tensors: tuple) -> tuple:
    return tuple(None if t is None else t.clone() for t in tensors)


def _quant_fn(x, *tensors, bits: int, group_size: int, in_features: int):
    from lowrank_ops.quant.ops import quant_linear

    return quant_linear(x, *tensors, None, bits=bits, group_size=group_size, in_features=in_features)


def _dense(x, w):
    return torch.matmul(x, w.t())


def _int4pack(x, packed, scales_zeros):
    return torch._weight_int4pack_mm(x, packed, INT4PACK_GROUP, scales_zeros)


class Int4PackUnavailable(RuntimeError):
    pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:100] if text else ''}"


def build_int4pack(n: int, k: int, m: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(packed weight, scales_and_zeros, activation dtype, note) for tinygemm, or Int4PackUnavailable.

    ``torch._convert_weight_to_int4pack`` took an int32 (N, K) tensor of codes in early 2.x and
    takes uint8 (N, K/2), two codes per byte, since 2.5: both are tried. The op's activation dtype
    is probed too (fp16, then bf16: tinygemm on CUDA is bf16-only in several releases).
    """
    if not (hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")):
        raise Int4PackUnavailable(f"torch {torch.__version__} has no _weight_int4pack_mm/_convert_weight_to_int4pack")
    if k % INT4PACK_GROUP:
        raise Int4PackUnavailable(f"K={k} is not a multiple of the group size {INT4PACK_GROUP}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.int32)
    tries = [("uint8 (N, K/2)", lambda: ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)),
             ("int32 (N, K)", lambda: q)]
    errors = []
    packed = None
    for label, make in tries:
        try:
            packed = torch._convert_weight_to_int4pack(make(), INT4PACK_INNER_K_TILES)
            break
        except Exception as exc:
            errors.append(f"{label}: {_first_line(exc)}")
    if packed is None:
        raise Int4PackUnavailable("_convert_weight_to_int4pack failed: " + "; ".join(errors))
    for xdtype in dict.fromkeys((dtype, torch.bfloat16)):
        try:
            sz = torch.empty(k // INT4PACK_GROUP, n, 2, device=device, dtype=xdtype)
            sz[..., 0].fill_(0.01)
            sz[..., 1].zero_()
            x = torch.zeros(m, k, device=device, dtype=xdtype)
            _int4pack(x, packed, sz)
            T.synchronize(device)
            note = "" if xdtype == dtype else f"timed with {T.dtype_name(xdtype)} activations (tinygemm refuses {T.dtype_name(dtype)})"
            return packed, sz, xdtype, note
        except Exception as exc:
            errors.append(f"_weight_int4pack_mm({T.dtype_name(xdtype)}): {_first_line(exc)}")
    raise Int4PackUnavailable("; ".join(errors))


# --------------------------------------------------------------------------- running
@dataclass
class RunConfig:
    mode: str
    dtype: torch.dtype
    configs: Sequence[str] = tuple(CONFIGS)
    use_graph: bool = True
    eager: bool = True
    target_ms: float = T.DEFAULT_TARGET_MS
    time_budget_s: Optional[float] = None
    methods: Optional[set[str]] = None  # restrict our methods to these names (baselines always run)
    max_copies: int = T.MAX_COPIES


class FormatCache:
    """Formats and their rotating clones per (shape, config); dropped when the shape changes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.shape: Optional[tuple[int, int]] = None
        self.formats: dict[str, object] = {}
        self.clones: dict[str, list[tuple]] = {}
        self.int4: dict[tuple, object] = {}

    def _for_shape(self, n: int, k: int) -> None:
        if self.shape != (n, k):
            self.formats.clear()
            self.clones.clear()
            self.int4.clear()
            self.shape = (n, k)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def format(self, n: int, k: int, config: str):
        self._for_shape(n, k)
        if config not in self.formats:
            self.formats[config] = build_format(n, k, config, self.device)
            self.clones[config] = [self.formats[config].op_tensors()]
        return self.formats[config]

    def copies(self, n: int, k: int, config: str, count: int) -> list[tuple]:
        self.format(n, k, config)
        have = self.clones[config]
        while len(have) < count:
            have.append(clone_tensors(have[0]))
        return have[:count]


def _base_row(case: Case, name: str, kind: str, env: Env, config: Optional[str] = None) -> dict:
    spec = CONFIGS.get(config or "", {})
    return {
        "suite": "quant", "family": "quant", "shape": case.shape, "n": case.n, "k": case.k, "m": case.m,
        "config": config, "bits": spec.get("bits"), "group_size": spec.get("group_size"),
        "outliers": spec.get("outliers"), "rank": spec.get("rank", 0), "lut": spec.get("method") == "lut" if spec else None,
        "dtype": T.dtype_name(env.dtype), "method": name, "kind": kind, "backend": None, "path": None,
        "auto": False, "status": "ok", "note": "",
    }


def _time_into(row: dict, fn: Callable, arg_sets: list[tuple], env: Env, cfg: RunConfig, cost: T.OpCost,
               copy_gbps, matmul_tflops) -> None:
    timing = T.measure(fn, arg_sets, env.device, use_graph=cfg.use_graph, eager=cfg.eager, target_ms=cfg.target_ms)
    row.update(median_us=timing.median_us, p20_us=timing.p20_us, p80_us=timing.p80_us, eager_us=timing.eager_us,
               timing_mode=timing.mode, samples=timing.samples, calls_per_sample=timing.calls_per_sample,
               copies=timing.copies)
    row.update(T.derived_metrics(timing.median_us, cost, copy_gbps, matmul_tflops))
    if timing.note:
        row["note"] = (row["note"] + "; " if row["note"] else "") + timing.note


def _fail(row: dict, exc: BaseException, env: Env, log: Callable[[str], None]) -> None:
    row.update(status="error", note=_first_line(exc)[:200])
    log(f"  ! {row['shape']} M={row['m']} {row.get('config') or ''} {row['method']}: {_first_line(exc)}")
    log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)).rstrip())
    if env.device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()


def _rotating_x(case: Case, count: int, env: Env, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    return [_randn((case.m, case.k), 1.0, env.device, dtype, gen) for _ in range(count)]


def our_methods(case: Case, env: Env) -> list[tuple[str, Optional[str], Optional[str], str]]:
    """(name, backend, forced triton path, skip reason) for each of our rows of one configuration."""
    from lowrank_ops.quant import ops

    out: list[tuple[str, Optional[str], Optional[str], str]] = []
    if env.device.type != "cuda":
        out.append(("reference", "reference", None, ""))
    out.append(("cuda", "cuda", None, "" if env.device.type == "cuda" else "not on CUDA"))
    auto_path = ops.quant_path(case.m, case.n, case.k)
    out.append(("triton", "triton", None, env.triton_why))
    if env.triton_ok:
        for path in ("decode", "tile") if case.m <= ops.DECODE_MAX_M else ("tile", "dequant"):
            if path != auto_path:
                out.append((f"triton:{path}", "triton", path, ""))
    return out


def run_case(case: Case, env: Env, cfg: RunConfig, cache: FormatCache, copy_gbps: Optional[float],
             matmul_tflops: Optional[float], log: Callable[[str], None] = print) -> list[dict]:
    """Time the baselines and every configuration of one case; never raises (errors become rows)."""
    from lowrank_ops.quant import ops

    elem = T.element_size(env.dtype)
    l2 = T.cache_bytes(env.device)
    m, n, k = case.m, case.n, case.k
    act_bytes = elem * (m * k + m * n)

    def n_copies(weight_bytes: int) -> int:
        return T.rotation_copies(weight_bytes + elem * m * k, l2, max_copies=cfg.max_copies,
                                 min_copies=min(2, cfg.max_copies))

    rows: list[dict] = []
    # dense fp16
    row = _base_row(case, "dense", "baseline", env)
    cost = T.dense_cost(m, n, k, elem)
    row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops), weight_bytes=elem * n * k)
    try:
        count = n_copies(elem * n * k)
        gen = torch.Generator(device=env.device)
        gen.manual_seed(1)
        xs = _rotating_x(case, count, env, env.dtype, 2)
        sets = [(x, _randn((n, k), k ** -0.5, env.device, env.dtype, gen)) for x in xs]
        _time_into(row, _dense, sets, env, cfg, cost, copy_gbps, matmul_tflops)
    except Exception as exc:
        _fail(row, exc, env, log)
    sets = xs = None
    rows.append(row)

    # tinygemm int4
    row = _base_row(case, "int4pack", "baseline", env)
    row.update(backend="torch", path=f"g{INT4PACK_GROUP}")
    try:
        packed, sz, xdtype, note = build_int4pack(n, k, m, env.device, env.dtype)
        wbytes = T.tensors_nbytes((packed, sz))
        cost = T.OpCost(wbytes + T.element_size(xdtype) * (m * k + m * n), 2 * m * n * k)
        row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops), weight_bytes=wbytes, note=note,
                   dtype=T.dtype_name(xdtype))
        count = n_copies(wbytes)
        xs = _rotating_x(case, count, env, xdtype, 3)
        sets = [(xs[0], packed, sz)] + [(x, packed.clone(), sz.clone()) for x in xs[1:]]
        _time_into(row, _int4pack, sets, env, cfg, cost, copy_gbps, matmul_tflops)
    except Int4PackUnavailable as exc:
        row.update(status="skipped", note=str(exc)[:300])
    except Exception as exc:
        _fail(row, exc, env, log)
    sets = xs = packed = sz = None
    rows.append(row)

    probe = torch.empty((m, k), device=env.device, dtype=env.dtype)
    for config in cfg.configs:
        spec = CONFIGS[config]
        try:
            fmt = cache.format(n, k, config)
        except Exception as exc:
            row = _base_row(case, "(format)", "ours", env, config)
            _fail(row, exc, env, log)
            rows.append(row)
            continue
        fn = functools.partial(_quant_fn, bits=fmt.bits, group_size=fmt.group_size, in_features=k)
        auto_backend, auto_path = auto_choice(probe, n, fmt.bits, fmt.lut is not None, fmt.group_size)
        cost = T.OpCost(fmt.nbytes + act_bytes, 2 * m * n * k + 2 * m * spec["rank"] * (n + k))
        sets = None
        for name, backend_name, path, skip in our_methods(case, env):
            if cfg.methods and name not in cfg.methods:
                continue
            row = _base_row(case, name, "ours", env, config)
            row.update(backend=backend_name, path=path or (ops.quant_path(m, n, k) if backend_name == "triton" else None),
                       weight_bytes=fmt.nbytes, bits_per_weight=fmt.bits_per_weight)
            row["auto"] = backend_name == auto_backend and (backend_name != "triton" or row["path"] == auto_path)
            row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops))
            if skip:
                row.update(status="skipped", note=skip)
                rows.append(row)
                continue
            try:
                if sets is None:
                    count = n_copies(fmt.nbytes)
                    xs = _rotating_x(case, count, env, env.dtype, 4)
                    sets = [(x, *w) for x, w in zip(xs, cache.copies(n, k, config, count))]
                with pinned(backend_name), forced_quant_path(path):
                    try:
                        fn(*sets[0])  # the backend's own verdict first: a refusal is a skip, not an error
                    except ValueError as exc:
                        if backend_name == "cuda":
                            row.update(status="skipped", note=_first_line(exc)[:200])
                            rows.append(row)
                            continue
                        raise
                    _time_into(row, fn, sets, env, cfg, cost, copy_gbps, matmul_tflops)
            except Exception as exc:
                _fail(row, exc, env, log)
            rows.append(row)
        sets = None
    del probe
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``vs_dense``, ``vs_int4pack`` and ``cost_vs_4b`` (time / the 4b triton auto time) per case."""
    for group in T.group_rows(rows, ("shape", "m")).values():
        base = {r["method"]: r.get("median_us") for r in group if r["kind"] == "baseline"}
        ref4 = {r["method"]: r.get("median_us") for r in group if r.get("config") == "4b"}
        for row in group:
            t = row.get("median_us")
            row["vs_dense"] = T.speedup(base.get("dense"), t)
            row["vs_int4pack"] = T.speedup(base.get("int4pack"), t)
            row["cost_vs_4b"] = T.speedup(t, ref4.get(row["method"])) if row.get("config") else None


# --------------------------------------------------------------------------- summaries
def evaluate_targets(rows: Sequence[dict]) -> list[dict]:
    """One line per (target, shape, M) that has a measurement: value, goal, met."""
    best = T.best_rows(rows, ("shape", "m", "config"))
    out = []
    for tgt in TARGETS:
        for (shape, m, config), row in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            if config != tgt.config or (tgt.batches and m not in tgt.batches) or m < tgt.min_m:
                continue
            if tgt.kind == "cost_vs_4b":
                ref = best.get((shape, m, "4b"))
                value = T.speedup(row["median_us"], ref and ref["median_us"])
            else:
                value = row.get(tgt.kind)
            out.append(T.target_line(tgt.text, {"shape": shape, "m": m}, T.method_cell(row), value, tgt.goal,
                                     at_most=tgt.kind == "cost_vs_4b"))
    return out


TABLE_COLUMNS = [
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("m", "M", 5),
    T.Column(lambda r: r.get("config") or "-", "config", 11, align="<"),
    T.Column(T.method_cell, "method", 16, align="<"),
    T.Column("median_us", "med_us", 9, ".1f"),
    T.Column("eager_us", "eager_us", 9, ".1f"),
    T.Column("gbps", "GB/s", 7, ".0f"),
    T.COPY_PCT,
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("vs_int4pack", "xint4pk", 7, ".2f"),
]
SUMMARY_COLUMNS = [
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("m", "M", 5),
    T.Column("config", "config", 11, align="<"),
    T.Column("dense_us", "dense_us", 9, ".1f"),
    T.Column("int4pack_us", "int4pk_us", 9, ".1f"),
    T.Column("best", "best ours", 16, align="<"),
    T.Column("best_us", "ours_us", 9, ".1f"),
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("vs_int4pack", "xint4pk", 7, ".2f"),
    T.COPY_PCT,
]
TARGET_COLUMNS = T.target_columns(42, 16, [T.Column("shape", "NxK", 10, align="<"), T.Column("m", "M", 5)])


def format_rows(rows: Sequence[dict], title: str = "") -> str:
    return T.format_table(rows, TABLE_COLUMNS, title=title, trailing=T.note_cell)


def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """One line per (shape, M, config): baselines and our fastest measured method."""
    base: dict[tuple, dict] = {}
    configs: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("kind") == "baseline":
            base.setdefault((row["shape"], row["m"]), {})[row["method"]] = row.get("median_us")
        elif row.get("config"):
            configs.setdefault((row["shape"], row["m"], row["config"]), []).append(row)
    out = []
    for (shape, m, config), group in configs.items():
        ours = [r for r in group if r.get("median_us")]
        b = base.get((shape, m), {})
        out.append({
            "shape": shape, "m": m, "config": config, "dense_us": b.get("dense"), "int4pack_us": b.get("int4pack"),
            **T.best_of(group, ours, ("vs_dense", "vs_int4pack")),
        })
    return out


def format_summary(payload: dict) -> str:
    rows = payload.get("rows", [])
    return T.suite_summary("quant", payload, summarize_rows(rows), SUMMARY_COLUMNS, skipped_baseline="int4pack",
                           targets=evaluate_targets(rows), target_cols=TARGET_COLUMNS)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = T.suite_parser("quant", "Benchmark quant_linear against dense fp16 and tinygemm int4.", "2 shapes x M {1, 16, 256}")
    p.add_argument("--shapes", help="override shapes, N×K list: 4096x4096,11008x4096")
    p.add_argument("--batches", help="override batch sizes M, e.g. 1,16,256")
    p.add_argument("--configs", help=f"only these configurations, from {','.join(CONFIGS)}".replace("%", "%%"))
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m lowrank_ops.benchmarks.quant``, ``lowrank-ops bench --suite quant``)."""
    return T.suite_main(argv, "quant", build_parser(), format_summary, _plan, _run)


def _plan(args: argparse.Namespace, mode: str) -> tuple[list[Case], list[str]]:
    spec = MODES[mode]
    shapes, batches = planned_shapes(args, spec, 128, "group size")
    configs = T.pick_names(args.configs, spec["configs"], list(CONFIGS), "--configs")
    return quant_cases(shapes, batches), configs


def _run(args: argparse.Namespace, mode: str, device: torch.device, plan: tuple[list[Case], list[str]]) -> int:
    cases, configs = plan
    # the format's scales/zeros/LUT are fp16 whatever x is; fp16 also on CPU (the reference upcasts)
    dtype = T.DTYPES[args.dtype]
    cfg = RunConfig(mode, dtype, configs=configs, use_graph=not args.no_graph, target_ms=args.target_ms,
                    time_budget_s=args.time_budget, max_copies=2 if mode == "cpu-smoke" else T.MAX_COPIES,
                    methods=T.methods_filter(args))

    t_start = time.perf_counter()
    env = probe_env(device, dtype)
    meta, copy_gbps, matmul_tflops = T.run_prologue(
        "quant", mode, device, dtype, f"{len(cases)} cases x {len(configs)} configs",
        {"triton": (env.triton_ok, env.triton_why)})

    cache = FormatCache(device)

    def describe(case: Case, case_rows: list[dict]) -> str:
        ours = [r for r in case_rows if r.get("kind") == "ours" and r.get("median_us") and r.get("config") == configs[0]]
        best = min(ours, key=lambda r: r["median_us"]) if ours else None
        return (f"{case.shape} M={case.m}"
                + (f", {configs[0]} best {T.method_cell(best)} {best['median_us']:.1f} us" if best else ""))

    header = {
        "suite": "quant", "mode": mode, "meta": meta, "copy_bandwidth_gbps": copy_gbps, "matmul_tflops": matmul_tflops,
        "configs": {name: CONFIGS[name] for name in configs},
        "targets": [dataclasses.asdict(t) for t in TARGETS],
        "timing": T.timing_info(device, cfg.use_graph, cfg.target_ms,
                                units="times in microseconds per call; bytes = format.nbytes (or the baseline's weights) + x + y; "
                                      "gbps = bytes / time; vs_* = baseline / this; cost_vs_4b = this / 4b (same method)"),
    }
    T.run_and_save(
        "quant", mode, header, t_start, args.out, cases,
        lambda case: run_case(case, env, cfg, cache, copy_gbps, matmul_tflops),
        lambda case, exc: {**_base_row(case, "(case)", "ours", env), "status": "error", "note": _first_line(exc)[:200]},
        describe, device, cfg.time_budget_s, format_rows=format_rows, format_summary=format_summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
