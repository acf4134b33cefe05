"""Backend choice: automatic chain, pinning by context manager and environment variable."""
import pytest
import torch

from lowrank_ops.core import backend
from lowrank_ops.core.backend import Support, select_backend, use_backend

ALL_OK = {name: Support(True) for name in backend.BACKENDS}


def test_cpu_tensors_use_reference_automatically():
    assert select_backend("op", ALL_OK, torch.device("cpu")) == "reference"


def test_cuda_tensors_walk_the_chain():
    cuda = torch.device("cuda")
    assert select_backend("op", ALL_OK, cuda) == "cuda"
    no_cuda = dict(ALL_OK, cuda=Support(False, "M > 16"))
    assert select_backend("op", no_cuda, cuda) == "triton"
    only_ref = dict(no_cuda, triton=Support(False, "no triton"))
    assert select_backend("op", only_ref, cuda) == "reference"


def test_a_backend_measured_slower_is_passed_over_but_can_be_pinned():
    cuda = torch.device("cuda")
    slower = dict(ALL_OK, cuda=Support(True, "measured slower here", preferred=False))
    assert select_backend("op", slower, cuda) == "triton"
    with use_backend("cuda"):
        assert select_backend("op", slower, cuda) == "cuda"


def test_context_manager_pins_and_restores():
    with use_backend("triton"):
        assert backend.pinned_backend() == "triton"
        assert select_backend("op", ALL_OK, torch.device("cpu")) == "triton"
        with use_backend("reference"):
            assert backend.pinned_backend() == "reference"
        assert backend.pinned_backend() == "triton"
    assert backend.pinned_backend() is None


def test_pinned_backend_that_cannot_serve_raises_with_reason():
    support = dict(ALL_OK, cuda=Support(False, "x is on cpu"))
    with use_backend("cuda"), pytest.raises(ValueError, match="pinned backend 'cuda'.*x is on cpu"):
        select_backend("my_op", support, torch.device("cpu"))


def test_environment_variable_pins(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert select_backend("op", ALL_OK, torch.device("cuda")) == "reference"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="LOWRANK_OPS_BACKEND"):
        backend.pinned_backend()
    with use_backend("auto"):  # the context manager wins over the variable
        assert backend.pinned_backend() is None


def test_bad_backend_name():
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("tensorrt"):
            pass


def test_triton_runs_on_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.triton_runs_on(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.triton_runs_on(torch.device("cpu")) == backend.triton_installed()
