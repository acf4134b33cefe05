"""Interpreter lane: GEAR's low-rank fit kernel (kernels/kvcache_lowrank.py) against
``compress.lowrank_basis`` on the torch path (Gram-Schmidt twice per column, float32).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest.py when there is no GPU), or
on a CUDA device (where the kernel's dots are "tf32x3": agreement to about 1e-5). The output is
poisoned first. Blocks: the default (64 × 128, rank 4), odd sizes (48 × 80: padded rows and
channels), rank 16, a shared start and one start per block, one to three iterations, and
rank-deficient and zero blocks (whose dependent columns both paths make zero).
"""
import pytest
import torch

pytest.importorskip("triton")

from kernel_lane import DEVICE, MARKS, poison_allocations  # noqa: E402

pytestmark = MARKS

from lowrank_ops.core.backend import use_backend  # noqa: E402
from lowrank_ops.kernels import kvcache_lowrank as kernels  # noqa: E402
from lowrank_ops.kvcache import GEARConfig, compress  # noqa: E402
from lowrank_ops.kvcache.compress import DEPENDENT, _fit_backend, _start_basis, lowrank_basis  # noqa: E402

TOL = 2e-5


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    return poison_allocations(monkeypatch, kernels)


def blocks(n, block, head_dim, seed):
    """Blocks with channel offsets and spreads, as keys and values have (float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, block, head_dim, generator=gen) * (0.2 + 3 * torch.rand(head_dim, generator=gen))
    return (x + torch.randn(head_dim, generator=gen)).to(DEVICE)


def torch_basis(x, rank, iters, start):
    with use_backend("reference"):
        return lowrank_basis(x, rank, iters, start)


@pytest.mark.parametrize("n, block, head_dim, rank, iters, per_block_start", [
    (3, 64, 128, 4, 2, False),  # the default joint fit's first basis
    (3, 64, 128, 4, 1, True),  # its refit, from the first basis
    (2, 48, 80, 3, 2, False),  # padded rows and channels
    (2, 16, 64, 8, 3, True),
    (2, 128, 64, 16, 1, False),  # the most rank columns
])
def test_kernel_matches_the_torch_basis(n, block, head_dim, rank, iters, per_block_start, poisoned):
    x = blocks(n, block, head_dim, seed=block + rank)
    start = torch.randn(n, head_dim, rank, device=DEVICE) if per_block_start else _start_basis(head_dim, rank, x.device)
    got = kernels.subspace_basis(x, rank, iters, start)
    assert poisoned == [(n, head_dim, rank)]
    want = torch_basis(x, rank, iters, start)
    assert (got - want).abs().max().item() < TOL
    eye = torch.eye(rank, device=DEVICE)
    assert (got.transpose(-1, -2) @ got - eye).abs().max().item() < TOL


def test_an_ill_conditioned_block_keeps_an_orthonormal_basis():
    """Singular values 1, 1e-3, 1e-4, 3e-5: the start's columns all lean on the first direction
    (one Gram-Schmidt pass leaves the basis 1e-5 from orthonormal, two 4e-7); the rank-4 data is
    captured whole."""
    gen = torch.Generator().manual_seed(9)
    u = torch.linalg.qr(torch.randn(64, 4, generator=gen)).Q
    w = torch.linalg.qr(torch.randn(128, 4, generator=gen)).Q
    x = (u * torch.tensor([1.0, 1e-3, 1e-4, 3e-5])) @ w.T
    x = x[None].to(DEVICE)
    start = _start_basis(128, 4, x.device)
    for v in (kernels.subspace_basis(x, 4, 1, start), torch_basis(x, 4, 1, start)):
        assert (v[0].T @ v[0] - torch.eye(4, device=DEVICE)).abs().max().item() < 3e-6
        assert ((x[0] - x[0] @ v[0] @ v[0].T).norm() / x[0].norm()).item() < 1e-5


def test_dependent_and_zero_blocks_give_zero_columns():
    x = torch.zeros(3, 64, 128, device=DEVICE)
    x[1, :, :2] = torch.randn(64, 2, device=DEVICE)  # rank 2
    x[2] = torch.randn(64, 128, device=DEVICE)
    start = _start_basis(128, 4, x.device)
    got = kernels.subspace_basis(x, 4, 2, start)
    assert (got - torch_basis(x, 4, 2, start)).abs().max().item() < TOL
    norms = got.norm(dim=-2)
    assert norms[0].abs().max() == 0 and norms[1, 2:].abs().max() == 0
    assert torch.allclose(norms[1, :2], torch.ones(2, device=DEVICE))
    assert torch.allclose(norms[2], torch.ones(4, device=DEVICE))


def test_compress_takes_the_kernel_when_triton_is_pinned(monkeypatch):
    calls = []
    real = kernels.subspace_basis
    monkeypatch.setattr(kernels, "subspace_basis", lambda *a: calls.append(a[1:3]) or real(*a))
    keys, values = (blocks(2, 64, 64, seed=s).reshape(1, 2, 64, 64).half() for s in (1, 2))
    cfg = GEARConfig(bits=2, rank=4, group_size=32)
    with use_backend("triton"):
        kv = compress(keys, values, cfg)
    assert calls == [(4, 2), (4, 2), (4, 1), (4, 1)]  # joint fit: data bases, then refits, keys and values
    with use_backend("reference"):
        ref = compress(keys, values, cfg)
    for a, b in zip(kv.decompress(torch.float32), ref.decompress(torch.float32)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)


def test_blocks_beyond_one_program_stay_in_torch():
    assert kernels.misfit(64, 128, 4) == kernels.misfit(128, 64, 16) == ""
    assert "rank 17" in kernels.misfit(64, 128, 17) and "(128 x 128)" in kernels.misfit(128, 128, 4)
    x = torch.zeros(1, 128, 128, device=DEVICE)
    with pytest.raises(ValueError, match="exceeds one program"):
        kernels.subspace_basis(x, 4, 1, _start_basis(128, 4, x.device))
    with use_backend("triton"), pytest.raises(ValueError, match="exceeds one program"):
        lowrank_basis(x, 4, 1)
    assert _fit_backend(x, 4) == "reference"  # automatic: torch on CPU, and for a block too large on a GPU


def test_constants_agree_and_compile_cases_are_listed():
    assert kernels.DEPENDENT.value == DEPENDENT
    names = [case.name for case in kernels.COMPILE_CASES]
    assert len(names) == len(set(names)) == 3


# --------------------------------------------------------------------------- gpu lane
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_fit_at_decode_shapes(batch):
    """Compiled (tf32x3 dots) at one block of 8 kv heads, head_dim 128: the torch path's basis to
    about 1e-5, orthonormal; then compress() on CUDA, whose fit runs here automatically."""
    x = torch.randn(batch * 8, 64, 128, device="cuda") * (0.2 + 3 * torch.rand(128, device="cuda"))
    start = _start_basis(128, 4, x.device)
    got = kernels.subspace_basis(x, 4, 2, start)
    assert (got - torch_basis(x, 4, 2, start)).abs().max().item() < 1e-4
    assert (got.transpose(-1, -2) @ got - torch.eye(4, device="cuda")).abs().max().item() < 1e-5
    assert _fit_backend(x, 4) == "triton"
