"""lowrank_ops: Triton and CUDA kernels for compressed neural-network layers.

Importing this package never touches a GPU, never needs nvcc and never imports Triton:
kernels and the CUDA extension are loaded on first use.
"""
from lowrank_ops.calibration import InputStats, collect_input_stats
from lowrank_ops.core.backend import use_backend
from lowrank_ops.io import load_compressed, save_compressed
from lowrank_ops.lowrank.layer import LoRALinear, LowRankLinear
from lowrank_ops.lowrank.ops import lora_linear, lowrank_linear
from lowrank_ops.model import CompressionReport, compress
from lowrank_ops.quant.layer import QuantLinear
from lowrank_ops.kvcache.config import GEARConfig
from lowrank_ops.quant.ops import quant_linear
from lowrank_ops.sparse.format import NMFormat
from lowrank_ops.sparse.layer import SparseLinear, SRSTELinear
from lowrank_ops.sparse.ops import nm_linear

__version__ = "0.1.0"

# GEARCache is left out of __all__: ``from lowrank_ops import *`` never imports transformers.
__all__ = [
    "CompressionReport",
    "GEARConfig",
    "InputStats",
    "LoRALinear",
    "LowRankLinear",
    "NMFormat",
    "QuantLinear",
    "SRSTELinear",
    "SparseLinear",
    "collect_input_stats",
    "compress",
    "load_compressed",
    "lora_linear",
    "lowrank_linear",
    "nm_linear",
    "quant_linear",
    "save_compressed",
    "use_backend",
]


def __getattr__(name: str):
    """``lowrank_ops.GEARCache`` imports transformers (an optional extra) only when first used."""
    if name == "GEARCache":
        from lowrank_ops.kvcache.hf import GEARCache

        return GEARCache
    raise AttributeError(f"module 'lowrank_ops' has no attribute {name!r}")
