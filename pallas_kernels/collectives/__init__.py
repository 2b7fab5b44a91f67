"""Collective kernels: context-parallel attention and collective matmuls (see DESIGN.md)."""

from pallas_kernels.collectives.attention import (
    STRATEGIES,
    all_gather_attention,
    context_attention,
    ring_attention,
)
from pallas_kernels.collectives.layout import (
    LAYOUTS,
    check_layout,
    from_layout,
    shard_positions,
    to_layout,
)
from pallas_kernels.collectives.matmul import all_gather_matmul, matmul_reduce_scatter

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "all_gather_attention",
    "all_gather_matmul",
    "check_layout",
    "context_attention",
    "from_layout",
    "matmul_reduce_scatter",
    "ring_attention",
    "shard_positions",
    "to_layout",
]
