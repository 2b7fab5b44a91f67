"""Grouped matmuls in plain XLA: the oracle every MoE kernel is tested against, and the
fallback where no kernel applies.

Rows of ``lhs: [m, k]`` are sorted by group; group ``i`` owns rows
``rows_i = [offsets[i], offsets[i + 1])`` with ``offsets = [0, cumsum(group_sizes)]``::

    gmm   [m, k] x [g, k, n] -> [m, n]:     out[r] = lhs[r] @ rhs[i]    for r in rows_i
    tgmm  [m, k] x [m, n] -> [g, k, n]:     out[i] = lhs[rows_i]^T @ grad[rows_i]

Rows at or past ``sum(group_sizes)`` belong to no group: ``gmm`` gives them zeros and
``tgmm`` ignores them; an empty group gives ``tgmm`` a zero ``[k, n]`` block.

``gmm`` is ``jax.lax.ragged_dot`` (differentiable by JAX itself); ``tgmm`` is
``jax.lax.ragged_dot_general`` with the ragged dimension contracted, which JAX cannot
differentiate, so it carries a ``custom_vjp`` whose cotangents are again ``ragged_dot``s:
``d_lhs = gmm(grad, d_out^T)``, ``d_grad = gmm(lhs, d_out)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_TGMM_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),  # contract the (ragged) row axis
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot``: rows of group ``i`` times ``rhs[i]``.

    Args:
      lhs: ``[m, k]``, rows sorted by group.
      rhs: ``[g, k, n]``; cast to ``lhs.dtype`` (weights may be stored wider).
      group_sizes: ``[g]`` int32.

    Returns:
      ``[m, n]`` in ``lhs.dtype`` (accumulated in float32); rows at or past
      ``sum(group_sizes)`` are zeros.
    """
    out = lax.ragged_dot(
        lhs, rhs.astype(lhs.dtype), group_sizes, preferred_element_type=jnp.float32
    )
    return out.astype(lhs.dtype)


def gmm_transposed_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``gmm_reference(lhs, rhs^T)`` for ``rhs: [g, n, k]`` (the ``d_lhs`` product)."""
    return gmm_reference(lhs, rhs.swapaxes(1, 2), group_sizes)


def _tgmm(out_dtype: jnp.dtype, lhs, grad, group_sizes):
    return lax.ragged_dot_general(
        lhs, grad, group_sizes, _TGMM_DIMS, preferred_element_type=jnp.float32
    ).astype(out_dtype)


_tgmm_vjp = jax.custom_vjp(_tgmm, nondiff_argnums=(0,))


def _tgmm_fwd(out_dtype, lhs, grad, group_sizes):
    return _tgmm(out_dtype, lhs, grad, group_sizes), (lhs, grad, group_sizes)


def _tgmm_bwd(out_dtype, residuals, d_out):
    lhs, grad, group_sizes = residuals
    d_lhs = gmm_transposed_reference(grad, d_out, group_sizes)  # grad_i @ d_out[i]^T
    d_grad = gmm_reference(lhs, d_out, group_sizes)  # lhs_i @ d_out[i]
    return d_lhs.astype(lhs.dtype), d_grad.astype(grad.dtype), None


_tgmm_vjp.defvjp(_tgmm_fwd, _tgmm_bwd)


def tgmm_reference(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """Per-group ``lhs^T @ grad`` (``jax.lax.ragged_dot_general``), differentiable.

    Args:
      lhs: ``[m, k]``; grad: ``[m, n]`` (same dtype), rows sorted by group.
      group_sizes: ``[g]`` int32.
      preferred_element_type: output dtype; None = ``lhs.dtype``. Accumulates in float32.

    Returns:
      ``[g, k, n]``; empty groups give zeros.
    """
    out_dtype = lhs.dtype if preferred_element_type is None else preferred_element_type
    return _tgmm_vjp(jnp.dtype(out_dtype), lhs, grad, group_sizes)
