"""Per-layer input statistics gathered from the user's calibration batches.

Family-neutral: low-rank whitening reads the second moment ``XᵀX / n``, Wanda-style pruning
reads the channel norms, GPTQ-style quantization reads the same ``XᵀX``. Only the ``K × K``
sum and a row count are kept, never the activations themselves.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowrank_ops.core.checks import FLOAT_DTYPES, check_dim, check_finite, check_int, check_tensor
from lowrank_ops.core.layers import swap_modules

_INPUT_DTYPES = FLOAT_DTYPES + (torch.float64,)


@dataclass
class InputStats:
    """Running ``XᵀX`` (float64, ``K × K``) and row count of one linear layer's inputs.

    ``in_features`` is inferred from the first batch when left ``None``; ``xtx`` lives on the
    device of the first batch. ``name`` only labels error messages.
    """

    in_features: int | None = None
    name: str | None = None
    xtx: Tensor | None = field(default=None, repr=False)
    count: int = 0

    def __post_init__(self) -> None:
        if self.in_features is not None:
            check_int("in_features", self.in_features, low=1)

    def update(self, x: Tensor) -> None:
        """Add the rows of ``x`` (shape ``(..., K)``, any float dtype and device).

        Each batch's product is formed in float32 (fast everywhere; on a GPU it runs as TF32 if
        the user enabled ``torch.backends.cuda.matmul.allow_tf32``) and accumulated in float64.
        """
        label = "x" if self.name is None else f"x (input of layer {self.name!r})"
        check_tensor(label, x, dtypes=_INPUT_DTYPES)
        if x.dim() == 0:
            raise ValueError(f"{label}: expected at least 1 dimension (..., K), got a scalar")
        if self.in_features is None:
            self.in_features = check_int("in_features", x.shape[-1], low=1)
        check_dim(label, x, -1, self.in_features, "in_features")
        check_finite(label, x)
        rows = x.reshape(-1, self.in_features)
        rows = rows.to(torch.float32)
        prod = (rows.T @ rows).to(torch.float64)
        if self.xtx is None:
            self.xtx = torch.zeros_like(prod)
        self.xtx += prod.to(self.xtx.device)
        self.count += rows.shape[0]

    def _require_data(self) -> Tensor:
        if self.xtx is None or self.count == 0:
            label = "stats" if self.name is None else f"stats of layer {self.name!r}"
            raise ValueError(f"{label}: expected at least one input row, got none (update() never saw data)")
        return self.xtx

    def second_moment(self) -> Tensor:
        """``XᵀX / n`` (float64, ``K × K``)."""
        return self._require_data() / self.count

    def channel_norms(self) -> Tensor:
        """``‖X[:, j]‖₂`` per input channel (float64, ``K``)."""
        return self._require_data().diagonal().sqrt()


def check_input_stats(stats: object, in_features: int) -> InputStats:
    """``stats`` is an :class:`InputStats` with data, collected for ``in_features`` inputs."""
    if not isinstance(stats, InputStats):
        raise TypeError(f"stats: expected an InputStats, got {type(stats).__name__}")
    if stats.count == 0 or stats.xtx is None:
        raise ValueError("stats: expected statistics of at least one input row, got an empty InputStats")
    if stats.in_features != in_features:
        raise ValueError(f"stats: expected statistics of {in_features} input features (weight's K), got {stats.in_features}")
    return stats


def as_input_stats(calib: InputStats | Tensor | None, in_features: int) -> InputStats | None:
    """Calibration given as collected statistics or as a tensor of sample inputs (..., K)."""
    if calib is None or isinstance(calib, InputStats):
        return calib
    if isinstance(calib, Tensor):
        stats = InputStats(in_features, name="calib")
        stats.update(calib)
        return stats
    raise TypeError(f"calib: expected InputStats, a Tensor of inputs (..., {in_features}) or None, got {type(calib).__name__}")


def _run(model: nn.Module, item: Any) -> Any:
    """Call ``model`` on one calibration item: dict → kwargs, tuple/list → args, else one arg."""
    if isinstance(item, dict):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without grad; every module's train/eval flag restored afterwards, even on error."""
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for mod, training in modes.items():
            mod.training = training


def collect_input_stats(
    model: nn.Module,
    calib_data: Iterable,
    layer_names: Sequence[str],
    *,
    progress: bool = False,
) -> dict[str, InputStats]:
    """Run ``model`` (in eval mode, without grad) on every item of ``calib_data`` and return the
    input statistics of each submodule named in ``layer_names``.

    Items are passed as keyword arguments (dict), positional arguments (tuple/list) or as the
    single argument. Hooks are removed and every module's train/eval flag restored even when a
    batch fails; parameters are never touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise TypeError(f"layer_names: expected a sequence of submodule names, got {type(layer_names).__name__}")
    if len(layer_names) == 0:
        raise ValueError("layer_names: expected at least one submodule name, got none")
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(f"layer_names: expected distinct names, got duplicates in {list(layer_names)}")
    modules: dict[str, nn.Module] = {}
    for name in layer_names:
        if not isinstance(name, str):
            raise TypeError(f"layer_names: expected str entries, got {type(name).__name__}")
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer_names: expected names of submodules of model, got {name!r} (no such submodule)") from None

    stats = {name: InputStats(getattr(mod, "in_features", None), name) for name, mod in modules.items()}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if x is None:
                raise ValueError(f"layer_names: layer {name!r} was called without a tensor input")
            stats[name].update(x)

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, mod in modules.items()]
    batches = 0
    try:
        with _inference(model):
            for item in tqdm(calib_data, desc="calibration", disable=not progress):
                _run(model, item)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise ValueError("calib_data: expected at least one batch, got none")
    return stats


def _float_tensors(output: Any) -> list[Tensor]:
    """The floating-point tensors in a model output (a tensor, a tuple/list or a dict-like of them)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):  # also transformers' ModelOutput
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _float_tensors(item)]
    return []


class OutputProbe:
    """How far the model's outputs move when one submodule is swapped for another.

    Built on a few calibration batches: their outputs with the model as it is are kept, and
    ``probe(name, module)`` runs them again with ``module`` in place of submodule ``name``
    (put back afterwards, also on error) and returns ``Σ‖out − ref‖² / Σ‖ref‖²`` over every
    floating-point output tensor. Measures a layer's end-to-end sensitivity to compression.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any]) -> None:
        if len(batches) == 0:
            raise ValueError("batches: expected at least one calibration batch, got none")
        self.model, self.batches = model, list(batches)
        with _inference(model):
            self.reference = [[t.double() for t in _float_tensors(_run(model, b))] for b in self.batches]
        self.scale = sum(float(t.square().sum()) for ref in self.reference for t in ref)

    def __call__(self, name: str, module: nn.Module) -> float:
        original = self.model.get_submodule(name)
        swap_modules(self.model, {name: module})
        try:
            with _inference(self.model):
                moved = sum(
                    float((t.double() - r).square().sum())
                    for batch, ref in zip(self.batches, self.reference)
                    for t, r in zip(_float_tensors(_run(self.model, batch)), ref)
                )
        finally:
            swap_modules(self.model, {name: original})
        return moved / max(self.scale, 1e-300)


def _relative(num: float, den: float) -> float:
    if den > 0:
        return math.sqrt(max(num, 0.0) / den)
    return 0.0 if num <= 0 else math.inf


def relative_weight_error(weight: Tensor, approx: Tensor) -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` in float64."""
    w = weight.to(torch.float64)
    e = w - approx.to(w)
    return _relative(float(e.square().sum()), float(w.square().sum()))


def relative_output_error(weight: Tensor, approx: Tensor, stats: InputStats) -> float:
    """Relative output error on the calibration inputs, ``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F``, computed
    from their second moment ``C`` as ``sqrt(tr(E C Eᵀ) / tr(W C Wᵀ))`` (X itself is never kept)."""
    w = weight.to(torch.float64)
    c = stats.second_moment().to(w)
    e = w - approx.to(w)
    return _relative(float(((e @ c) * e).sum()), float(((w @ c) * w).sum()))
