"""Tiling helpers shared by the kernels: sequence padding and split-softmax merging."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``x``."""
    return -(-x // multiple) * multiple


def pad_seq(x: jax.Array | None, length: int) -> jax.Array | None:
    """Zero-pad axis 1 (the sequence axis of ``[b, s, ...]``) to ``length``."""
    if x is None or x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def combine_partials(acc: jax.Array, m: jax.Array, l_sum: jax.Array, *, base2: bool) -> jax.Array:
    """Merge split-KV partial softmaxes (flash-decoding).

    Args:
      acc: ``[splits, ..., d]`` unnormalised ``sum_j p_j v_j`` of each split.
      m: ``[splits, ...]`` running max of each split (base-2 logits if ``base2``).
      l_sum: ``[splits, ...]`` ``sum_j p_j`` of each split.

    Returns:
      ``[..., d]`` float32: ``sum_s acc_s w_s / sum_s l_s w_s`` with
      ``w_s = exp(m_s - max_s m_s)``; rows where every split is empty give 0.
    """
    w = jnp.exp2(m - m.max(axis=0)) if base2 else jnp.exp(m - m.max(axis=0))
    denom = jnp.sum(w * l_sum, axis=0)
    num = jnp.sum(w[..., None] * acc, axis=0)
    return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]
