"""Low-rank suite: ``lowrank_linear`` and ``lora_linear`` against cuBLAS baselines.

For every shape N×K (out × in features), rank and batch M it times, in one run and on the
same rotating operands:

low-rank ``y = (x Vᵀ) Uᵀ``, ranks holding 25 % / 50 % of the dense parameters
    ``dense``       ``torch.matmul(x, Wᵀ)`` on a dense fp16 W (N, K): the layer we replace
    ``two_matmul``  ``(x @ Vᵀ) @ Uᵀ``: the unfused low-rank baseline (two cuBLAS GEMMs)
    ``cuda``        our op pinned to the CUDA decode kernel (M ≤ 16, when csrc/ is built)
    ``triton``      our op pinned to Triton, automatic path (the ``path`` column says which)
    ``triton:<p>``  our op pinned to Triton with :func:`lowrank_path` forced to another
                    applicable path ``decode`` (M ≤ 16), ``fused`` (rank ≤ 256), ``two_gemm``
LoRA ``y = x Wᵀ + s·(x Aᵀ) Bᵀ``, rank 16 / 64
    ``dense``       base only, ``torch.matmul(x, Wᵀ)``: the floor the adapter adds to
    ``dense+adapter`` the PEFT form ``x Wᵀ + s·((x Aᵀ) Bᵀ)`` (the unfused baseline)
    ``triton``      ``lora_linear`` pinned to Triton

The row our automatic dispatch would run is marked ``auto``. ``×dense`` and ``×unfused`` are
speedups (baseline time / our time; > 1 is faster). Times are CUDA-graph replays (launch
overhead removed); ``eager_us`` is the same call in a plain Python loop (see
:mod:`lowrank_ops.benchmarks.timing`).

Run: ``python -m lowrank_ops.benchmarks.lowrank [--quick] [--out DIR]`` (or ``lowrank-ops bench``).
Without CUDA it prints a note and exits 0; ``--cpu-smoke`` runs the plumbing on CPU with the
reference backend on tiny shapes and wall-clock timing (the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from lowrank_ops.benchmarks import timing as T

# --------------------------------------------------------------------------- the shape lists
FULL = {
    "shapes": [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)],
    "ratios": [0.25, 0.5],
    # fixed small ranks, where the fused kernel is in play
    "rank_shapes": [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)],
    "fixed_ranks": [64, 256],
    "batches": [1, 4, 16, 64, 256, 1024],
    "lora_shapes": [(4096, 4096), (11008, 4096)],
    "lora_ranks": [16, 64],
    "lora_batches": [1, 16, 256, 1024],
}
# Small enough that bench/device_check.sh (csrc build + gpu lane + this) stays under 6 minutes:
# every new (shape, M bucket, dtype) can trigger a Triton autotune sweep.
QUICK = {
    "shapes": [(4096, 4096), (11008, 4096)],
    "ratios": [0.25],
    "rank_shapes": [(4096, 4096)],
    "fixed_ranks": [64],
    "batches": [1, 16, 256],
    "lora_shapes": [(4096, 4096)],
    "lora_ranks": [16],
    "lora_batches": [1, 256],
}
CPU_SMOKE = {
    "shapes": [(256, 192)],
    "ratios": [0.25],
    "rank_shapes": [],
    "fixed_ranks": [],
    "batches": [1, 4],
    "lora_shapes": [(128, 96)],
    "lora_ranks": [16],
    "lora_batches": [1, 4],
}
MODES = {"full": FULL, "quick": QUICK, "cpu-smoke": CPU_SMOKE}


@dataclass(frozen=True)
class Case:
    """One group of rows: a shape, a rank and a batch size, timed against its baselines."""

    family: str  # "lowrank" or "lora"
    n: int  # out_features
    k: int  # in_features
    rank: int
    m: int  # rows of x (batch × tokens)
    ratio: Optional[float] = None  # fraction of dense parameters held by the factors (lowrank)

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


def lowrank_cases(shapes: Sequence[tuple[int, int]], ratios: Sequence[float], batches: Sequence[int],
                  ranks: Sequence[int] = ()) -> list[Case]:
    """Ranks from parameter ratios, plus fixed ``ranks`` (their ``ratio`` left None)."""
    return ([Case("lowrank", n, k, T.rank_for_ratio(n, k, ratio), m, ratio)
             for (n, k) in shapes for ratio in ratios for m in batches]
            + [Case("lowrank", n, k, r, m) for (n, k) in shapes for r in ranks for m in batches])


def lora_cases(shapes: Sequence[tuple[int, int]], ranks: Sequence[int], batches: Sequence[int]) -> list[Case]:
    return [Case("lora", n, k, r, m) for (n, k) in shapes for r in ranks for m in batches]


def parse_shapes(text: str, flag: str = "--shapes", form: str = "NxK items like 4096x11008") -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` -> ``[(4096, 4096), (11008, 4096)]`` (N×K; ``flag`` and ``form``
    name the option and its items in a refusal)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n, k = (int(v) for v in part.split("x"))
        except ValueError:
            raise ValueError(f"{flag}: expected {form}, got {part!r}") from None
        if n <= 0 or k <= 0:
            raise ValueError(f"{flag}: sizes must be positive, got {part!r}")
        out.append((n, k))
    return out


def planned_shapes(args: argparse.Namespace, spec: dict, k_multiple: int,
                   why: str) -> tuple[list[tuple[int, int]], list[int]]:
    """(shapes, batch sizes) of a weight-matrix suite's plan: ``--shapes`` / ``--batches``, else the
    mode's ``spec``; every K a multiple of ``k_multiple`` (``why`` says what needs it)."""
    shapes = parse_shapes(args.shapes) if args.shapes else spec["shapes"]
    batches = parse_ints(args.batches, "--batches") if args.batches else spec["batches"]
    bad_k = [f"{n}x{k}" for n, k in shapes if k % k_multiple]
    if bad_k:
        raise ValueError(f"--shapes: K must be a multiple of {k_multiple} ({why}), got {','.join(bad_k)}")
    return shapes, batches


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------- backends
@dataclass
class Env:
    """What this run can use; probed once, lazily (never at import)."""

    device: torch.device
    dtype: torch.dtype
    triton_ok: bool = False
    triton_why: str = ""
    cuda_ok: bool = False
    cuda_why: str = ""


def probe_env(device: torch.device, dtype: torch.dtype) -> Env:
    env = Env(device, dtype)
    env.triton_ok, env.triton_why = T.probe_triton(device, "lowrank_ops.kernels.lowrank")
    if device.type != "cuda":
        env.cuda_why = "not on CUDA"
        return env
    try:
        from lowrank_ops.core import cuda_ext

        if not cuda_ext.available():
            env.cuda_why = f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}"
        else:
            importlib.import_module("lowrank_ops.lowrank.cuda_decode")
            env.cuda_ok = True
    except Exception as exc:
        env.cuda_why = f"CUDA backend not importable: {type(exc).__name__}: {exc}"
    return env


def cuda_support(x: torch.Tensor, rank: int) -> tuple[bool, str]:
    """Whether the CUDA decode kernel serves this call (its own verdict)."""
    try:
        from lowrank_ops.lowrank import cuda_decode

        verdict = cuda_decode.supports(x, rank)
        return bool(verdict.ok), str(getattr(verdict, "why", ""))
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def auto_choice(x: torch.Tensor, v: torch.Tensor, n: int) -> tuple[Optional[str], Optional[str]]:
    """(backend, triton path) the op would pick for this call with no pin, or (None, None)."""
    try:
        from lowrank_ops.core import backend
        from lowrank_ops.lowrank import ops

        if backend.pinned_backend() is not None:
            return None, None
        chosen = ops._lowrank_backend(x, v)
        path = ops.lowrank_path(x.shape[0], n, x.shape[1], v.shape[0]) if chosen == "triton" else None
        return chosen, path
    except Exception:
        return None, None


def lora_auto_choice(x: torch.Tensor, rank: int) -> tuple[Optional[str], Optional[str]]:
    """(backend, triton route) the LoRA op would pick for this call with no pin, or (None, None)."""
    try:
        from lowrank_ops.core import backend
        from lowrank_ops.lowrank import ops

        if backend.pinned_backend() is not None:
            return None, None
        chosen = ops._lora_backend(x, rank)
        return chosen, ops.lora_path(x.shape[0]) if chosen == "triton" else None
    except Exception:
        return None, None


ROUTE_FUNCTIONS = {"lowrank": "lowrank_path", "lora": "lora_path"}  # family -> ops' route function


@contextlib.contextmanager
def forced_path(path: Optional[str], family: str = "lowrank") -> Iterator[None]:
    """Force the Triton route of one family's op by overriding its route function in ``ops``.

    The op looks the function up in its module at call time, so the override holds for eager
    calls and for the one Python run that a CUDA-graph capture records.
    """
    if path is None:
        yield
        return
    from lowrank_ops.lowrank import ops

    name = ROUTE_FUNCTIONS[family]
    original = getattr(ops, name)
    setattr(ops, name, lambda *args: path)
    try:
        yield
    finally:
        setattr(ops, name, original)


@contextlib.contextmanager
def pinned(name: Optional[str]) -> Iterator[None]:
    if name is None:
        yield
        return
    from lowrank_ops.core.backend import use_backend

    with use_backend(name):
        yield


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    name: str
    kind: str  # "baseline" or "ours"
    operands: str  # which operand family it reads: "dense" (x, W) / "factors" (x, V, U) / "lora" (x, W, A, B)
    fn: Callable
    backend: Optional[str] = None
    path: Optional[str] = None
    skip: str = ""  # non-empty: not run, and why


def _dense(x, w, *_):
    return torch.matmul(x, w.t())


def _two_matmul(x, v, u):
    return torch.matmul(torch.matmul(x, v.t()), u.t())


LORA_SCALE = 0.5


def _dense_adapter(x, w, a, b):
    return torch.matmul(x, w.t()) + LORA_SCALE * torch.matmul(torch.matmul(x, a.t()), b.t())


def _ours_lowrank(x, v, u):
    from lowrank_ops.lowrank.ops import lowrank_linear

    return lowrank_linear(x, v, u)


def _ours_lora(x, w, a, b):
    from lowrank_ops.lowrank.ops import lora_linear

    return lora_linear(x, w, a, b, LORA_SCALE)


def lowrank_methods(case: Case, env: Env, probe_x: Optional[torch.Tensor] = None) -> list[Method]:
    """Every method timed for one low-rank case, including skipped ones (with the reason).

    On CPU (``--cpu-smoke``) the reference backend stands in for "ours"; Triton rows run there
    only under ``TRITON_INTERPRET=1`` (set before import), which tests the plumbing end to end.
    """
    from lowrank_ops.lowrank import ops

    methods = [Method("dense", "baseline", "dense", _dense),
               Method("two_matmul", "baseline", "factors", _two_matmul)]
    if env.device.type != "cuda":
        methods.append(Method("reference", "ours", "factors", _ours_lowrank, "reference"))
    if case.m <= ops.DECODE_MAX_M:
        why = env.cuda_why
        if not why and probe_x is not None:
            ok, reason = cuda_support(probe_x, case.rank)
            why = "" if ok else f"cuda_decode.supports: {reason or 'no'}"
        methods.append(Method("cuda", "ours", "factors", _ours_lowrank, "cuda", skip=why))
    auto_path = ops.lowrank_path(case.m, case.n, case.k, case.rank)
    methods.append(Method("triton", "ours", "factors", _ours_lowrank, "triton", auto_path, skip=env.triton_why))
    if env.triton_ok:  # the forced variants; without Triton the one skipped row says it all
        for path in applicable_paths(case):
            if path != auto_path:
                methods.append(Method(f"triton:{path}", "ours", "factors", _ours_lowrank, "triton", path))
    return methods


def applicable_paths(case: Case) -> list[str]:
    from lowrank_ops.kernels import lowrank as kernels
    from lowrank_ops.lowrank import ops

    paths = []
    if case.m <= ops.DECODE_MAX_M:
        paths.append("decode")
    if case.rank <= kernels.FUSED_MAX_RANK:
        paths.append("fused")
    paths.append("two_gemm")
    return paths


def lora_methods(case: Case, env: Env) -> list[Method]:
    methods = [Method("dense", "baseline", "dense", _dense),
               Method("dense+adapter", "baseline", "lora", _dense_adapter)]
    if env.device.type != "cuda":
        methods.append(Method("reference", "ours", "lora", _ours_lora, "reference"))
    from lowrank_ops.lowrank import ops

    auto_path = ops.lora_path(case.m)
    methods.append(Method("triton", "ours", "lora", _ours_lora, "triton", auto_path, skip=env.triton_why))
    if env.triton_ok and auto_path != "fused":  # the fused kernel, where dispatch prefers cuBLAS
        methods.append(Method("triton:fused", "ours", "lora", _ours_lora, "triton", "fused"))
    return methods


UNFUSED = {"lowrank": "two_matmul", "lora": "dense+adapter"}


# --------------------------------------------------------------------------- operands
def _randn(shape, std, env: Env, gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=env.device, dtype=torch.float32 if env.device.type == "cpu" else env.dtype)
    return (t * std).to(env.dtype)


def operand_bytes(case: Case, family: str, elem: int) -> int:
    """Bytes of one copy of an operand family (what rotation is sized on)."""
    m, n, k, r = case.m, case.n, case.k, case.rank
    if family == "dense":
        return elem * (m * k + n * k)
    if family == "factors":
        return elem * (m * k + r * k + n * r)
    if family == "lora":
        return elem * (m * k + n * k + r * k + n * r)
    raise ValueError(f"unknown operand family {family!r}")


def make_operands(case: Case, family: str, copies: int, env: Env, seed: int = 0) -> list[tuple]:
    gen = torch.Generator(device=env.device)
    gen.manual_seed(seed)
    m, n, k, r = case.m, case.n, case.k, case.rank
    sets = []
    for _ in range(copies):
        x = _randn((m, k), 1.0, env, gen)
        if family == "dense":
            sets.append((x, _randn((n, k), k ** -0.5, env, gen)))
        elif family == "factors":
            sets.append((x, _randn((r, k), k ** -0.5, env, gen), _randn((n, r), r ** -0.5, env, gen)))
        else:
            sets.append((x, _randn((n, k), k ** -0.5, env, gen), _randn((r, k), k ** -0.5, env, gen),
                         _randn((n, r), r ** -0.5, env, gen)))
    return sets


def op_cost(case: Case, method: Method, elem: int) -> T.OpCost:
    """Useful bytes/flops of what the method computes (the dense row counts the dense layer)."""
    m, n, k, r = case.m, case.n, case.k, case.rank
    if method.operands == "dense":
        return T.dense_cost(m, n, k, elem)
    if case.family == "lora":
        return T.lora_cost(m, n, k, r, elem)
    return T.lowrank_cost(m, n, k, r, elem)


# --------------------------------------------------------------------------- running
@dataclass
class RunConfig:
    mode: str
    dtype: torch.dtype
    use_graph: bool = True
    eager: bool = True
    target_ms: float = 25.0
    time_budget_s: Optional[float] = None
    methods: Optional[set[str]] = None  # restrict to these method names (baselines always run)
    max_copies: int = T.MAX_COPIES  # rotating copies at most (the CPU smoke mode keeps this tiny)


def _base_row(case: Case, method: Method, env: Env) -> dict:
    return {
        "family": case.family, "shape": case.shape, "n": case.n, "k": case.k, "rank": case.rank,
        "ratio": case.ratio, "m": case.m, "dtype": T.dtype_name(env.dtype), "method": method.name,
        "kind": method.kind, "backend": method.backend, "path": method.path, "auto": False,
        "status": "ok", "note": "",
    }


def run_case(case: Case, env: Env, cfg: RunConfig, copy_gbps: Optional[float],
             matmul_tflops: Optional[float], log: Callable[[str], None] = print) -> list[dict]:
    """Time every method of one case; never raises (failures become rows with status "error")."""
    elem = T.element_size(env.dtype)
    cache = T.cache_bytes(env.device)
    probe = torch.empty((case.m, case.k), device=env.device, dtype=env.dtype)
    methods = lowrank_methods(case, env, probe) if case.family == "lowrank" else lora_methods(case, env)
    if cfg.methods:
        methods = [mt for mt in methods if mt.kind == "baseline" or mt.name in cfg.methods]

    if case.family == "lowrank":
        v_probe = torch.empty((case.rank, case.k), device=env.device, dtype=env.dtype)
        auto_backend, auto_path = auto_choice(probe, v_probe, case.n)
        del v_probe
    else:
        auto_backend, auto_path = lora_auto_choice(probe, case.rank)
    del probe

    operands: dict[str, list[tuple]] = {}
    rows = []
    try:
        for method in methods:
            row = _base_row(case, method, env)
            if method.kind == "ours" and method.backend == auto_backend:
                row["auto"] = method.backend != "triton" or method.path == auto_path
            cost = op_cost(case, method, elem)
            row.update(T.derived_metrics(None, cost, copy_gbps, matmul_tflops))
            if method.skip:
                row.update(status="skipped", note=method.skip)
                rows.append(row)
                continue
            try:
                if method.operands not in operands:
                    per_copy = operand_bytes(case, method.operands, elem)
                    n_copies = T.rotation_copies(per_copy, cache, max_copies=cfg.max_copies,
                                                 min_copies=min(2, cfg.max_copies))
                    operands[method.operands] = make_operands(case, method.operands, n_copies, env)
                arg_sets = operands[method.operands]
                with pinned(method.backend), forced_path(method.path if method.name.startswith("triton:") else None, case.family):
                    timing = T.measure(method.fn, arg_sets, env.device, use_graph=cfg.use_graph,
                                       eager=cfg.eager, target_ms=cfg.target_ms)
                row.update(median_us=timing.median_us, p20_us=timing.p20_us, p80_us=timing.p80_us,
                           eager_us=timing.eager_us, timing_mode=timing.mode, samples=timing.samples,
                           calls_per_sample=timing.calls_per_sample, copies=timing.copies)
                row.update(T.derived_metrics(timing.median_us, cost, copy_gbps, matmul_tflops))
                if timing.note:
                    row["note"] = timing.note
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                row.update(status="error", note=f"{type(exc).__name__}: {msg}")
                log(f"  ! {case.shape} r={case.rank} M={case.m} {method.name}: {type(exc).__name__}: {exc}")
                log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3)).rstrip())
                if env.device.type == "cuda":
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
            rows.append(row)
    finally:
        operands.clear()
    add_speedups(rows)
    return rows


CASE_KEYS = ("family", "shape", "rank", "m", "dtype")  # the fields that make one case


def add_speedups(rows: list[dict]) -> None:
    """``vs_dense`` and ``vs_unfused`` (baseline median / this median) within each case."""
    for group in T.group_rows(rows, CASE_KEYS).values():
        by_name = {r["method"]: r for r in group}
        family = group[0]["family"]
        dense = by_name.get("dense", {}).get("median_us")
        unfused = by_name.get(UNFUSED[family], {}).get("median_us")
        for row in group:
            row["unfused_method"] = UNFUSED[family]
            row["vs_dense"] = T.speedup(dense, row.get("median_us"))
            row["vs_unfused"] = T.speedup(unfused, row.get("median_us"))


# --------------------------------------------------------------------------- tables
TABLE_COLUMNS = [
    T.Column("family", "family", 7, align="<"),
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("rank", "r", 5),
    T.Column("m", "M", 5),
    T.Column(T.method_cell, "method", 18, align="<"),
    T.Column("median_us", "med_us", 9, ".1f"),
    T.Column("eager_us", "eager_us", 9, ".1f"),
    T.Column("gbps", "GB/s", 7, ".0f"),
    T.COPY_PCT,
    T.Column("tflops", "TFLOP/s", 8, ".1f"),
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("vs_unfused", "xunfused", 8, ".2f"),
]


def format_rows(rows: Sequence[dict], title: str = "") -> str:
    return T.format_table(rows, TABLE_COLUMNS, title=title, trailing=T.note_cell)


SUMMARY_COLUMNS = [
    T.Column("family", "family", 7, align="<"),
    T.Column("shape", "NxK", 10, align="<"),
    T.Column("rank", "r", 5),
    T.Column("m", "M", 5),
    T.Column("dense_us", "dense_us", 9, ".1f"),
    T.Column("unfused_us", "unfused_us", 10, ".1f"),
    T.Column("best", "best ours", 18, align="<"),
    T.Column("best_us", "ours_us", 9, ".1f"),
    T.Column("vs_dense", "xdense", 7, ".2f"),
    T.Column("vs_unfused", "xunfused", 8, ".2f"),
    T.COPY_PCT,
]


def summarize_rows(rows: Sequence[dict]) -> list[dict]:
    """One line per case: baselines and our fastest measured method."""
    out = []
    for (family, shape, rank, m, _dtype), group in T.group_rows(rows, CASE_KEYS).items():
        by_name = {r["method"]: r for r in group}
        ours = [r for r in group if r.get("kind") == "ours" and r.get("median_us")]
        out.append({
            "family": family, "shape": shape, "rank": rank, "m": m,
            "dense_us": by_name.get("dense", {}).get("median_us"),
            "unfused_us": by_name.get(UNFUSED[family], {}).get("median_us"),
            **T.best_of(group, ours, ("vs_dense", "vs_unfused")),
        })
    return out


def format_summary(payload: dict) -> str:
    mm = payload.get("matmul_tflops")
    return T.suite_summary("lowrank", payload, summarize_rows(payload.get("rows", [])), SUMMARY_COLUMNS,
                           detail=f"matmul {mm:.1f} TFLOP/s" if mm else "")


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = T.suite_parser("lowrank", "Benchmark lowrank_linear / lora_linear against cuBLAS baselines.", "few shapes and batches")
    p.add_argument("--shapes", help="override shapes, N×K list: 4096x4096,11008x4096")
    p.add_argument("--ratios", help="override parameter ratios, e.g. 0.25,0.5")
    p.add_argument("--batches", help="override batch sizes M, e.g. 1,16,256")
    p.add_argument("--lora-ranks", help="override LoRA ranks, e.g. 16,64")
    p.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    p.add_argument("--no-lowrank", action="store_true", help="skip the low-rank rows")
    p.add_argument("--dtype", choices=sorted(T.DTYPES), default=None, help="default fp16 (fp32 in --cpu-smoke)")
    return p


def select_cases(args: argparse.Namespace, mode: str) -> list[Case]:
    spec = MODES[mode]
    shapes = parse_shapes(args.shapes) if args.shapes else spec["shapes"]
    ratios = [float(v) for v in args.ratios.split(",")] if args.ratios else spec["ratios"]
    batches = parse_ints(args.batches, "--batches") if args.batches else spec["batches"]
    lora_ranks = parse_ints(args.lora_ranks, "--lora-ranks") if args.lora_ranks else spec["lora_ranks"]
    lora_batches = parse_ints(args.batches, "--batches") if args.batches else spec["lora_batches"]
    lora_shapes = parse_shapes(args.shapes) if args.shapes else spec["lora_shapes"]
    cases = [] if args.no_lowrank else lowrank_cases(shapes, ratios, batches)
    if not args.no_lowrank and not args.shapes and not args.ratios:
        cases += lowrank_cases(spec["rank_shapes"], [], batches, spec["fixed_ranks"])
    if not args.no_lora:
        cases += lora_cases(lora_shapes, lora_ranks, lora_batches)
    return cases


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m lowrank_ops.benchmarks.lowrank``, ``lowrank-ops bench``); returns the exit code."""
    return T.suite_main(argv, "lowrank", build_parser(), format_summary, select_cases, _run)


def _run(args: argparse.Namespace, mode: str, device: torch.device, cases: list[Case]) -> int:
    dtype = T.DTYPES[args.dtype or ("fp32" if mode == "cpu-smoke" else "fp16")]
    cfg = RunConfig(mode, dtype, use_graph=not args.no_graph, target_ms=args.target_ms,
                    max_copies=4 if mode == "cpu-smoke" else T.MAX_COPIES,
                    time_budget_s=args.time_budget, methods=T.methods_filter(args))

    t_start = time.perf_counter()
    env = probe_env(device, dtype)
    meta, copy_gbps, matmul_tflops = T.run_prologue(
        "lowrank", mode, device, dtype, f"{len(cases)} cases",
        {"triton": (env.triton_ok, env.triton_why), "cuda": (env.cuda_ok, env.cuda_why)})

    def error_row(case: Case, exc: BaseException) -> dict:
        return {"family": case.family, "shape": case.shape, "n": case.n, "k": case.k, "rank": case.rank,
                "ratio": case.ratio, "m": case.m, "dtype": T.dtype_name(dtype), "method": "(case)",
                "kind": "ours", "status": "error", "note": f"{type(exc).__name__}: {exc}"[:200]}

    def describe(case: Case, case_rows: list[dict]) -> str:
        ours = [r for r in case_rows if r.get("kind") == "ours" and r.get("median_us")]
        best = min(ours, key=lambda r: r["median_us"]) if ours else None
        return (f"{case.family} {case.shape} r={case.rank} M={case.m}"
                + (f", best {T.method_cell(best)} {best['median_us']:.1f} us" if best else ""))

    header = {
        "suite": "lowrank", "mode": mode, "meta": meta, "copy_bandwidth_gbps": copy_gbps, "matmul_tflops": matmul_tflops,
        "timing": T.timing_info(device, cfg.use_graph, cfg.target_ms, lora_scale=LORA_SCALE,
                                units="times in microseconds per call; gbps = useful bytes / time; vs_* = baseline / this"),
    }
    T.run_and_save("lowrank", mode, header, t_start, args.out, cases,
                             lambda case: run_case(case, env, cfg, copy_gbps, matmul_tflops),
                             error_row, describe, device, cfg.time_budget_s, format_rows=format_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
