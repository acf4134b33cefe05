"""What every compressed drop-in for ``nn.Linear`` provides to model.py and io.py."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn


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
