"""The low-rank format: W ≈ U V with U (N, r) and V (r, K), both in the layer's dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_ops.core.checks import check_dim, check_same, check_tensor


@dataclass
class LowRankFormat:
    """Factors of one (out_features × in_features) weight. Bytes are exactly the two factors."""

    u: Tensor  # (N, r)
    v: Tensor  # (r, K)

    NAME = "lowrank"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_tensor("u", self.u, ndim=2)
        check_tensor("v", self.v, ndim=2)
        check_same("v", self.v, "u", self.u)
        check_dim("v", self.v, 0, self.u.shape[1], "rank = u.shape[1]")

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    @property
    def in_features(self) -> int:
        return self.v.shape[1]

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    @property
    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.v.numel() * self.v.element_size()

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per entry of the dense weight it stands for."""
        return 8.0 * self.nbytes / (self.out_features * self.in_features)

    def dense(self) -> Tensor:
        """The (N, K) weight these factors represent, in float32."""
        return self.u.float() @ self.v.float()


def dense_nbytes(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of an uncompressed (N, K) weight in ``dtype``."""
    return out_features * in_features * torch.empty((), dtype=dtype).element_size()
