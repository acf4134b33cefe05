"""Test lanes (see README): reference, interpreter, compile, emulation, gpu.

Without a CUDA device the Triton kernels run on CPU tensors under the interpreter, which must
be switched on before any kernel module is imported: that is done here, first thing.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu lane: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def ext():
    """The compiled ``lowrank_ops._C`` for the gpu lane's CUDA-kernel tests: the installed one
    when it loads and has every entry point, else csrc/ built for this GPU into the cache (needs
    nvcc). Skips without a CUDA device."""
    if not HAS_CUDA:
        pytest.skip("gpu lane: needs a CUDA device")
    from lowrank_ops.core import cuda_ext

    module = cuda_ext.load()
    if module is None or not all(hasattr(module, f) for f in ("lowrank_decode", "quant_decode", "sparse_decode")):
        major, minor = torch.cuda.get_device_capability()
        module = cuda_ext.build_and_load(archs=[f"{major}{minor}"])
    assert cuda_ext.available(), cuda_ext.unavailable_reason()
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny problems: on a busy 2-core runner multi-threaded
    LAPACK (eigh, SVD) and small matmuls spin, several times (up to ~100×) slower than one
    thread. Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count
    is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
