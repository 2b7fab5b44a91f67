"""Dropless expert dispatch on one device.

The ``t * k`` (token, expert) assignments are sorted by expert, the tokens are gathered in
that order (``[t*k, d]``), the experts run as grouped matmuls over the dynamic group sizes
(``grouped_matmul``: ``pallas_kernels.moe.gmm``, the one call site), and the rows go back to
assignment order and are summed with their routing weights. Nothing is dropped by default;
with ``capacity_factor`` an expert takes at most ``C = ceil(cf * t * k / E)`` of a group's
assignments (earliest tokens first) and the rest contribute nothing (a token that loses all
its experts passes through the block on the residual alone).
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.moe import gmm


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x: [m, a]`` (rows grouped by expert, in order) times ``w: [E, a, b]`` per group ->
    ``[m, b]`` in ``x.dtype``; ``group_sizes: [E]`` int32 sum to at most ``m`` and rows past
    the last group come out zero.

    The one place the layer multiplies by its experts: ``pallas_kernels.moe.gmm`` (Pallas
    kernels on GPU/TPU, ``lax.ragged_dot`` on CPU), given the weights as stored (it casts
    them to ``x.dtype`` tile by tile; a cast copy here would be what its backward saves).
    """
    return gmm(x, w, group_sizes)


def expert_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    group_sizes: jax.Array,
    matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] = grouped_matmul,
) -> jax.Array:
    """SwiGLU per expert on grouped rows: ``x: [m, d]``, ``w_gate, w_up: [E, d, f]``,
    ``w_down: [E, f, d]``, ``group_sizes: [E]`` -> ``[m, d]``. ``matmul`` is the grouped
    matmul (``grouped_matmul``; ``benchmarks/moe.py`` passes others)."""
    gate = matmul(x, w_gate, group_sizes)
    up = matmul(x, w_up, group_sizes)
    return matmul(nn.silu(gate) * up, w_down, group_sizes)


def expert_capacity(
    tokens: int, k: int, num_experts: int, capacity_factor: float | None
) -> int | None:
    """Assignments an expert takes from a group of ``tokens`` (None: dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


class Dispatch(NamedTuple):
    """How ``A`` assignments are laid out for the grouped matmul."""

    order: jax.Array
    """``[A]``: assignment indices, kept ones grouped by expert, dropped ones last."""
    group_sizes: jax.Array
    """``[E]`` int32: kept assignments per expert."""
    keep: jax.Array | None
    """``[A]`` bool in assignment order (None: dropless, all kept)."""


def sort_by_expert(experts: jax.Array, num_experts: int, capacity: int | None) -> Dispatch:
    """Group the assignments ``experts: [A]`` (flattened ``[t, k]``) by expert, stably; with a
    ``capacity``, each expert keeps its first ``capacity`` assignments."""
    order = jnp.argsort(experts, stable=True)
    counts = jnp.zeros(num_experts, jnp.int32).at[experts].add(1)
    if capacity is None:
        return Dispatch(order, counts, None)
    sorted_experts = experts[order]
    rank = jnp.arange(experts.shape[0]) - (jnp.cumsum(counts) - counts)[sorted_experts]
    kept = rank < capacity
    regroup = jnp.argsort(jnp.where(kept, sorted_experts, num_experts), stable=True)
    keep = jnp.zeros(experts.shape, bool).at[order].set(kept)
    return Dispatch(order[regroup], jnp.minimum(counts, capacity), keep)


def combine(rows: jax.Array, dispatch: Dispatch, weights: jax.Array) -> jax.Array:
    """Expert outputs ``rows: [A, d]`` in dispatch order -> ``[t, d]``: back to assignment
    order and summed with ``weights: [t, k]`` (dropped assignments weigh 0)."""
    t, k = weights.shape
    positions = jnp.arange(rows.shape[0], dtype=jnp.int32)
    inverse = jnp.zeros_like(positions).at[dispatch.order].set(positions)
    out = rows[inverse].reshape(t, k, -1).astype(jnp.float32)
    if dispatch.keep is not None:
        weights = jnp.where(dispatch.keep.reshape(t, k), weights, 0.0)
    return jnp.einsum("tkd,tk->td", out, weights.astype(jnp.float32)).astype(rows.dtype)


def routed_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    capacity_factor: float | None = None,
) -> jax.Array:
    """The dropless (or capacity-bounded) expert mixture on one device: ``x: [t, d]``,
    ``experts, weights: [t, k]``, expert weights ``[E, d, f]`` / ``[E, f, d]`` -> ``[t, d]``."""
    t, k = experts.shape
    num_experts = w_gate.shape[0]
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    dispatch = sort_by_expert(experts.reshape(-1), num_experts, capacity)
    rows = expert_mlp(x[dispatch.order // k], w_gate, w_up, w_down, dispatch.group_sizes)
    return combine(rows, dispatch, weights)
