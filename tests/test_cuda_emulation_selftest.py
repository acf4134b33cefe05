"""Emulation lane, the emulator itself: the primitives every emulated CUDA kernel relies on, each
through a unit kernel of csrc/emulate/selftest.cu, against the PTX semantics written out here in
torch: the m16n8k16 mma (top 8 rows and all 16), movmatrix .trans and ldmatrix .x4 .trans fragment
layouts, shuffles and votes, a block barrier, cp.async groups landing at the wait that retires them
(or at issue), and a divergent warp failing the launch by name."""
from __future__ import annotations

import pytest
import torch

from emulation_lane import MARKS
from lowrank_ops.core import cuda_emulation

pytestmark = MARKS


@pytest.fixture(scope="module")
def selftest():
    return cuda_emulation.load("_selftest")


@pytest.mark.parametrize("rows", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_fragments_multiply_as_ptx_lays_them_out(selftest, dtype, rows):
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 8).to(dtype)
    c = torch.randn(rows, 8)
    out = c.clone()
    bf16 = dtype == torch.bfloat16
    selftest.mma(a.view(torch.int16).data_ptr(), b.view(torch.int16).data_ptr(), out.data_ptr(), bf16, rows)
    expected = c.double() + a[:rows].double() @ b.double()  # rows 8: the top-rows wrappers keep A's top half
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_movmatrix_trans_hands_each_lane_the_transposed_pair(selftest):
    m = torch.randint(0, 1 << 15, (8, 8), dtype=torch.int16)
    out = torch.zeros(32, dtype=torch.int32)
    selftest.movmatrix(m.data_ptr(), out.data_ptr())
    got = out.view(torch.int16).view(32, 2)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert got[lane, 0] == m[2 * t, g] and got[lane, 1] == m[2 * t + 1, g]


def test_ldmatrix_x4_trans_hands_each_lane_its_transposed_pairs(selftest):
    mats = torch.randint(0, 1 << 15, (32, 8), dtype=torch.int16)  # four 8 x 8 matrices, row 8i + r of matrix i
    out = torch.zeros(32, 4, dtype=torch.int32)
    selftest.ldmatrix(mats.data_ptr(), out.data_ptr())
    got = out.view(torch.int16).view(32, 4, 2)  # (lane, matrix, half)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            assert got[lane, i, 0] == mats[8 * i + 2 * t, g] and got[lane, i, 1] == mats[8 * i + 2 * t + 1, g]


def test_shuffle_and_vote(selftest):
    out = torch.zeros(96, dtype=torch.int32)
    selftest.shuffle_vote(out.data_ptr())
    lanes = torch.arange(32, dtype=torch.int32)
    assert torch.equal(out[:32], (lanes ^ 5) * 10)
    assert torch.equal(out[32:64], torch.ones(32, dtype=torch.int32))
    assert torch.equal(out[64:], torch.zeros(32, dtype=torch.int32))


def test_block_barrier_orders_two_warps(selftest):
    for order in ("forward", "reverse"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cuda_emulation.ORDER_ENV, order)
            out = torch.zeros(32, dtype=torch.int32)
            selftest.barrier(out.data_ptr())
        assert torch.equal(out, 3 * torch.arange(32, dtype=torch.int32) + 1), order


@pytest.mark.parametrize("copies", ["wait", "issue"])
def test_cp_async_groups_land_when_their_wait_retires_them(selftest, monkeypatch, copies):
    monkeypatch.setenv(cuda_emulation.COPIES_ENV, copies)
    src = torch.randint(1, 1 << 30, (2, 32, 4), dtype=torch.int32)  # two groups, 16 bytes per lane
    out = torch.zeros(3, 2, 32, 4, dtype=torch.int32)  # snapshot, group, lane (its right neighbour's), word
    selftest.copy(src.data_ptr(), out.data_ptr())
    neighbour = src.roll(-1, dims=1)
    zeros = torch.zeros_like(neighbour[0])
    if copies == "wait":  # deferred: nothing before a wait, the oldest group after wait_group<1>, all after <0>
        expected = [(zeros, zeros), (neighbour[0], zeros), (neighbour[0], neighbour[1])]
    else:  # at issue: everything is there at once
        expected = [(neighbour[0], neighbour[1])] * 3
    for k, (first, second) in enumerate(expected):
        assert torch.equal(out[k, 0], first) and torch.equal(out[k, 1], second), f"snapshot {k}"


def test_divergent_warp_fails_the_launch_by_name(selftest):
    out = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="warp divergence"):
        selftest.divergent(out.data_ptr())
