"""What the emulation-lane test modules share: their marks (the ``emulation`` marker, and a skip
only where the CUDA emulation cannot build: no C++ compiler, CUDA headers or pybind11, or not
Linux). A module sets ``pytestmark = MARKS``."""
import pytest

from lowrank_ops.core import cuda_emulation

MARKS = [
    pytest.mark.emulation,
    pytest.mark.skipif(bool(cuda_emulation.unavailable_reason()),
                       reason=f"CUDA emulation: {cuda_emulation.unavailable_reason()}"),
]
