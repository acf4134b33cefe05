"""N:M structured sparsity along the input dimension: packed format
(:mod:`lowrank_ops.sparse.format`), pruning (:mod:`lowrank_ops.sparse.compress`), the
``lowrank_ops::nm_linear`` op (:mod:`lowrank_ops.sparse.ops`) and the ``SparseLinear`` layer
(:mod:`lowrank_ops.sparse.layer`)."""
