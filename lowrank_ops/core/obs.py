"""Shared pieces of the Optimal-Brain-Surgeon column solvers: GPTQ (quant) and SparseGPT (sparse).

Both walk the weight's input columns in blocks, turning each column's rounding or pruning error
into updates of the later columns through the upper Cholesky factor of ``H⁻¹``, ``H = 2XᵀX/n``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from lowrank_ops.calibration import InputStats


def damped_hessian(stats: InputStats, w: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """``H = 2XᵀX/n`` on ``w``'s device with ``damp·mean(diag H)`` added to the diagonal.

    Dead inputs (never non-zero in the calibration data) get ``H_jj = 1`` and their weights are
    zeroed in ``w`` (in place): they cannot affect the output.
    """
    h = 2 * stats.second_moment().to(device=w.device, dtype=dtype)
    if not float(h.diagonal().max()) > 0:
        raise ValueError("stats: expected calibration inputs with some non-zero channel, got all-zero inputs")
    dead = h.diagonal() <= 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    return h


def inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), damping more if needed.

    With ``J`` the index reversal and ``J H J = L Lᵀ``: ``U = J L⁻¹ J`` (one Cholesky and one
    triangular solve instead of inverting and factorizing again)."""
    scale = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = h.flip(0, 1)
    for extra in (0.0, 1e-3, 1e-2, 1e-1, 1.0):
        low, info = torch.linalg.cholesky_ex(flipped + extra * scale * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
    raise ValueError("stats: the damped Hessian 2·XᵀX/n is not positive definite; the statistics look corrupt")


@contextlib.contextmanager
def few_threads(device: torch.device, work: int) -> Iterator[None]:
    """Run a column loop single-threaded on CPU when each step is small (≤ 2^20 elements):
    there intra-op threads only add synchronisation, and on a busy machine they slow the loop
    down by 10-20× (measured on 2 cores). The caller's thread count is restored afterwards."""
    if device.type != "cpu" or work > 1 << 20 or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
