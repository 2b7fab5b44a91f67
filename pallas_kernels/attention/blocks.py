"""Tiling helpers shared by the kernels: sequence padding, split-softmax merging and the
key of the Triton tile tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp

TRITON_MAX_HEAD_DIM = 256
"""Largest head_dim the Triton tile tables (``flash_gpu``, ``decode_gpu``) have rows for."""


def triton_table_key(head_dim: int, dtype: jnp.dtype) -> tuple[int, int]:
    """Row of a Triton tile table: ``head_dim`` padded to a power of two (at least 64), and
    2 or 4 bytes per element (the 4-byte rows also serve wider dtypes).

    Raises:
      ValueError: ``head_dim > TRITON_MAX_HEAD_DIM``: no row holds tiles that fit it.
    """
    if head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton kernels have tiles for head_dim <= {TRITON_MAX_HEAD_DIM}, got "
            f"{head_dim}; use implementation='xla', or add a measured row to "
            "flash_gpu.TILE_TABLE / decode_gpu.DECODE_BLOCK_KV."
        )
    padded = max(64, 1 << (head_dim - 1).bit_length())
    return padded, 2 if jnp.dtype(dtype).itemsize <= 2 else 4


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
