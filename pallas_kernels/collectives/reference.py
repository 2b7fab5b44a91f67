"""The oracles of the collective matmuls: the plain collective, then the matmul.

Per-device code (inside ``shard_map``), the same signatures as
:mod:`pallas_kernels.collectives.matmul`. Context-parallel attention's oracle is
``pallas_kernels.attention_reference`` on the gathered sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def all_gather_matmul_reference(
    x: jax.Array, w: jax.Array | Sequence[jax.Array], *, axis_name: str
) -> jax.Array | tuple[jax.Array, ...]:
    """``all_gather(x) @ w``: x ``[..., m, k]`` gathered along ``m`` -> ``[..., n * m, f]``;
    for a list or tuple of weights, one gather and a tuple of products."""
    gathered = lax.all_gather(x, axis_name, axis=x.ndim - 2, tiled=True)
    if isinstance(w, list | tuple):
        return tuple(jnp.matmul(gathered, one) for one in w)
    return jnp.matmul(gathered, w)


def matmul_reduce_scatter_reference(x: jax.Array, w: jax.Array, *, axis_name: str) -> jax.Array:
    """``psum_scatter(x @ w)``: x ``[..., m, k]`` -> ``[..., m / n, f]`` summed over devices."""
    return lax.psum_scatter(jnp.matmul(x, w), axis_name, scatter_dimension=x.ndim - 2, tiled=True)
