"""Model-level API: pick linear layers by name, compress them, swap them in, report.

All or nothing: every replacement is built before the first swap, and a failure while
swapping puts back the layers already swapped, so the user's model is either fully
compressed or exactly as it was.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from torch import nn

from lowrank_ops.calibration import InputStats, OutputProbe, collect_input_stats, relative_output_error, relative_weight_error
from lowrank_ops.core.layers import CompressedLinear, linear_nbytes, swap_modules
from lowrank_ops.lowrank.layer import build_lowrank_layers
from lowrank_ops.quant.layer import build_quant_layers
from lowrank_ops.sparse.layer import build_sparse_layers

# family name -> builder(linears, stats, **options) -> {name: new layer or None (kept dense)}
Builder = Callable[..., Mapping[str, CompressedLinear | None]]
METHODS: dict[str, Builder] = {"lowrank": build_lowrank_layers, "quant": build_quant_layers, "nm": build_sparse_layers}


PROBE_BATCHES = 4  # calibration batches replayed to measure each layer's end-to-end sensitivity


def _keeping(items: Iterable[Any], kept: list[Any], limit: int) -> Iterator[Any]:
    """Yield ``items`` unchanged, appending the first ``limit`` of them to ``kept``."""
    for i, item in enumerate(items):
        if i < limit:
            kept.append(item)
        yield item


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    format: str  # the new layer's format, or "dense" when it was kept
    setting: str  # e.g. "rank 96"
    bytes_before: int
    bytes_after: int
    weight_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    calib_error: float | None  # relative output error on the calibration inputs


@dataclass
class CompressionReport:
    kind: str  # the family: "lowrank", "quant", ...
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def compression(self) -> float:
        """bytes before / bytes after over the selected layers."""
        return self.bytes_before / max(self.bytes_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "layers": [asdict(r) for r in self.layers],
        }

    def __str__(self) -> str:
        header = f"{'layer':<44} {'shape':>11} {'format':>8} {'setting':>10} {'KiB before':>11} {'KiB after':>10} {'W err':>7} {'calib err':>9}"
        lines = [header, "-" * len(header)]
        for r in self.layers:
            calib = "-" if r.calib_error is None else f"{r.calib_error:.4f}"
            lines.append(
                f"{r.name[-44:]:<44} {r.shape[0]:>5}x{r.shape[1]:<5} {r.format:>8} {r.setting:>10} "
                f"{r.bytes_before / 1024:>11.1f} {r.bytes_after / 1024:>10.1f} {r.weight_error:>7.4f} {calib:>9}"
            )
        lines.append(
            f"total: {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.compression:.2f}x smaller) over {len(self.layers)} linear layers"
        )
        return "\n".join(lines)


def select_linears(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` submodules whose names match ``include`` and not ``exclude`` (glob patterns)."""
    for arg_name, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"{arg_name}: expected a list of glob patterns (str), got {patterns!r}")
    chosen = {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and (include is None or any(fnmatch.fnmatchcase(name, p) for p in include))
        and not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))
    }
    if not chosen:
        raise ValueError(f"include/exclude: no nn.Linear layer of the model matches include={include!r}, exclude={exclude!r}")
    return chosen


def _layer_report(name: str, linear: nn.Linear, new: CompressedLinear | None, stats: InputStats | None) -> LayerReport:
    weight = linear.weight.detach()
    shape = (linear.out_features, linear.in_features)
    before = linear_nbytes(linear)
    if new is None:
        return LayerReport(name, shape, "dense", "kept", before, before, 0.0, None if stats is None else 0.0)
    approx = new.dense_weight().detach()
    calib = None if stats is None else relative_output_error(weight, approx, stats)
    return LayerReport(name, shape, new.FORMAT, new.setting(), before, new.nbytes, relative_weight_error(weight, approx), calib)


def compress(
    model: nn.Module,
    kind: str = "lowrank",
    /,
    *,
    calib_data: Iterable[Any] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> CompressionReport:
    """Compress ``model``'s linear layers in place with the family ``kind`` and return a report.

    ``calib_data`` is an iterable of model inputs (a dict is passed as keyword arguments, a
    tuple as positional ones, anything else as the one argument); with it, calibration-aware
    algorithms are used. ``options`` go to the family's builder, for ``"lowrank"``: ``rank``, ``ratio``,
    ``energy``, ``allocation`` ("uniform" or "global") and ``whiten``; for ``"quant"``: ``bits``,
    ``group_size``, ``outliers``, ``method``, ``lut``, ``quantize_stats``, ``lowrank_rank``, ``act_order`` and
    ``recipes`` (glob pattern of layer names -> option overrides); for ``"nm"``: ``n``, ``m``,
    ``method`` ("auto", "magnitude", "wanda", "sparsegpt"), ``quantize_values``, ``group_size``,
    ``lowrank_rank``, ``trainable`` and ``recipes``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if kind not in METHODS:
        raise ValueError(f"kind: expected one of {sorted(METHODS)}, got {kind!r}")
    linears = select_linears(model, include, exclude)
    stats, probe = None, None
    if calib_data is not None:
        kept: list[Any] = []  # the first few batches, for measuring layer sensitivity
        stats = collect_input_stats(model, _keeping(calib_data, kept, PROBE_BATCHES), list(linears), progress=progress)
        probe = OutputProbe(model, kept)
    built = METHODS[kind](linears, stats, probe=probe, progress=progress, **options)
    report = CompressionReport(kind, [
        _layer_report(name, linears[name], built[name], None if stats is None else stats[name]) for name in linears
    ])
    swap_modules(model, {name: layer for name, layer in built.items() if layer is not None})
    return report
