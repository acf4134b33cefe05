"""Reference lane: the CUDA decode wrapper's verdicts and input checks, on CPU tensors (no GPU).

Also: importing lowrank_ops never imports lowrank_ops._C or initialises CUDA, and a ``_C``
that exists but fails to load gives a warning, not an exception.
"""
import importlib.machinery
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank_ops.core import cuda_ext
from lowrank_ops.core.backend import Support, use_backend
from lowrank_ops.lowrank import cuda_decode
from lowrank_ops.lowrank.cuda_decode import CUDA_DECODE_MAX_M, CUDA_DECODE_MAX_RANK

HALF = torch.float16


def _inputs(m=2, k=24, n=40, r=8, dtype=HALF, bias=True):
    x = torch.randn(m, k, dtype=dtype)
    v = torch.randn(r, k, dtype=dtype)
    u = torch.randn(n, r, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, v, u, b


# --------------------------------------------------------------------------- supports()
def test_supports_cpu_tensor_is_refused_with_reason():
    verdict = cuda_decode.supports(torch.randn(1, 64, dtype=HALF), 16)
    assert isinstance(verdict, Support) and not verdict.ok
    assert "CUDA tensor" in verdict.why and "cpu" in verdict.why


def test_supports_never_raises_and_is_cheap_on_cpu(monkeypatch):
    def boom():
        raise AssertionError("supports() must not look for the extension for a CPU tensor")

    monkeypatch.setattr(cuda_ext, "available", boom)
    for x, rank in [
        (torch.randn(3, 5), 2),
        (torch.randn(2, 3, 4, dtype=HALF), 8),
        (torch.empty(0, 8, dtype=HALF), 4),
        (torch.randn(1, 8, dtype=torch.bfloat16), None),
        (torch.empty(1, 8, dtype=HALF, device="meta"), 4),
        ("not a tensor", 4),
    ]:
        verdict = cuda_decode.supports(x, rank)
        assert not verdict.ok and verdict.why


@pytest.mark.parametrize(
    "dtype,shape,rank,ok,fragment",
    [
        (torch.float16, (1, 64), 16, True, ""),
        (torch.bfloat16, (CUDA_DECODE_MAX_M, 7), CUDA_DECODE_MAX_RANK, True, ""),
        (torch.float16, (3, 1), 1, True, ""),
        (torch.float32, (1, 64), 16, False, "float16 or bfloat16"),
        (torch.float64, (1, 64), 16, False, "float16 or bfloat16"),
        (torch.float16, (CUDA_DECODE_MAX_M + 1, 64), 16, False, "rows"),
        (torch.float16, (0, 64), 16, False, "rows"),
        (torch.float16, (2, 0), 16, False, "K = 0"),
        (torch.float16, (2, 3, 64), 16, False, "2-D"),
        (torch.float16, (2, 64), 0, False, "rank"),
        (torch.float16, (2, 64), CUDA_DECODE_MAX_RANK + 1, False, "rank"),
        (torch.float16, (2, 64), True, False, "rank"),
        (torch.float16, (2, 64), 4.0, False, "rank"),
    ],
)
def test_shape_support_verdicts(dtype, shape, rank, ok, fragment):
    verdict = cuda_decode.shape_support(dtype, shape, rank)
    assert verdict.ok is ok
    assert fragment in verdict.why


def test_limits_match_the_ops_module():
    from lowrank_ops.lowrank import ops

    assert CUDA_DECODE_MAX_M == ops.DECODE_MAX_M == 16
    assert ops.PREFER_DECODE_MAX_M <= ops.DECODE_MAX_M
    assert CUDA_DECODE_MAX_RANK == 1024


def test_pinned_cuda_backend_on_cpu_says_why():
    x, v, u, b = _inputs()
    from lowrank_ops.lowrank.ops import lowrank_linear

    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend 'cuda'.*CUDA tensor"):
        lowrank_linear(x, v, u, b)


# --------------------------------------------------------------------------- input checks
def test_valid_cpu_call_fails_only_on_device():
    x, v, u, b = _inputs()
    with pytest.raises(ValueError, match="x: expected a CUDA tensor, got device cpu"):
        cuda_decode.check_inputs(x, v, u, b)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_decode.lowrank_decode(x, v, u, b)


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda x, v, u, b: ("x", x.tolist(), v, u, b), TypeError, "x: expected a torch.Tensor, got list"),
        (lambda x, v, u, b: ("x", x.float(), v, u, b), TypeError, r"x: expected dtype float16 or bfloat16, got torch.float32"),
        (lambda x, v, u, b: ("v", x, v.bfloat16(), u, b), TypeError, r"v: expected dtype torch.float16 \(that of x\)"),
        (lambda x, v, u, b: ("bias", x, v, u, b.bfloat16()), TypeError, r"bias: expected dtype torch.float16"),
        (lambda x, v, u, b: ("x", x[None], v, u, b), ValueError, "x: expected 2 dimensions"),
        (lambda x, v, u, b: ("u", x, v, u[None], b), ValueError, "u: expected 2 dimensions"),
        (lambda x, v, u, b: ("bias", x, v, u, b[None]), ValueError, "bias: expected 1 dimensions"),
        (lambda x, v, u, b: ("x", x.t().contiguous().t(), v, u, b), ValueError, "x: expected a contiguous"),
        (lambda x, v, u, b: ("v", x, v.t().contiguous().t(), u, b), ValueError, "v: expected a contiguous"),
        (lambda x, v, u, b: ("v", x, v[:, :-1].contiguous(), u, b), ValueError, r"v: expected shape \(R, 24\)"),
        (lambda x, v, u, b: ("u", x, v, u[:, :-1].contiguous(), b), ValueError, r"u: expected shape \(N, 8\)"),
        (lambda x, v, u, b: ("bias", x, v, u, b[:-1].contiguous()), ValueError, r"bias: expected shape \(40,\)"),
        (lambda x, v, u, b: ("x", torch.randn(17, 24, dtype=HALF), v, u, b), ValueError, "x: expected 1..16 rows"),
        (lambda x, v, u, b: ("x", x[:0], v, u, b), ValueError, "x: expected 1..16 rows"),
        (lambda x, v, u, b: ("v", x, torch.randn(1025, 24, dtype=HALF), torch.randn(40, 1025, dtype=HALF), b),
         ValueError, "v: expected 1..1024 rows"),
        (lambda x, v, u, b: ("v", x, v.to("meta"), u, b), ValueError, "v: expected device cpu"),
    ],
)
def test_check_inputs_names_the_argument(mutate, exc, pattern):
    _, x, v, u, b = mutate(*_inputs())
    with pytest.raises(exc, match=pattern):
        cuda_decode.check_inputs(x, v, u, b)


def test_vector_path_rule():
    x, v, u, _ = _inputs(k=24, r=8)
    assert cuda_decode.vector_paths(x, v, u) == (True, True)
    x7, v7, u7, _ = _inputs(k=7, r=3)
    assert cuda_decode.vector_paths(x7, v7, u7) == (False, False)
    # a contiguous view two bytes into its storage: K % 8 == 0 but not 16-byte aligned
    flat = torch.randn(2 * 24 + 1, dtype=HALF)
    x_off = flat[1:].view(2, 24)
    assert x_off.is_contiguous() and x_off.data_ptr() % 16 != 0
    assert cuda_decode.vector_paths(x_off, v, u) == (False, True)


# --------------------------------------------------------------------------- loading
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_never_loads_the_extension_or_cuda():
    proc = _run(
        """
        import sys, torch
        import lowrank_ops
        from lowrank_ops.lowrank import cuda_decode, ops
        assert "lowrank_ops._C" not in sys.modules, "imported _C at import"
        assert not torch.cuda.is_initialized()
        x = torch.randn(2, 16, dtype=torch.float16)
        v = torch.randn(4, 16, dtype=torch.float16)
        u = torch.randn(8, 4, dtype=torch.float16)
        lowrank_ops.lowrank_linear(x, v, u)  # CPU call: reference, must not look for _C
        assert "lowrank_ops._C" not in sys.modules, "a CPU call imported _C"
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


@pytest.fixture
def fresh_ext():
    cuda_ext.reset()
    yield cuda_ext
    cuda_ext.reset()


def test_broken_extension_warns_instead_of_raising(fresh_ext, monkeypatch, caplog):
    spec = importlib.machinery.ModuleSpec("lowrank_ops._C", None, origin="/somewhere/_C.so")
    monkeypatch.delitem(sys.modules, "lowrank_ops._C", raising=False)
    monkeypatch.setattr(fresh_ext.importlib.util, "find_spec", lambda name: spec)

    def broken(name):
        raise ImportError("undefined symbol: _ZN3foo")

    monkeypatch.setattr(fresh_ext.importlib, "import_module", broken)
    with caplog.at_level(logging.WARNING, logger=fresh_ext.__name__):
        assert fresh_ext.load() is None
        assert fresh_ext.load() is None  # cached: one warning only
    assert not fresh_ext.available()
    assert "failed to load" in fresh_ext.unavailable_reason() and "undefined symbol" in fresh_ext.unavailable_reason()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/somewhere/_C.so" in warnings[0].getMessage()


def test_missing_extension_is_quiet(fresh_ext, monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "lowrank_ops._C", raising=False)
    monkeypatch.setattr(fresh_ext.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=fresh_ext.__name__):
        assert fresh_ext.load() is None
    assert not caplog.records
    assert not fresh_ext.available()
    assert "not built" in fresh_ext.unavailable_reason()


def test_disable_env(fresh_ext, monkeypatch):
    monkeypatch.setenv(fresh_ext.DISABLE_ENV, "1")
    assert fresh_ext.load() is None and not fresh_ext.available()
    assert fresh_ext.DISABLE_ENV in fresh_ext.unavailable_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU verdict")
def test_unavailable_without_cuda(fresh_ext):
    assert not fresh_ext.available()
    assert fresh_ext.unavailable_reason()


def test_dependent_launch_switch(monkeypatch):
    """$LOWRANK_OPS_DEPENDENT_LAUNCH=0 turns programmatic dependent launches off before the device
    is asked (so on a CPU machine too); a value other than 0 or 1 is refused by name."""
    monkeypatch.setattr(cuda_ext, "_capability_major", lambda index: 9)  # an sm_90 device
    monkeypatch.delenv(cuda_ext.DEPENDENT_LAUNCH_ENV, raising=False)
    assert cuda_ext.dependent_launch(0)
    monkeypatch.setenv(cuda_ext.DEPENDENT_LAUNCH_ENV, "0")
    assert not cuda_ext.dependent_launch(0)
    monkeypatch.setenv(cuda_ext.DEPENDENT_LAUNCH_ENV, "1")
    monkeypatch.setattr(cuda_ext, "_capability_major", lambda index: 8)  # sm_80: never
    assert not cuda_ext.dependent_launch(0)
    monkeypatch.setenv(cuda_ext.DEPENDENT_LAUNCH_ENV, "yes")
    with pytest.raises(ValueError, match="LOWRANK_OPS_DEPENDENT_LAUNCH: expected 0 or 1, got 'yes'"):
        cuda_ext.dependent_launch(0)
