"""What every compressed drop-in for ``nn.Linear`` provides to model.py and io.py."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


class CompressedLinear(nn.Module):
    """Base class of the drop-in layers.

    A subclass sets ``FORMAT`` (the name saved in checkpoints), keeps ``in_features`` /
    ``out_features`` / ``bias`` like ``nn.Linear``, and implements :meth:`config`,
    :meth:`from_config`, :meth:`dense_weight` and :attr:`weight_nbytes`.
    """

    FORMAT: ClassVar[str]
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def config(self) -> dict[str, Any]:
        """JSON-able settings that rebuild an empty layer of this shape (see :meth:`from_config`)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str | None = None) -> "CompressedLinear":
        """An uninitialised layer with the shapes ``config`` describes; load a state dict into it."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the activations in and out."""
        raise NotImplementedError

    def setting(self) -> str:
        """A few words for reports, e.g. ``"rank 96"``."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The (out_features, in_features) weight this layer computes with, in float32."""
        raise NotImplementedError

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight representation (every factor, scale, index...)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """All bytes of the layer: weight representation plus bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_nbytes + bias

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes / (self.in_features * self.out_features)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class PackedFormatLinear(CompressedLinear):
    """A drop-in whose weight is one packed format object (``format``, with ``nbytes`` and
    ``dense()``) computed in the dtype kept in ``_dtype``.

    The buffers named in ``PACKED_BUFFERS`` are the format itself (codes, indices, fp16 scales,
    tables, outlier values): ``.to(device)``, ``.cuda()`` move them, but ``.to(dtype)``,
    ``.half()``, ``.float()`` never cast them (an fp16 scale cast to bfloat16 would lose bits,
    and the kernels read the format's dtypes). The compute dtype follows those calls: the
    floating parameters (low-rank factors, bias) and unpacked values are cast as in any module.
    """

    PACKED_BUFFERS: ClassVar[tuple[str, ...]] = ()
    _dtype: torch.dtype

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "PackedFormatLinear":
        packed = {name: self._buffers[name] for name in self.PACKED_BUFFERS if self._buffers.get(name) is not None}
        for name in packed:
            self._buffers[name] = None  # out of the generic pass
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(packed)
            raise
        for name, buf in packed.items():
            if buf.is_floating_point():  # through fn as integers of its size: moved, never cast
                self._buffers[name] = fn(buf.view(_SAME_SIZE_INT[buf.element_size()])).view(buf.dtype)
            else:
                self._buffers[name] = fn(buf)
        self._dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        return self

    @property
    def format(self) -> Any:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def weight_nbytes(self) -> int:
        return self.format.nbytes

    def dense_weight(self) -> Tensor:
        return self.format.dense()


def linear_nbytes(linear: nn.Linear) -> int:
    """All bytes of a dense ``nn.Linear``: weight plus bias."""
    return sum(p.numel() * p.element_size() for p in (linear.weight, linear.bias) if p is not None)


def swap_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
    """Put each replacement at its dotted name in ``model``.

    All or nothing: on any failure the modules already swapped are put back, then the error
    is re-raised.
    """
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, new in replacements.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    except BaseException:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


def build_per_layer(
    from_linear: Callable[..., CompressedLinear],
    linears: Mapping[str, nn.Linear],
    stats: Mapping[str, Any] | None,
    recipes: Mapping[str, Mapping[str, Any]] | None,
    options: Mapping[str, Any],
    *,
    desc: str,
    progress: bool = False,
) -> dict[str, CompressedLinear]:
    """``from_linear(linear, calib=stats[name], **options)`` for every named linear, with
    ``recipes`` (glob pattern of layer names -> option overrides, first match wins) applied.

    The builder of a family whose settings are per layer. Nothing is swapped here; an error in
    any layer raises, naming it, before the model changes.
    """
    if recipes is not None and not isinstance(recipes, Mapping):
        raise TypeError(f"recipes: expected a mapping of glob pattern -> options, got {type(recipes).__name__}")
    layers: dict[str, CompressedLinear] = {}
    for name, linear in tqdm(linears.items(), desc=desc, disable=not progress, leave=False):
        override = next((dict(o) for p, o in (recipes or {}).items() if fnmatch.fnmatchcase(name, p)), {})
        try:
            layers[name] = from_linear(linear, calib=None if stats is None else stats[name], **{**options, **override})
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {name!r}: {err}") from err
    return layers
