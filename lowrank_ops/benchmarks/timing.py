"""Measurement library shared by every benchmark family.

What it gives a suite:

* **Timers** over *rotating buffers*. A suite makes ``n`` distinct copies of an op's operands
  (weights and inputs) with :func:`rotation_copies` choosing ``n`` so that their total exceeds
  ``ROTATE_FACTOR`` × the L2 size (H100: 50 MB), and the timed loop cycles through them: each
  call then reads its weights from HBM, not from L2. :func:`measure` returns a :class:`Timing`:

  - ``median_us`` / ``p20_us`` / ``p80_us``: the primary number. On CUDA it comes from
    **CUDA-graph replay**: the loop over the copies (repeated to at least ``min_calls``
    calls) is captured once and each replay is timed with CUDA events; per-call time is the
    replay time / calls per replay. This is kernel time with launch overhead removed, which
    is how a serving engine runs decode. If capture fails, the primary falls back to the
    eager events below (``mode == "events"``) and ``note`` says why.
  - ``eager_us``: median of per-call CUDA events around plain eager calls. When the host
    cannot launch faster than the GPU finishes (small decode kernels, Python dispatch of a
    custom op) the gaps show up here; it is what a Python loop without graphs sees.
  - On CPU (``--cpu-smoke``) everything is wall-clock (``time.perf_counter``), mode ``"wall"``.

* **Ceilings measured once per run**: device copy bandwidth (:func:`measure_copy_bandwidth`,
  bytes read + written over time) and a large fp16 matmul rate (:func:`measure_matmul_tflops`).

* **Roofline counts** (:class:`OpCost`): the fewest bytes an op must move (each input read once,
  each output written once) and its flops, for dense, low-rank, unfused two-GEMM and LoRA forms.
  :func:`derived_metrics` turns a time into achieved GB/s, fraction of the measured copy
  bandwidth, TFLOP/s and the roofline floor.

* **Output**: :func:`run_metadata` (device, versions, date, git commit), :func:`write_json`
  and :func:`format_table` (fixed width, printed last).

Nothing here touches the GPU at import time; every query takes the device as an argument.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

# --------------------------------------------------------------------------- constants
ROTATE_FACTOR = 2.0  # rotating copies together exceed this many times the L2 size
DEFAULT_L2_BYTES = 50 * 1000 * 1000  # H100's 50 MB, used only if the device does not say
CPU_NOMINAL_CACHE_BYTES = 2**20  # stands in for "L2" in the CPU smoke mode (plumbing only)
MAX_ROTATE_BYTES = 4 * 2**30  # never allocate more than this for one operand family
MAX_COPIES = 256  # nor more copies than this (tiny decode weights would ask for thousands)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).replace("torch.", "")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- roofline counts
@dataclass(frozen=True)
class OpCost:
    """The fewest bytes an op moves through device memory, and its floating-point operations."""

    bytes: int
    flops: int

    def floor_s(self, bandwidth_gbps: float, tflops: Optional[float] = None) -> float:
        """Roofline floor in seconds: the larger of bytes / bandwidth and flops / rate."""
        t = self.bytes / (bandwidth_gbps * 1e9) if bandwidth_gbps else 0.0
        if tflops:
            t = max(t, self.flops / (tflops * 1e12))
        return t

    @property
    def intensity(self) -> float:
        """Flops per byte."""
        return self.flops / self.bytes if self.bytes else float("inf")


def dense_cost(m: int, n: int, k: int, elem: int = 2, bias: bool = False) -> OpCost:
    """``y = x Wᵀ (+ b)``: x (m, k), W (n, k), y (m, n)."""
    return OpCost(elem * (m * k + n * k + m * n + (n if bias else 0)), 2 * m * n * k)


def lowrank_cost(m: int, n: int, k: int, r: int, elem: int = 2, bias: bool = False) -> OpCost:
    """``y = (x Vᵀ) Uᵀ (+ b)`` done in one pass: x, V (r, k), U (n, r) read once, y written once."""
    return OpCost(elem * (m * k + r * k + n * r + m * n + (n if bias else 0)), 2 * m * r * (k + n))


def two_gemm_cost(m: int, n: int, k: int, r: int, elem: int = 2, bias: bool = False) -> OpCost:
    """The unfused form's real traffic: :func:`lowrank_cost` plus the (m, r) intermediate written and read."""
    fused = lowrank_cost(m, n, k, r, elem, bias)
    return OpCost(fused.bytes + 2 * elem * m * r, fused.flops)


def lora_cost(m: int, n: int, k: int, r: int, elem: int = 2, bias: bool = False) -> OpCost:
    """``y = x Wᵀ + s·(x Aᵀ) Bᵀ (+ b)`` in one pass: x, W, A (r, k), B (n, r) read once, y written once."""
    return OpCost(
        elem * (m * k + n * k + r * k + n * r + m * n + (n if bias else 0)),
        2 * m * n * k + 2 * m * r * (k + n),
    )


def rank_for_ratio(n: int, k: int, ratio: float, multiple: int = 16) -> int:
    """Rank whose factors hold ``ratio`` of the dense parameters: ``ratio·n·k/(n+k)``, rounded
    down to a multiple of ``multiple`` (at least ``multiple``)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio}")
    exact = ratio * n * k / (n + k)
    return max(multiple, int(math.floor(exact / multiple)) * multiple)


def batch1_speedup_limit(n: int, k: int, r: int) -> float:
    """Best possible speedup of the low-rank op over the dense one at batch 1 (byte ratio)."""
    return dense_cost(1, n, k).bytes / lowrank_cost(1, n, k, r).bytes


# --------------------------------------------------------------------------- rotating buffers
def rotation_copies(
    bytes_per_copy: int,
    cache_bytes: int,
    *,
    factor: float = ROTATE_FACTOR,
    max_total_bytes: int = MAX_ROTATE_BYTES,
    max_copies: int = MAX_COPIES,
    min_copies: int = 1,
) -> int:
    """How many distinct operand copies to cycle through so they total more than ``factor`` × cache.

    ``n = floor(factor·cache / bytes_per_copy) + 1`` (strictly more than the target), at least
    ``min_copies``, then capped by ``max_copies`` and by ``max_total_bytes`` (never below 1).
    One copy already larger than ``factor`` × cache needs no rotation.
    """
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy: expected > 0, got {bytes_per_copy}")
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes: expected >= 0, got {cache_bytes}")
    n = max(min_copies, int(factor * cache_bytes // bytes_per_copy) + 1)
    n = min(n, max_copies, max(1, max_total_bytes // bytes_per_copy))
    return max(1, n)


def tensors_nbytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- device facts
def cache_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device (``L2_cache_size``), or a nominal cache size on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_NOMINAL_CACHE_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """One op's time. All times are per call, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    mode: str  # "graph" (CUDA graph replay), "events" (eager CUDA events), "wall" (CPU clock)
    samples: int  # timed samples the quantiles come from
    calls_per_sample: int  # calls inside one sample (graph: calls per replay)
    eager_us: Optional[float] = None  # eager per-call median (CUDA events), when measured
    copies: int = 1  # rotating operand copies cycled through
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (``q`` in [0, 1])."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(per_call_us: Sequence[float]) -> tuple[float, float, float]:
    return quantile(per_call_us, 0.5), quantile(per_call_us, 0.2), quantile(per_call_us, 0.8)


def _run_all(fn: Callable, arg_sets: Sequence[Sequence[Any]]) -> None:
    for args in arg_sets:
        fn(*args)


def _events_per_call(fn: Callable, arg_sets: Sequence[Sequence[Any]], reps: int) -> list[float]:
    """Per-call CUDA-event times (us) of eager calls cycling through ``arg_sets``."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    n = len(arg_sets)
    for i in range(reps):
        args = arg_sets[i % n]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def _graph_per_call(
    fn: Callable, arg_sets: Sequence[Sequence[Any]], calls: int, replays: int
) -> list[float]:
    """Capture ``calls`` calls (cycling through ``arg_sets``) in one CUDA graph; per-call us per replay."""
    n = len(arg_sets)
    # Warm up on a side stream, as torch recommends before capture (lazy init, workspaces).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run_all(fn, arg_sets)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(*arg_sets[i % n])
        graph.replay()  # one untimed replay
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        for i in range(replays):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
    finally:
        del graph


def measure(
    fn: Callable,
    arg_sets: Sequence[Sequence[Any]],
    device: torch.device,
    *,
    use_graph: bool = True,
    eager: bool = True,
    warmup: int = 2,
    target_ms: float = 25.0,
    min_calls: int = 32,
    max_calls: int = 512,
    min_samples: int = 5,
    max_samples: int = 100,
) -> Timing:
    """Time ``fn(*args)`` cycling through ``arg_sets`` (the rotating copies) on ``device``.

    Warm-up runs every copy ``warmup`` times eagerly first (Triton compiles and autotunes
    there, outside the timed region). ``target_ms`` is roughly how long each timing mode runs.
    """
    if not arg_sets:
        raise ValueError("arg_sets: expected at least one argument tuple")
    device = torch.device(device)
    n = len(arg_sets)
    if device.type != "cuda":
        return _measure_wall(fn, arg_sets, warmup=warmup, target_ms=target_ms,
                             min_samples=min_samples, max_samples=max_samples)

    for _ in range(max(1, warmup)):
        _run_all(fn, arg_sets)
    torch.cuda.synchronize()
    # Rough per-call estimate to size the timed loops.
    est = max(1e-3, quantile(_events_per_call(fn, arg_sets, max(n, 4)), 0.5))

    eager_us: Optional[float] = None
    eager_times: Optional[list[float]] = None
    if eager or not use_graph:
        reps = int(min(max_samples * 4, max(min_samples, target_ms * 1e3 / est)))
        eager_times = _events_per_call(fn, arg_sets, reps)
        eager_us = quantile(eager_times, 0.5)

    note = ""
    if use_graph:
        loops = max(1, math.ceil(max(min_calls, 200.0 / est) / n))  # >= ~200 us per replay
        calls = min(max(n, loops * n), max(n, max_calls))
        replays = int(min(max_samples, max(min_samples, target_ms * 1e3 / (est * calls))))
        try:
            per_call = _graph_per_call(fn, arg_sets, calls, replays)
            med, p20, p80 = _summary(per_call)
            return Timing(med, p20, p80, "graph", len(per_call), calls, eager_us, n)
        except Exception as exc:  # capture unsupported by this op/backend: fall back to events
            torch.cuda.synchronize()
            note = f"graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); eager events"
            if eager_times is None:
                eager_times = _events_per_call(fn, arg_sets, max(min_samples, 50))
                eager_us = quantile(eager_times, 0.5)
    assert eager_times is not None
    med, p20, p80 = _summary(eager_times)
    return Timing(med, p20, p80, "events", len(eager_times), 1, eager_us, n, note)


def _measure_wall(fn, arg_sets, *, warmup, target_ms, min_samples, max_samples) -> Timing:
    n = len(arg_sets)
    for _ in range(max(1, warmup)):
        _run_all(fn, arg_sets)
    t0 = time.perf_counter()
    fn(*arg_sets[0])
    est_us = max(1.0, (time.perf_counter() - t0) * 1e6)
    reps = int(min(max_samples, max(min_samples, target_ms * 1e3 / est_us)))
    times = []
    for i in range(reps):
        args = arg_sets[i % n]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e6)
    med, p20, p80 = _summary(times)
    return Timing(med, p20, p80, "wall", reps, 1, med, n)


# --------------------------------------------------------------------------- ceilings
def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 20) -> float:
    """Device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written.

    CUDA: a 1 GiB buffer (less if memory is short) copied ``reps`` times, median of CUDA-event
    times. CPU: a 64 MiB buffer, wall clock.
    """
    device = torch.device(device)
    if nbytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            nbytes = int(min(2**30, free // 8))
        else:
            nbytes = 16 * 2**20
    nbytes = max(2**20, nbytes // 4 * 4)
    src = torch.randint(0, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    times_s = []
    if device.type == "cuda":
        dst.copy_(src)
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            dst.copy_(src)
            ends[i].record()
        torch.cuda.synchronize(device)
        times_s = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    else:
        dst.copy_(src)
        for _ in range(max(3, reps // 4)):
            t0 = time.perf_counter()
            dst.copy_(src)
            times_s.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / quantile(times_s, 0.5) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float16, size: Optional[int] = None,
                          reps: int = 10) -> float:
    """Dense matmul rate in TFLOP/s on random data (CUDA: 8192³; CPU: 512³)."""
    device = torch.device(device)
    if size is None:
        size = 8192 if device.type == "cuda" else 512
    if device.type != "cuda" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = measure(torch.matmul, [(a, b)], device, use_graph=False, eager=True, target_ms=20.0,
                     min_samples=reps, max_samples=reps)
    del a, b
    return 2 * size**3 / (timing.median_us * 1e-6) / 1e12


def derived_metrics(time_us: Optional[float], cost: OpCost, copy_gbps: Optional[float],
                    matmul_tflops: Optional[float] = None) -> dict:
    """Achieved GB/s, fraction of the measured copy bandwidth, TFLOP/s and the roofline floor."""
    out: dict[str, Optional[float]] = {"bytes": cost.bytes, "flops": cost.flops,
                                       "gbps": None, "frac_copy_bw": None, "tflops": None,
                                       "floor_us": None, "frac_floor": None}
    if copy_gbps:
        out["floor_us"] = cost.floor_s(copy_gbps, matmul_tflops) * 1e6
    if time_us and time_us > 0:
        out["gbps"] = cost.bytes / time_us / 1e3
        out["tflops"] = cost.flops / time_us / 1e6
        if copy_gbps:
            out["frac_copy_bw"] = out["gbps"] / copy_gbps
            out["frac_floor"] = out["floor_us"] / time_us
    return out


# --------------------------------------------------------------------------- metadata
def git_commit(repo_dir: Optional[os.PathLike] = None) -> Optional[str]:
    """Commit of the code measured: ``$LOWRANK_OPS_GIT_COMMIT`` / ``$GIT_COMMIT``, else ``git rev-parse``."""
    for var in ("LOWRANK_OPS_GIT_COMMIT", "GIT_COMMIT"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    repo = Path(repo_dir) if repo_dir else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None


def run_metadata(device: torch.device, **extra: Any) -> dict:
    """Everything a result file needs to be read later: device, versions, date, commit."""
    device = torch.device(device)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "git_commit": git_commit(),
        "argv": sys.argv,
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update({
            "device": props.name,
            "capability": f"sm_{props.major}{props.minor}",
            "sm_count": props.multi_processor_count,
            "l2_bytes": cache_bytes(device),
            "memory_bytes": props.total_memory,
        })
    else:
        meta.update({"device": platform.processor() or platform.machine() or "cpu",
                     "l2_bytes": cache_bytes(device)})
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------- output
def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, dtypes and devices strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def write_json(path: os.PathLike, payload: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(payload), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def json_checkpoint(path: Optional[os.PathLike], header: Mapping[str, Any], t_start: float
                    ) -> Callable[[list[dict], list[str]], dict]:
    """A ``save(rows, notes) -> payload`` that writes ``header`` + elapsed time + notes + rows
    to ``path`` (when given) each time it is called: :func:`run_cases` calls it after every
    case, so a run killed by a timeout keeps what it measured."""

    def save(rows: list[dict], notes: list[str]) -> dict:
        payload = {**header, "elapsed_s": time.perf_counter() - t_start, "notes": list(notes), "rows": list(rows)}
        if path is not None:
            write_json(path, payload)
        return payload

    return save


def load_json(path: os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclass(frozen=True)
class Column:
    """One table column: row key (or a callable of the row), header, width, format spec."""

    key: Any
    header: str
    width: int
    fmt: str = ""
    align: str = ">"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "-"
        elif self.fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
            text = format(value, self.fmt)
        else:
            text = str(value)
        if len(text) > self.width:
            text = text[: self.width - 1] + "~"
        return format(text, f"{self.align}{self.width}")


COPY_PCT = Column(lambda r: None if r.get("frac_copy_bw") is None else 100 * r["frac_copy_bw"], "%copy", 6, ".1f")


def target_columns(target_width: int, method_width: int, where: Sequence[Column]) -> list[Column]:
    """The columns of a suite's targets table: the target, where it was measured (``where``),
    by which method, the value against the goal and whether it was met."""
    return [Column("target", "target", target_width, align="<"), *where,
            Column("method", "method", method_width, align="<"), Column("value", "value", 6, ".2f"),
            Column("goal", "goal", 5, ".2f"), Column("met", "met", 4)]


def suite_summary(suite: str, payload: Mapping[str, Any], table: Sequence[Mapping[str, Any]], columns: Sequence[Column],
                  *, detail: str = "", skipped_baseline: str = "", targets: Sequence[Mapping[str, Any]] = (),
                  target_cols: Sequence[Column] = ()) -> str:
    """The printed summary of one suite's JSON ``payload``: a title (suite, mode, device, dtype,
    ``detail``, copy bandwidth, timing mode), the per-case ``table``, why the ``skipped_baseline``
    was skipped, the run's notes, and the ``targets`` table when there is one."""
    meta, bw = payload.get("meta", {}), payload.get("copy_bandwidth_gbps")
    parts = (f"{suite} {payload.get('mode', '?')}", meta.get("device", "?"), meta.get("dtype", ""), detail,
             f"copy {bw:.0f} GB/s" if bw else "", f"times: {payload.get('timing', {}).get('primary', '?')}")
    text = format_table(table, columns, title=" | ".join(p for p in parts if p))
    rows = payload.get("rows", [])
    reasons = {r.get("note") for r in rows if skipped_baseline and r.get("method") == skipped_baseline
               and r.get("status") == "skipped"}
    if reasons:
        text += f"\n{skipped_baseline} skipped: " + "; ".join(sorted(n for n in reasons if n))[:300]
    if payload.get("notes"):
        text += "\nnotes: " + "; ".join(payload["notes"])
    if targets:
        text += "\n" + format_table(targets, target_cols, title="targets (printed, not asserted)")
    return text


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], title: str = "",
                 trailing: Optional[Callable[[Mapping[str, Any]], str]] = None) -> str:
    """Fixed-width text table; ``trailing(row)`` adds an unpadded free-text cell (notes) at the end."""
    header = " ".join(format(c.header[: c.width], f"{c.align}{c.width}") for c in columns)
    if trailing is not None:
        header += " note"
    lines = []
    if title:
        lines.append(title)
    lines += [header.rstrip(), "-" * len(header.rstrip())]
    for row in rows:
        line = " ".join(c.cell(row) for c in columns)
        if trailing is not None:
            extra = trailing(row)
            if extra:
                line += " " + extra
        lines.append(line.rstrip())
    return "\n".join(lines)


@contextlib.contextmanager
def elapsed() -> Any:
    """``with elapsed() as t: ...; t()`` gives seconds since entry."""
    t0 = time.perf_counter()
    yield lambda: time.perf_counter() - t0


# --------------------------------------------------------------------------- suite plumbing
# the metadata keys of a backend's availability: ``<key>_usable`` and ``<key>_note``
_BACKEND_META_KEYS = {"triton": "triton", "cuda": "cuda_ext"}


def run_prologue(suite: str, mode: str, device: torch.device, dtype: torch.dtype, plan: str,
                 backends: dict[str, tuple[bool, str]]) -> tuple[dict, float, float]:
    """The start every suite's run shares: copy bandwidth and matmul throughput measured, the run's
    metadata (:func:`run_metadata`, with each of ``backends``' availability: name ("triton" or
    "cuda") -> (usable, why not)), the banner line ending in ``plan``, and a note for each backend
    the run cannot use. Returns (metadata, copy GB/s, matmul TFLOP/s)."""
    copy_gbps = measure_copy_bandwidth(device)
    matmul_tflops = measure_matmul_tflops(device, dtype if device.type == "cuda" else torch.float32)
    availability = {}
    for name, (usable, why) in backends.items():
        availability.update({f"{_BACKEND_META_KEYS[name]}_usable": usable, f"{_BACKEND_META_KEYS[name]}_note": why})
    meta = run_metadata(device, dtype=dtype_name(dtype), **availability)
    print(f"{suite} benchmarks [{mode}] on {meta['device']} | {dtype_name(dtype)} | copy {copy_gbps:.0f} GB/s | "
          f"matmul {matmul_tflops:.1f} TFLOP/s | L2 {meta['l2_bytes'] / 1e6:.0f} MB | {plan}", flush=True)
    for name, (usable, why) in backends.items():
        if not usable:
            print(f"  note: {name} backend unavailable: {why}")
    return meta, copy_gbps, matmul_tflops


def method_cell(row: Mapping[str, Any]) -> str:
    """A row's method for tables: ``triton(path)``, ``*`` when it is what automatic dispatch picks."""
    name = row["method"]
    if name == "triton" and row.get("path"):
        name += f"({row['path']})"
    return name + ("*" if row.get("auto") else "")


def note_cell(row: Mapping[str, Any]) -> str:
    if row.get("status") == "skipped":
        return f"skipped: {row.get('note', '')}"
    if row.get("status") == "error":
        return f"ERROR {row.get('note', '')}"
    return row.get("note", "")


def group_rows(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows grouped by their values of ``keys`` (a case), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def speedup(baseline_us: Optional[float], us: Optional[float]) -> Optional[float]:
    """``baseline / this`` (> 1 is faster), None when either time is missing."""
    return baseline_us / us if (baseline_us and us) else None


def best_rows(rows: Sequence[dict], keys: Sequence[str]) -> dict[tuple, dict]:
    """{values of ``keys``: our fastest measured row}."""
    out: dict[tuple, dict] = {}
    for row in rows:
        if row.get("kind") == "ours" and row.get("median_us"):
            key = tuple(row[k] for k in keys)
            if key not in out or row["median_us"] < out[key]["median_us"]:
                out[key] = row
    return out


def target_line(text: str, where: Mapping[str, Any], method: str, value: Optional[float], goal: float,
                at_most: bool = False) -> dict:
    """One line of a targets table: ``value`` against ``goal`` (met when ≥ goal, or ≤ with
    ``at_most``), "-" when nothing was measured; ``where`` names the case (shape, M, ...)."""
    met = None if value is None else (value <= goal if at_most else value >= goal)
    return {"target": text, **where, "method": method, "value": value, "goal": goal,
            "met": {True: "yes", False: "NO", None: "-"}[met]}


def best_of(group: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, Any]],
            ratio_keys: Sequence[str]) -> dict:
    """Summary cells of one case: the fastest of ``candidates`` (its method, time, copy-bandwidth
    fraction and ``ratio_keys``), with the number of errored rows of ``group`` noted."""
    best = min(candidates, key=lambda r: r["median_us"]) if candidates else None
    errors = sum(1 for r in group if r.get("status") == "error")
    return {
        "best": (method_cell(best) if best else "-") + (f" ({errors} err)" if errors else ""),
        "best_us": best["median_us"] if best else None,
        **{key: best.get(key) if best else None for key in ratio_keys},
        "frac_copy_bw": best.get("frac_copy_bw") if best else None,
    }


def run_cases(
    cases: Sequence[Any],
    run_case: Callable[[Any], list[dict]],
    error_row: Callable[[Any, BaseException], dict],
    describe: Callable[[Any, list[dict]], str],
    device: torch.device,
    time_budget_s: Optional[float],
    checkpoint: Optional[Callable[[list[dict], list[str]], Any]] = None,
) -> tuple[list[dict], list[str]]:
    """Run every case (stopping once ``time_budget_s`` is spent), never raising: a case that
    fails as a whole becomes ``error_row``. Prints one progress line a case and hands the rows
    so far to ``checkpoint`` (see :func:`json_checkpoint`) after each. Returns (rows, notes)."""
    start = time.perf_counter()
    rows: list[dict] = []
    notes: list[str] = []
    for i, case in enumerate(cases):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            notes.append(f"time budget {time_budget_s:.0f}s reached after {i} of {len(cases)} cases")
            print(f"  note: {notes[-1]}; stopping")
            break
        t0 = time.perf_counter()
        try:
            case_rows = run_case(case)
        except Exception as exc:  # run_case catches per-method failures; this is the last guard
            traceback.print_exc()
            case_rows = [error_row(case, exc)]
        rows += case_rows
        print(f"  [{i + 1}/{len(cases)}] {describe(case, case_rows)} ({time.perf_counter() - t0:.1f}s)", flush=True)
        if checkpoint is not None:
            checkpoint(rows, notes)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


def probe_triton(device: torch.device, kernel_module: str) -> tuple[bool, str]:
    """(usable, why not): Triton can launch on ``device`` and ``kernel_module`` imports."""
    import importlib

    from lowrank_ops.core import backend

    if not backend.triton_runs_on(device):
        return False, ("Triton not installed, or TRITON_INTERPRET=1 on a CUDA run" if device.type == "cuda"
                       else "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)")
    try:
        importlib.import_module(kernel_module)
    except Exception as exc:
        return False, f"{kernel_module} not importable: {type(exc).__name__}: {exc}"
    return True, ""


def timing_info(device: torch.device, use_graph: bool, target_ms: float, units: str, **extra: Any) -> dict:
    """The ``timing`` block of a suite's JSON: how the numbers were taken."""
    return {
        "primary": "wall" if device.type != "cuda" else ("cuda_graph" if use_graph else "events"),
        "rotate_factor": ROTATE_FACTOR,
        "l2_bytes": cache_bytes(device),
        "target_ms": target_ms,
        **extra,
        "units": units,
    }


# --------------------------------------------------------------------------- the shell of every suite's main()
DEFAULT_TARGET_MS = 25.0  # rough time per timing mode per row


def suite_parser(suite: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """The arguments every suite takes; the caller adds its own (shapes, configs...)."""
    p = argparse.ArgumentParser(prog=f"python -m lowrank_ops.benchmarks.{suite}", description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help=f"{quick_help} (the device check)")
    g.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on CPU, reference backend (+ Triton under TRITON_INTERPRET=1), wall clock: plumbing only")
    g.add_argument("--summarize", metavar="JSON", help="print the per-case summary (and targets) of a results file and exit")
    p.add_argument("--out", metavar="DIR", help=f"write {suite}-<mode>.json into DIR (rewritten after every case)")
    p.add_argument("--methods", help="only these of our methods (baselines always run), e.g. triton,cuda")
    p.add_argument("--no-graph", action="store_true", help="primary time from eager CUDA events, no graph capture")
    p.add_argument("--target-ms", type=float, default=DEFAULT_TARGET_MS, help="rough time per timing mode per row")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="stop starting new cases after S seconds (results so far are kept)")
    return p


def pick_names(text: Optional[str], default: Sequence[str], allowed: Sequence[str], flag: str) -> list[str]:
    """The comma-separated names of ``flag`` (``default`` when not given), each one of ``allowed``."""
    names = [name.strip() for name in text.split(",") if name.strip()] if text else list(default)
    if not names or any(name not in allowed for name in names):
        raise ValueError(f"{flag}: expected names from {list(allowed)}, got {text!r}")
    return names


def methods_filter(args: argparse.Namespace) -> Optional[set[str]]:
    return {m.strip() for m in args.methods.split(",")} if args.methods else None


def suite_main(
    argv: Optional[Sequence[str]],
    suite: str,
    parser: argparse.ArgumentParser,
    format_summary: Callable[[dict], str],
    prepare: Callable[[argparse.Namespace, str], Any],
    run: Callable[[argparse.Namespace, str, torch.device, Any], int],
) -> int:
    """A suite's ``main``: ``--summarize`` prints a saved file; ``prepare(args, mode)`` turns the
    arguments into the suite's plan (a ValueError there is a usage error: exit 2); without CUDA
    and ``--cpu-smoke`` nothing is measured (exit 0); on CPU the run is single-threaded with
    short timing loops; ``run(args, mode, device, plan)`` measures. The caller's torch thread
    count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        args = parser.parse_args(argv)
        if args.summarize:
            print(format_summary(load_json(args.summarize)))
            return 0
        mode = "cpu-smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
        try:
            plan = prepare(args, mode)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if mode != "cpu-smoke" and not torch.cuda.is_available():
            print(f"{suite} benchmarks: no CUDA device (torch.cuda.is_available() is False); nothing measured.\n"
                  "Run on a GPU machine, or pass --cpu-smoke to exercise the plumbing on CPU.")
            return 0
        device = torch.device("cpu") if mode == "cpu-smoke" else torch.device("cuda", torch.cuda.current_device())
        if mode == "cpu-smoke":
            # plumbing only: one thread (CPU matmuls with several threads crawl on a loaded machine)
            torch.set_num_threads(1)
            if args.target_ms == DEFAULT_TARGET_MS:
                args.target_ms = 2.0
        return run(args, mode, device, plan)
    finally:
        torch.set_num_threads(threads)


def run_and_save(
    suite: str,
    mode: str,
    header: Mapping[str, Any],
    t_start: float,
    out_dir: Optional[str],
    cases: Sequence[Any],
    run_case: Callable[[Any], list[dict]],
    error_row: Callable[[Any, BaseException], dict],
    describe: Callable[[Any, list[dict]], str],
    device: torch.device,
    time_budget_s: Optional[float],
    *,
    format_rows: Callable[..., str],
    format_summary: Optional[Callable[[dict], str]] = None,
    legend: str = "x = speedup (baseline time / this)",
) -> dict:
    """:func:`run_cases` with ``<out_dir>/<suite>-<mode>.json`` rewritten after every case, then
    the summary (when the suite has one) and the full table printed; returns the final payload
    (``header`` + elapsed time + notes + rows)."""
    out_path = Path(out_dir) / f"{suite}-{mode}.json" if out_dir else None
    save = json_checkpoint(out_path, header, t_start)
    rows, notes = run_cases(cases, run_case, error_row, describe, device, time_budget_s, checkpoint=save)
    payload = save(rows, notes)
    if out_path is not None:
        print(f"wrote {out_path}")
    if format_summary is not None:
        print()
        print(format_summary(payload))
    meta = header["meta"]
    print()
    print(format_rows(rows, title=f"lowrank_ops {suite} suite [{mode}] on {meta['device']}, {meta['dtype']}; "
                                  f"* = automatic dispatch; {legend}"))
    return payload
