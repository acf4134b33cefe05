"""Low-bit weights with sparse outliers and an optional low-rank path: packed format
(:mod:`lowrank_ops.quant.format`) and the quantizers that produce it
(:mod:`lowrank_ops.quant.compress`)."""
