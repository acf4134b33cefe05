"""Microbenchmarks for the lowrank_ops kernel families.

:mod:`lowrank_ops.benchmarks.timing` is the shared measurement library (CUDA-event and
CUDA-graph timers over rotating buffers, measured copy bandwidth, roofline byte/flop counts,
JSON and table output); one module per family holds its suite (``lowrank`` so far), each with
``main(argv)`` for ``python -m lowrank_ops.benchmarks.<family>`` and ``lowrank-ops bench``.

Nothing here touches a GPU at import time.
"""
