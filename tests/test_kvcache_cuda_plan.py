"""CPU checks of the CUDA GEAR kernel's Python side (lowrank_ops/kvcache/cuda_decode.py): what it
serves and says it does not, how it splits the sequence. The kernel itself runs in the gpu lane
(tests/test_gpu_kvcache_cuda.py) and compiles in the compile lane (tests/test_csrc_build.py)."""
from __future__ import annotations

import pytest
import torch

from lowrank_ops.kvcache import GEARConfig, compress
from lowrank_ops.kvcache import cuda_decode
from lowrank_ops.kvcache.ops import _attention_backend

F16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(dtype=torch.float32), "takes float16 or bfloat16"),
    (dict(cache_dtype=BF16), "needs one dtype"),
    (dict(bits=3), "bits=3"),
    (dict(head_dim=96), "head_dim=96"),
    (dict(rank=2), "rank=2"),
    (dict(head_dim=64, group_size=128), "group_size=128 > head_dim=64"),
    (dict(n_out=9), "9 outliers per vector"),
    (dict(factor_bits=4), "factor_bits=4"),
])
def test_config_support_names_what_it_refuses(kwargs, fragment):
    args = dict(dtype=F16, cache_dtype=F16, bits=2, head_dim=128, rank=4, group_size=32, n_out=3)
    args.update(kwargs)
    if "dtype" in kwargs and "cache_dtype" not in kwargs:
        args["cache_dtype"] = args["dtype"]
    verdict = cuda_decode.config_support(**args)
    assert not verdict.ok and fragment in verdict.why


@pytest.mark.parametrize("bits,head_dim,rank,group", [(2, 128, 4, 32), (4, 64, 0, 64), (2, 128, 8, 128), (4, 128, 4, 16)])
def test_config_support_accepts_the_served_formats(bits, head_dim, rank, group):
    for dtype in (F16, BF16):
        assert cuda_decode.config_support(dtype, dtype, bits, head_dim, rank, group).ok
        assert cuda_decode.config_support(dtype, dtype, bits, head_dim, rank, group, factor_bits=8).ok


def test_cpu_tensors_are_not_served_and_auto_picks_reference():
    kv = compress(torch.randn(1, 2, 70, 64, dtype=F16), torch.randn(1, 2, 70, 64, dtype=F16), GEARConfig(rank=4))
    q = torch.randn(1, 4, 1, 64, dtype=F16)
    verdict = cuda_decode.supports(q, kv)
    assert not verdict.ok and "needs a CUDA tensor" in verdict.why
    assert _attention_backend(q, kv) == "reference"
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        cuda_decode.gear_decode(q, kv, None, 0.125)


def test_a_causal_chunk_is_not_served_and_says_why():
    """Several causal query tokens go to Triton (refused before the device check, so this holds
    on any machine); one query token under causal is a plain decode step."""
    kv = compress(torch.randn(1, 2, 70, 64, dtype=F16), torch.randn(1, 2, 70, 64, dtype=F16), GEARConfig(rank=4))
    verdict = cuda_decode.supports(torch.randn(1, 4, 3, 64, dtype=F16), kv, causal=True)
    assert not verdict.ok and "causal attention of 3 query tokens" in verdict.why
    one = cuda_decode.supports(torch.randn(1, 4, 1, 64, dtype=F16), kv, causal=True)
    assert "causal" not in one.why


@pytest.mark.parametrize("per_sm", [None, 1, 3, 4])
@pytest.mark.parametrize("steps,columns,sms", [(512, 8, 132), (512, 128, 132), (3, 8, 132), (1, 1, 132),
                                                (2049, 1, 132), (10, 4096, 132), (100000, 1, 132)])
def test_split_plan_covers_every_step_without_an_empty_split(steps, columns, sms, per_sm):
    if per_sm is None:
        splits, per_split = cuda_decode.split_plan(steps, columns, sms)
        per_sm = cuda_decode.CTAS_PER_SM
    else:
        splits, per_split = cuda_decode.split_plan(steps, columns, sms, ctas_per_sm=per_sm)
    assert 1 <= splits <= cuda_decode.MAX_SPLITS and per_split >= 1
    assert (splits - 1) * per_split < steps <= splits * per_split  # every split has work, all steps covered
    # about per_sm CTAs per SM when there are enough steps (rounding to whole steps loses < half)
    target = min(-(-per_sm * sms // columns), -(-steps // cuda_decode.WARPS_PER_SPLIT), cuda_decode.MAX_SPLITS)
    assert 2 * splits >= target and splits <= target


def test_launch_geometry_counts_steps_and_ctas_per_split():
    kv = compress(torch.randn(3, 2, 200, 64, dtype=F16), torch.randn(3, 2, 200, 64, dtype=F16), GEARConfig(rank=4))
    q = torch.randn(3, 2 * 9, 1, 64, dtype=F16)  # 9 q rows per kv head: two row blocks of 8
    steps, columns = cuda_decode.launch_geometry(q, kv)
    assert steps == kv.compressed_len // 16 + -(-kv.tail_len // 16) and kv.seq_len == 200
    assert columns == 3 * 2 * 2


def test_automatic_dispatch_prefers_the_cuda_kernel_only_for_small_eager_calls():
    from types import SimpleNamespace

    fp16 = SimpleNamespace(rank=4, factor_bits=16)
    small = SimpleNamespace(batch=1, kv_heads=8, seq_len=32768, config=fp16)   # 262K head-tokens: measured faster eager
    large = SimpleNamespace(batch=16, kv_heads=8, seq_len=8192, config=fp16)   # 1M: measured slower
    assert cuda_decode.preferred(small)
    assert not cuda_decode.preferred(large)
    # int8 factors stay on Triton until the CUDA int8 path has run on a GPU; without factors they do not matter
    assert not cuda_decode.preferred(SimpleNamespace(**{**vars(small), "config": SimpleNamespace(rank=4, factor_bits=8)}))
    assert cuda_decode.preferred(SimpleNamespace(**{**vars(small), "config": SimpleNamespace(rank=0, factor_bits=8)}))
    assert cuda_decode.EAGER_MAX_WORK == 1 << 19


def test_an_extension_built_without_the_kernel_is_refused_by_name(monkeypatch):
    """An older lowrank_ops._C (no gear_decode) must not be dispatched to: it would fail mid-call."""
    from types import SimpleNamespace

    from lowrank_ops.core import cuda_ext

    kv = compress(torch.randn(1, 2, 70, 64, dtype=F16), torch.randn(1, 2, 70, 64, dtype=F16),
                  GEARConfig(rank=4, factor_bits=16))
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=F16)
    monkeypatch.setattr(cuda_decode, "Tensor", SimpleNamespace)  # q passes the tensor check on a CPU machine
    monkeypatch.setattr(cuda_ext, "available", lambda: True)
    monkeypatch.setattr(cuda_ext, "load", lambda: SimpleNamespace(lowrank_decode=None))
    verdict = cuda_decode.supports(q, kv)
    assert not verdict.ok and "without gear_decode" in verdict.why
    monkeypatch.setattr(cuda_ext, "load", lambda: SimpleNamespace(gear_decode=None))
    assert cuda_decode.supports(q, kv).ok
    int8 = compress(torch.randn(1, 2, 70, 64, dtype=F16), torch.randn(1, 2, 70, 64, dtype=F16), GEARConfig(rank=4))
    verdict = cuda_decode.supports(q, int8)
    assert verdict.ok and not verdict.preferred and verdict.why == cuda_decode.INT8_NOT_PREFERRED
