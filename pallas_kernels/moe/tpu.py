"""Grouped matmuls for TPU: jax's own megablox kernels (Pallas Mosaic), wrapped.

``jax.experimental.pallas.ops.tpu.megablox`` ships ``gmm`` (``[m, k] x [g, k, n] ->
[m, n]``, optionally with the weights transposed in the kernel) and ``tgmm`` (``[k, m] x
[m, n] -> [g, k, n]``). Both walk the row tiles of each group from scalar-prefetched
group metadata (a row tile straddling a group boundary is visited once per group, the
store masked to the group's rows) and accumulate in a float32 VMEM scratch over ``k``
(``gmm``) or over the group's row tiles (``tgmm``). We call them directly, not
megablox's own ``custom_vjp``, so the backward is ours (see ``moe/dispatch.py``). What
this wrapper adds:

* **Tiles by shape** (:func:`tiling_for`): megablox needs ``m`` to be a multiple of its
  row tile, so ``m`` is padded (zero rows, no group owns them) to a multiple of 128 and
  the row tile is the largest of 512/256/128 dividing that; the ``k`` and ``n`` tiles
  are the whole dimension up to 512 (a block equal to the array dimension satisfies
  Mosaic's (8, 128) rule), else the largest of 512/256/128 dividing it, else 512 with a
  ragged last tile (megablox masks the ``k`` remainder; Mosaic clips the ragged ``n``
  block).
* **Zero rows past ``sum(group_sizes)``**: megablox never writes them (they hold
  whatever was in memory); ``ragged_dot`` semantics say zero, so they are masked. Sizes
  summing past ``m`` are clamped to ``m`` first, as the Triton kernels do.
* **Weights in another dtype**: megablox computes in float32 when the operand dtypes
  differ; the weights are cast to ``lhs.dtype`` first, a transient copy the backward
  does not keep (it saves the original and casts again).

``group_offset`` (megablox's expert-sharding argument, for a shard holding some
experts of all ``group_sizes``) is not exposed: after the expert-parallel all-to-all
each shard's rows are already grouped by its local experts.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# The package binds the name ``gmm`` to its differentiable op, hiding the module of raw
# kernels; import the module itself for ``gmm`` and ``tgmm``.
_megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
"""Operand dtypes megablox accepts (it rejects others)."""
ROW_MULTIPLE = 128
"""``m`` is padded to a multiple of this (the smallest row tile)."""
MAX_TILE = 512
"""Largest tile of every dimension: 7 MiB of VMEM in float32 (docs/kernels.md)."""
_CANDIDATES = (512, 256, 128)


def _dim_tile(dim: int) -> int:
    if dim <= MAX_TILE:
        return dim
    return next((t for t in _CANDIDATES if dim % t == 0), MAX_TILE)


def tiling_for(m: int, k: int, n: int) -> tuple[int, int, int]:
    """megablox ``(tm, tk, tn)`` for an ``[m, k] x [k, n]`` product (module docstring);
    ``tm`` divides ``m`` rounded up to a multiple of :data:`ROW_MULTIPLE`."""
    m_pad = pl.cdiv(m, ROW_MULTIPLE) * ROW_MULTIPLE
    tm = next(t for t in _CANDIDATES if m_pad % t == 0)
    return tm, _dim_tile(k), _dim_tile(n)


def _pad_rows(x: jax.Array, tm: int) -> jax.Array:
    rows = pl.cdiv(x.shape[0], tm) * tm - x.shape[0]
    return x if rows == 0 else jnp.pad(x, ((0, rows), (0, 0)))


def _clamped(group_sizes: jax.Array, m: int) -> jax.Array:
    """``group_sizes`` as int32 with their sum clamped to ``m`` (rows past ``m`` do not
    exist; megablox's metadata assumes they do not)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.diff(ends, prepend=0)


def _check_tiling(tiling: tuple[int, int, int], k: int, n: int) -> None:
    tm, tk, tn = tiling
    if tm % 128 or any(t != dim and t % 128 for t, dim in ((tk, k), (tn, n))):
        raise ValueError(
            f"TPU tiles must be multiples of 128 (tk, tn may also equal k, n), got "
            f"tiling={tiling} for k={k}, n={n}."
        )


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Grouped matmul with megablox ``gmm`` (not differentiable by itself).

    Args:
      lhs: ``[m, k]`` bfloat16/float32, rows sorted by group (already validated).
      rhs: ``[g, k, n]``, or ``[g, n, k]`` with ``transpose_rhs`` (transposed in the
        kernel, no copy); cast to ``lhs.dtype`` if it differs.
      group_sizes: ``[g]`` int.
      tiling: ``(tm, tk, tn)`` override; None = :func:`tiling_for`.
      interpret: Pallas interpret mode (CPU testing): True, or ``pltpu.InterpretParams()``.

    Returns:
      ``[m, n]`` in ``lhs.dtype``; rows at or past ``sum(group_sizes)`` are zeros.
    """
    (m, k), n = lhs.shape, rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = tiling or tiling_for(m, k, n)
    _check_tiling(tiling, k, n)
    group_sizes = _clamped(group_sizes, m)
    out = _megablox.gmm(
        _pad_rows(lhs, tiling[0]),
        rhs.astype(lhs.dtype),
        group_sizes,
        lhs.dtype,
        tuple(tiling),
        transpose_rhs=transpose_rhs,
        interpret=interpret,
    )[:m]
    owned = jnp.arange(m) < jnp.sum(group_sizes)
    return jnp.where(owned[:, None], out, jnp.zeros((), out.dtype))


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: jnp.dtype,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Per-group ``lhs^T @ grad`` with megablox ``tgmm`` (not differentiable by itself).

    Args:
      lhs: ``[m, k]``; grad: ``[m, n]`` (same dtype, bfloat16/float32).
      group_sizes: ``[g]`` int.
      out_dtype: dtype of the result (the weights' dtype in the backward).
      tiling, interpret: as in :func:`gmm` (``tk``, ``tn`` tile the output).

    Returns:
      ``[g, k, n]``; empty groups are zeros.
    """
    (m, k), n = lhs.shape, grad.shape[1]
    tiling = tiling or tiling_for(m, k, n)
    _check_tiling(tiling, k, n)
    # megablox takes lhs as [k, m] and transposes it back; under jit the two cancel.
    return _megablox.tgmm(
        _pad_rows(lhs, tiling[0]).swapaxes(0, 1),
        _pad_rows(grad, tiling[0]),
        _clamped(group_sizes, m),
        jnp.dtype(out_dtype),
        tuple(tiling),
        interpret=interpret,
    )
