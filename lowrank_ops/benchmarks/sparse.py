"""N:M sparse suite: ``nm_linear`` against dense fp16 and PyTorch's 2:4 semi-structured matmul.

For every shape N×K (out × in features) and batch M it times, in one run and on rotating operands
(see :mod:`lowrank_ops.benchmarks.timing`):

baselines
    ``dense``   ``torch.matmul(x, Wᵀ)`` on a dense fp16 W (N, K): the layer we replace
    ``semi24``  ``F.linear(x, W₂:₄)`` with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or
                CUTLASS, as torch picks); "skipped: <reason>" where this torch/device refuses it
ours, per pattern (``nm_linear`` on a random weight pruned to n:m by magnitude, fp16 values)
    ``2:4`` (9 bits/weight), ``1:4`` (4.5), ``2:8`` (4.8), and with the kept values in 4 bits
    (RTN, g128 along KK): ``2:4+q4`` (3.1), ``2:8+q4`` (1.9)
  methods: ``cuda`` (the op pinned to the CUDA backend, M ≤ 8; "skipped: <reason>" when it
  refuses the call), ``triton`` (pinned to Triton, automatic path: ``decode`` for M ≤ 16, ``tile``
  above, torch's ``semi_structured`` for 2:4 at large M) and ``triton:<path>`` (the other Triton
  paths forced with ``nm_linear(path=...)``). On CPU (``--cpu-smoke``) a ``reference`` row stands in.
  The ``+q4`` patterns take the same methods: ``nm_linear`` reads the 4-bit codes on every
  backend (the semi-structured path is dense-values only, so 2:4+q4 at large M takes ``tile``).

Per row: median / p20 / p80 µs (CUDA-graph replay), eager µs, GB/s on the true byte count
(values + indices + x + y; for the baselines their own weights + x + y), fraction of the measured
copy bandwidth, ``vs_dense`` and ``vs_semi24`` (baseline time / this time, > 1 is faster), and
``limit`` = dense bytes / our bytes (the best possible speedup at batch 1). The JSON is rewritten
after every case, so a run stopped by a timeout keeps what it measured.

Run: ``python -m lowrank_ops.benchmarks.sparse [--quick] [--out DIR] [--time-budget S]``, or
``--summarize FILE``. Without CUDA it prints a note and exits 0; ``--cpu-smoke`` runs the plumbing
on CPU on tiny shapes, wall clock (the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from lowrank_ops.benchmarks import timing as T
from lowrank_ops.benchmarks.lowrank import pinned, planned_shapes
from lowrank_ops.benchmarks.quant import Env, _fail, _first_line, _randn, _time_into

PATTERNS: dict[str, tuple[int, int]] = {"2:4": (2, 4), "1:4": (1, 4), "2:8": (2, 8), "2:4+q4": (2, 4),
                                         "2:8+q4": (2, 8)}
Q4_PATTERNS = ("2:4+q4", "2:8+q4")  # kept values as 4-bit uniform groups of Q4_GROUP along KK
Q4_GROUP = 128
FULL = {"shapes": [(4096, 4096), (11008, 4096), (4096, 11008)], "batches": [1, 4, 16, 64, 256, 1024, 4096],
        "patterns": list(PATTERNS)}
# ~60 s on an H100 including Triton autotune: 2 shapes x 2 batches = 4 cases, each 2 baselines +
# 3 patterns x (cuda + triton [+ triton:tile at M = 1]) + 2:8+q4 at M = 1.
QUICK = {"shapes": [(4096, 4096), (11008, 4096)], "batches": [1, 1024], "patterns": ["2:4", "1:4", "2:8", "2:4+q4"]}
CPU_SMOKE = {"shapes": [(64, 256)], "batches": [1, 20], "patterns": list(PATTERNS)}
MODES = {"full": FULL, "quick": QUICK, "cpu-smoke": CPU_SMOKE}


@dataclass(frozen=True)
class Case:
    """One shape and batch size: the baselines once, then every pattern."""

    n: int  # out_features
    k: int  # in_features
    m: int  # rows of x

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


def sparse_cases(shapes: Sequence[tuple[int, int]], batches: Sequence[int]) -> list[Case]:
    return [Case(n, k, m) for (n, k) in shapes for m in batches]


@dataclass(frozen=True)
class Target:
    """A goal printed next to the results, never asserted: ours ≥ ``goal`` × the ``kind`` baseline."""

    text: str
    pattern: str
    kind: str  # "vs_dense" / "vs_semi24"
    goal: float
    max_m: int = 1 << 30
    min_m: int = 0


TARGETS = [  # the goals, then two guards of our own
    Target("2:4 batch 1 >= 1.6x dense", "2:4", "vs_dense", 1.6, max_m=1),
    Target("1:4 batch 1 >= 3x dense", "1:4", "vs_dense", 3.0, max_m=1),
    Target("2:8 batch 1 >= 2.9x dense", "2:8", "vs_dense", 2.9, max_m=1),
    Target("2:4 batch >= 1024 >= 1.2x dense", "2:4", "vs_dense", 1.2, min_m=1024),
    Target("2:4+q4 batch 1 >= 4.5x dense", "2:4+q4", "vs_dense", 4.5, max_m=1),
    Target("2:4 batch <= 16 faster than semi24", "2:4", "vs_semi24", 1.0, max_m=16),
    *[Target(f"{p} batch >= 256 >= 0.8x dense", p, "vs_dense", 0.8, min_m=256) for p in PATTERNS if p not in Q4_PATTERNS],
]


@dataclass
class RunConfig:
    mode: str
    dtype: torch.dtype
    patterns: Sequence[str] = tuple(PATTERNS)
    use_graph: bool = True
    eager: bool = True
    target_ms: float = T.DEFAULT_TARGET_MS
    time_budget_s: Optional[float] = None
    methods: Optional[set[str]] = None  # restrict our methods to these names (baselines always run)
    max_copies: int = T.MAX_COPIES


def probe_env(device: torch.device, dtype: torch.dtype) -> Env:
    env = Env(device, dtype)
    env.triton_ok, env.triton_why = T.probe_triton(device, "lowrank_ops.kernels.sparse")
    return env


# --------------------------------------------------------------------------- operands
def build_format(n_out: int, k: int, pattern: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The :class:`NMFormat` of a random (N, K) weight pruned to ``pattern`` by magnitude, on ``device``
    (``+q4`` patterns: the kept values quantized to 4 bits, RTN, groups of :data:`Q4_GROUP`)."""
    from lowrank_ops.quant.compress import quantize_rtn
    from lowrank_ops.sparse.format import NMFormat, nm_mask_from_scores, pack_nm

    n, m = PATTERNS[pattern]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    w = _randn((n_out, k), k ** -0.5, device, dtype, gen)
    values, indices = pack_nm(w, nm_mask_from_scores(w.abs().float(), n, m), n, m)
    if pattern in Q4_PATTERNS:
        return NMFormat(values=None, qvalues=quantize_rtn(values, bits=4, group_size=Q4_GROUP), indices=indices,
                        n=n, m=m, in_features=k)
    return NMFormat(values=values, indices=indices, n=n, m=m, in_features=k)


def _nm_fn(x, values, indices, *quant, n: int, m: int, in_features: int, path: str):
    """``nm_linear`` on dense kept values, or on 4-bit ones (``quant`` = (scales, zeros), groups of
    :data:`Q4_GROUP`)."""
    from lowrank_ops.sparse.ops import nm_linear

    q4 = dict(qscales=quant[0], qzeros=quant[1], group_size=Q4_GROUP) if quant else {}
    return nm_linear(x, values, indices, None, n=n, m=m, in_features=in_features, path=path, **q4)


def _dense(x, w):
    return torch.matmul(x, w.t())


def _semi24(x, w):
    return torch.nn.functional.linear(x, w)


def build_semi24(n_out: int, k: int, count: int, device: torch.device, dtype: torch.dtype) -> list:
    """``count`` distinct 2:4 ``SparseSemiStructuredTensor`` weights; raises when unavailable."""
    from lowrank_ops.sparse.format import nm_mask_from_scores

    if device.type != "cuda":
        raise RuntimeError("torch's semi-structured sparse tensors are CUDA-only")
    gen = torch.Generator(device=device)
    gen.manual_seed(5)
    w = _randn((n_out, k), k ** -0.5, device, dtype, gen)
    w = w * nm_mask_from_scores(w.abs().float(), 2, 4)
    return [torch.sparse.to_sparse_semi_structured(w.clone()) for _ in range(count)]


def semi24_nbytes(weight) -> int:
    """Bytes a 2:4 ``SparseSemiStructuredTensor`` matmul reads for the weight: its ``packed`` values
    (+ metadata, inside ``packed`` for cuSPARSELt) and ``meta`` (CUTLASS); the transposed copies
    torch keeps for the backward pass are not read by the forward matmul and not counted."""
    return T.tensors_nbytes(getattr(weight, name, None) for name in ("packed", "meta"))


def _rotating_x(case: Case, count: int, env: Env, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    return [_randn((case.m, case.k), 1.0, env.device, env.dtype, gen) for _ in range(count)]


# --------------------------------------------------------------------------- running
def our_methods(case: Case, pattern: str, env: Env) -> list[tuple[str, Optional[str], str, str]]:
    """(name, backend, path given to nm_linear, skip reason) for each of our rows of one pattern."""
    from lowrank_ops.sparse import ops

    n, m = PATTERNS[pattern]
    out: list[tuple[str, Optional[str], str, str]] = []
    if env.device.type != "cuda":
        out.append(("reference", "reference", "auto", ""))
    out.append(("cuda", "cuda", "auto", "" if env.device.type == "cuda" else "not on CUDA"))
    out.append(("triton", "triton", "auto", env.triton_why))
    if env.triton_ok:
        auto = ops.nm_path(case.m, n, m, quantized=pattern in Q4_PATTERNS)
        others = ("decode", "tile") if case.m <= ops.DECODE_MAX_M else ("tile", "expand")
        out += [(f"triton:{p}", "triton", p, "") for p in others if p != auto]
    return out


def _base_row(case: Case, name: str, kind: str, env: Env, pattern: Optional[str] = None) -> dict:
    return {
        "suite": "sparse", "family": "sparse", "shape": case.shape, "n": case.n, "k": case.k, "m": case.m,
        "config": pattern, "pattern": pattern, "dtype": T.dtype_name(env.dtype), "method": name, "kind": kind,
        "backend": None, "path": None, "auto": False, "status": "ok", "note": "",
    }


def run_case(case: Case, env: Env, cfg: RunConfig, copy_gbps: Optional[float], matmul_tflops: Optional[float],
             log: Callable[[str], None] = print) -> list[dict]:
    """Time the baselines and every pattern of one case; never raises (errors become rows)."""
    from lowrank_ops.sparse import ops

    elem = T.element_size(env.dtype)
    l2 = T.cache_bytes(env.device)
    m, n_out, k = case.m, case.n, case.k
    dense_bytes = elem * n_out * k

    def n_copies(weight_bytes: int) -> int:
        return T.rotation_copies(weight_bytes + elem * m * k, l2, max_copies=cfg.max_copies,
                                 min_copies=min(2, cfg.max_copies))

    rows: list[dict] = []
    cost = T.dense_cost(m, n_out, k, elem)
    row = _base_row(case, "dense", "baseline", env)
    row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops), weight_bytes=dense_bytes)
    try:
        count = n_copies(dense_bytes)
        gen = torch.Generator(device=env.device)
        gen.manual_seed(1)
        sets = [(x, _randn((n_out, k), k ** -0.5, env.device, env.dtype, gen)) for x in _rotating_x(case, count, env, 2)]
        _time_into(row, _dense, sets, env, cfg, cost, copy_gbps, matmul_tflops)
    except Exception as exc:
        _fail(row, exc, env, log)
    sets = None
    rows.append(row)

    row = _base_row(case, "semi24", "baseline", env, "2:4")
    row.update(backend="torch", path="semi_structured")
    try:
        count = n_copies(dense_bytes // 2)
        weights = build_semi24(n_out, k, count, env.device, env.dtype)
        wbytes = semi24_nbytes(weights[0])
        cost = T.OpCost(wbytes + elem * (m * k + m * n_out), 2 * m * n_out * k)
        row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops), weight_bytes=wbytes)
        sets = list(zip(_rotating_x(case, count, env, 3), weights))
        _semi24(*sets[0])  # torch's own verdict first: a refusal is a skip
        _time_into(row, _semi24, sets, env, cfg, cost, copy_gbps, matmul_tflops)
    except Exception as exc:  # unavailable on this torch/device/shape: a skip with the reason
        row.update(status="skipped", note=_first_line(exc)[:200])
        if env.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    sets = weights = None
    rows.append(row)

    for pattern in cfg.patterns:
        n, mm = PATTERNS[pattern]
        try:
            fmt = build_format(n_out, k, pattern, env.device, env.dtype)
        except Exception as exc:
            row = _base_row(case, "(format)", "ours", env, pattern)
            _fail(row, exc, env, log)
            rows.append(row)
            continue
        cost = T.OpCost(fmt.nbytes + elem * (m * k + m * n_out), 2 * m * n_out * k)
        probe = torch.empty((m, k), device=env.device, dtype=env.dtype)
        auto_backend = auto_choice(probe, fmt)
        sets = None
        for name, backend_name, path, skip in our_methods(case, pattern, env):
            if cfg.methods and name not in cfg.methods:
                continue
            row = _base_row(case, name, "ours", env, pattern)
            resolved = ops.nm_path(m, n, mm, quantized=pattern in Q4_PATTERNS) if path == "auto" else path
            row.update(backend=backend_name, path=resolved if backend_name == "triton" else None,
                       weight_bytes=fmt.nbytes, bits_per_weight=fmt.bits_per_weight, limit=dense_bytes / fmt.nbytes,
                       auto=backend_name == auto_backend and path == "auto")
            row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops))
            if skip:
                row.update(status="skipped", note=skip)
                rows.append(row)
                continue
            fn = lambda x, *w, _path=path: _nm_fn(x, *w, n=n, m=mm, in_features=k, path=_path)  # noqa: E731
            q = fmt.qvalues
            weights = (fmt.values, fmt.indices) if q is None else (q.qweight, fmt.indices, q.scales, q.zeros)
            try:
                if sets is None:
                    count = n_copies(fmt.nbytes)
                    sets = [(x, *(t.clone() if i else t for t in weights))
                            for i, x in enumerate(_rotating_x(case, count, env, 4))]
                with pinned(backend_name):
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
        sets = probe = None
    add_speedups(rows)
    return rows


def auto_choice(x: torch.Tensor, fmt) -> Optional[str]:
    """The backend ``nm_linear`` picks for this call with no pin (None under a pin or on failure)."""
    try:
        from lowrank_ops.core import backend
        from lowrank_ops.sparse import ops

        if backend.pinned_backend() is not None:
            return None
        q = fmt.qvalues
        return ops._nm_backend(x, fmt.values if q is None else q.qweight, fmt.n, fmt.m, "auto",
                               None if q is None else q.group_size)
    except Exception:
        return None


def add_speedups(rows: list[dict]) -> None:
    """``vs_dense`` and ``vs_semi24`` (baseline time / this time) per case."""
    for group in T.group_rows(rows, ("shape", "m")).values():
        base = {r["method"]: r.get("median_us") for r in group if r["kind"] == "baseline"}
        for row in group:
            row["vs_dense"] = T.speedup(base.get("dense"), row.get("median_us"))
            row["vs_semi24"] = T.speedup(base.get("semi24"), row.get("median_us"))


# --------------------------------------------------------------------------- summaries
def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """One line per (shape, M, pattern): baselines and our fastest measured method."""
    base: dict[tuple, dict] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("kind") == "baseline":
            base.setdefault((row["shape"], row["m"]), {})[row["method"]] = row.get("median_us")
        elif row.get("pattern"):
            groups.setdefault((row["shape"], row["m"], row["pattern"]), []).append(row)
    out = []
    for (shape, m, pattern), group in groups.items():
        b = base.get((shape, m), {})
        limit = next((r.get("limit") for r in group if r.get("limit")), None)
        out.append({"shape": shape, "m": m, "pattern": pattern, "dense_us": b.get("dense"), "semi24_us": b.get("semi24"),
                    "limit": limit, **T.best_of(group, [r for r in group if r.get("median_us")], ("vs_dense", "vs_semi24"))})
    return out


def evaluate_targets(rows: Sequence[dict]) -> list[dict]:
    """One line per (target, shape, M) with a measurement: value, goal, met."""
    out = []
    for s in summarize_rows(rows):
        for tgt in TARGETS:
            if s["pattern"] != tgt.pattern or not tgt.min_m <= s["m"] <= tgt.max_m or not s["best_us"]:
                continue
            out.append(T.target_line(tgt.text, {"shape": s["shape"], "m": s["m"]}, s["best"], s.get(tgt.kind), tgt.goal))
    return out


TABLE_COLUMNS = [
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("m", "M", 5),
    T.Column(lambda r: r.get("pattern") or "-", "pattern", 7, align="<"),
    T.Column(T.method_cell, "method", 22, align="<"),
    T.Column("median_us", "med_us", 9, ".1f"),
    T.Column("eager_us", "eager_us", 9, ".1f"),
    T.Column("gbps", "GB/s", 7, ".0f"),
    T.COPY_PCT,
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("vs_semi24", "xsemi24", 7, ".2f"),
]
SUMMARY_COLUMNS = [
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("m", "M", 5),
    T.Column("pattern", "pattern", 7, align="<"),
    T.Column("dense_us", "dense_us", 9, ".1f"),
    T.Column("semi24_us", "semi_us", 9, ".1f"),
    T.Column("best", "best ours", 22, align="<"),
    T.Column("best_us", "ours_us", 9, ".1f"),
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("limit", "limit", 6, ".2f"),
    T.Column("vs_semi24", "xsemi24", 7, ".2f"),
    T.COPY_PCT,
]
TARGET_COLUMNS = T.target_columns(36, 22, [T.Column("shape", "NxK", 10, align="<"), T.Column("m", "M", 5)])


def format_rows(rows: Sequence[dict], title: str = "") -> str:
    return T.format_table(rows, TABLE_COLUMNS, title=title, trailing=T.note_cell)


def format_summary(payload: dict) -> str:
    rows = payload.get("rows", [])
    return T.suite_summary("sparse", payload, summarize_rows(rows), SUMMARY_COLUMNS, skipped_baseline="semi24",
                           targets=evaluate_targets(rows), target_cols=TARGET_COLUMNS)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = T.suite_parser("sparse", "Benchmark nm_linear against dense fp16 and torch 2:4 semi-structured.", "2 shapes x M {1, 256}")
    p.add_argument("--shapes", help="override shapes, N×K list: 4096x4096,11008x4096")
    p.add_argument("--batches", help="override batch sizes M, e.g. 1,16,256")
    p.add_argument("--patterns", help=f"only these patterns, from {','.join(PATTERNS)}")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m lowrank_ops.benchmarks.sparse``, ``lowrank-ops bench --suite sparse``)."""
    return T.suite_main(argv, "sparse", build_parser(), format_summary, _plan, _run)


def _plan(args: argparse.Namespace, mode: str) -> tuple[list[Case], list[str]]:
    spec = MODES[mode]
    shapes, batches = planned_shapes(args, spec, 16, "whole groups of every pattern")
    patterns = T.pick_names(args.patterns, spec["patterns"], list(PATTERNS), "--patterns")
    return sparse_cases(shapes, batches), patterns


def _run(args: argparse.Namespace, mode: str, device: torch.device, plan: tuple[list[Case], list[str]]) -> int:
    cases, patterns = plan
    dtype = T.DTYPES[args.dtype]
    cfg = RunConfig(mode, dtype, patterns=patterns, use_graph=not args.no_graph, target_ms=args.target_ms,
                    time_budget_s=args.time_budget, max_copies=2 if mode == "cpu-smoke" else T.MAX_COPIES,
                    methods=T.methods_filter(args))

    t_start = time.perf_counter()
    env = probe_env(device, dtype)
    meta, copy_gbps, matmul_tflops = T.run_prologue(
        "sparse", mode, device, dtype, f"{len(cases)} cases x {len(patterns)} patterns",
        {"triton": (env.triton_ok, env.triton_why)})

    header = {
        "suite": "sparse", "mode": mode, "meta": meta, "copy_bandwidth_gbps": copy_gbps,
        "matmul_tflops": matmul_tflops, "patterns": {p: PATTERNS[p] for p in patterns},
        "targets": [dataclasses.asdict(t) for t in TARGETS],
        "timing": T.timing_info(device, cfg.use_graph, cfg.target_ms,
                                units="times in microseconds per call; bytes = values + indices (or the baseline's "
                                      "weights) + x + y; gbps = bytes / time; vs_* = baseline / this; "
                                      "limit = dense bytes / our weight bytes"),
    }

    def describe(case: Case, case_rows: list[dict]) -> str:
        ours = [r for r in case_rows if r.get("kind") == "ours" and r.get("median_us") and r.get("pattern") == patterns[0]]
        best = min(ours, key=lambda r: r["median_us"]) if ours else None
        return f"{case.shape} M={case.m}" + (f", {patterns[0]} best {T.method_cell(best)} {best['median_us']:.1f} us"
                                             if best else "")

    T.run_and_save(
        "sparse", mode, header, t_start, args.out, cases, lambda case: run_case(case, env, cfg, copy_gbps, matmul_tflops),
        lambda case, exc: {**_base_row(case, "(case)", "ours", env), "status": "error", "note": _first_line(exc)[:200]},
        describe, device, cfg.time_budget_s, format_rows=format_rows, format_summary=format_summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
