"""Grouped matmuls for GPU: Pallas Triton ``gmm`` and ``tgmm`` kernels.

Rows of ``lhs`` are sorted by group; group ``i`` owns rows ``[start_i, end_i)`` with
``end = cumsum(group_sizes)`` (clamped to ``m``) and ``start = end - group_sizes``.
Both kernels read the group bounds from two small int32 arrays in global memory
(Triton has no scalar prefetch), padded to a power of two with ``INT32_MAX`` so
padding never counts as a group. Operands are read in place through masked loads:
nothing is padded or copied, ragged edges (``m``, ``k``, ``n`` that are not tile
multiples) are masked.

``gmm``: ``lhs: [m, k]``, ``rhs: [g, k, n]`` (or ``[g, n, k]`` with ``transpose_rhs``,
the ``d_lhs = grad @ rhs^T`` of the backward, read without a transposed copy),
``out: [m, n]``. One program per output tile ``(row tile, column tile)``::

    rows = [r0, r0 + bm)
    for group i in [#groups ending at or before r0, #groups starting before r0 + bm):
        (empty groups run no k step)
        for each k tile:
            acc += (lhs[rows, k tile] masked to rows of group i) @ rhs[i][k tile, cols]
    out[rows, cols] = acc          (rows of no group, e.g. past sum(group_sizes): 0)

A row tile that straddles a group boundary runs once per group it touches, each pass
keeping only that group's rows, so every row gets exactly its own group's product;
straddling costs at most ``g - 1`` extra tile passes per column tile.

``tgmm``: ``lhs: [m, k]``, ``grad: [m, n]``, ``out: [g, k, n]``, the weight gradient
``out[i] = lhs[rows_i]^T @ grad[rows_i]``. One program per ``(k tile, n tile, group)``,
accumulating over its group's rows in steps of ``bm`` (the last step masked); an empty
group stores zeros.

Both accumulate in float32. ``rhs`` may be stored in a wider dtype than ``lhs``
(float32 master weights, bfloat16 activations): its tiles are cast to ``lhs.dtype``
after loading, so no cast copy of the weights is ever made. Tiles, warps and stages
come from ``TILE_TABLE`` by element size (:func:`tiles_for`); they shrink to small
shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MIN_BLOCK = 16  # Triton dots need every dimension >= 16.
_NO_GROUP = jnp.iinfo(jnp.int32).max  # bound of the padding entries: never a row


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Launch parameters of one kernel: tile sizes (powers of two >= 16), warps, stages.

    ``gmm`` computes ``[block_m, block_n]`` output tiles stepping over ``k`` by
    ``block_k``; ``tgmm`` computes ``[block_k, block_n]`` output tiles stepping over the
    group's rows by ``block_m``.
    """

    block_m: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int


# bytes per element -> (gmm, tgmm). Not measured on hardware (docs/kernels.md says where
# they come from); tests/pallas_kernels/test_gmm.py checks each fits A100 shared memory.
TILE_TABLE: dict[int, tuple[Tiles, Tiles]] = {
    2: (Tiles(128, 64, 128, 4, 3), Tiles(64, 128, 128, 4, 3)),
    4: (Tiles(64, 32, 64, 4, 3), Tiles(32, 64, 64, 4, 3)),
}


def tiles_for(
    dtype: jnp.dtype, m: int, k: int, n: int, tiling: tuple[int, int, int] | None = None
) -> tuple[Tiles, Tiles]:
    """The ``(gmm, tgmm)`` launch parameters for operands of ``dtype`` and these sizes.

    ``tiling = (block_m, block_k, block_n)`` replaces the table's tiles of both kernels
    (warps and stages stay the table's). Every tile then shrinks to its dimension
    rounded up to a power of two, never below 16.

    Raises:
      ValueError: a ``tiling`` entry that is not a power of two >= 16.
    """
    if tiling is not None:
        for name, block in zip(("block_m", "block_k", "block_n"), tiling, strict=True):
            if block < _MIN_BLOCK or block & (block - 1):
                raise ValueError(
                    f"{name} must be a power of two >= {_MIN_BLOCK} for the Triton kernels, "
                    f"got {block} (tiling={tiling})."
                )
    fit = lambda block, dim: max(_MIN_BLOCK, min(block, pl.next_power_of_2(dim)))
    table = TILE_TABLE[2 if jnp.dtype(dtype).itemsize <= 2 else 4]
    out = []
    for t in table:
        bm, bk, bn = tiling or (t.block_m, t.block_k, t.block_n)
        out.append(
            dataclasses.replace(t, block_m=fit(bm, m), block_k=fit(bk, k), block_n=fit(bn, n))
        )
    return tuple(out)


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """``(start, end)`` row of every group, ``[next_pow2(g)]`` int32 each, clamped to
    ``m``; padding entries are ``INT32_MAX`` (they own no row and are never counted)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    pad = pl.next_power_of_2(group_sizes.shape[0]) - group_sizes.shape[0]
    fill = lambda x: jnp.pad(x, (0, pad), constant_values=_NO_GROUP)
    return fill(starts), fill(ends)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """Contract dim ``contract[0]`` of ``a`` with ``contract[1]`` of ``b``, in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _index(start, block: int):
    """``(slice of block rows/cols from start, their positions)``."""
    return pl.ds(start, block), start + jnp.arange(block)


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _gmm_kernel(starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, t: Tiles, transpose_rhs):
    # starts_ref, ends_ref: [gp]  lhs_ref: [m, k]  rhs_ref: [g, k, n] ([g, n, k] transposed)
    # out_ref: [m, n]
    (m, k), n = lhs_ref.shape, out_ref.shape[1]
    r0 = pl.program_id(0) * t.block_m
    row_slice, rows = _index(r0, t.block_m)
    col_slice, cols = _index(pl.program_id(1) * t.block_n, t.block_n)
    col_ok = cols < n

    def rhs_tile(i, k_slice, k_ok):
        """``rhs[i]`` at (k tile, column tile), as ``[bk, bn]`` or ``[bn, bk]``."""
        if transpose_rhs:
            ref, mask = rhs_ref.at[i, col_slice, k_slice], col_ok[:, None] & k_ok[None, :]
        else:
            ref, mask = rhs_ref.at[i, k_slice, col_slice], k_ok[:, None] & col_ok[None, :]
        return plgpu.load(ref, mask=mask, other=0.0)

    def group_body(i, acc):
        start, end = starts_ref[i], ends_ref[i]
        in_group = ((rows >= start) & (rows < end))[:, None]

        def k_body(kk, acc):
            k_slice, ks = _index(kk * t.block_k, t.block_k)
            k_ok = ks < k
            a = plgpu.load(lhs_ref.at[row_slice, k_slice], mask=in_group & k_ok[None, :], other=0.0)
            b = rhs_tile(i, k_slice, k_ok).astype(a.dtype)
            return acc + _dot(a, b, (1, 1) if transpose_rhs else (1, 0))

        steps = jnp.where(end > start, pl.cdiv(k, t.block_k), 0)  # empty group: no step
        return lax.fori_loop(0, steps, k_body, acc)

    # Groups touching rows [r0, r0 + bm): those not ending by r0, starting before its end.
    first = jnp.sum((ends_ref[...] <= r0).astype(jnp.int32))
    stop = jnp.sum((starts_ref[...] < r0 + t.block_m).astype(jnp.int32))
    acc = lax.fori_loop(first, stop, group_body, jnp.zeros((t.block_m, t.block_n), jnp.float32))
    mask = (rows < m)[:, None] & col_ok[None, :]
    plgpu.store(out_ref.at[row_slice, col_slice], acc.astype(out_ref.dtype), mask=mask)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, t: Tiles):
    # starts_ref, ends_ref: [gp]  lhs_ref: [m, k]  grad_ref: [m, n]  out_ref: [g, k, n]
    k, n = lhs_ref.shape[1], grad_ref.shape[1]
    k_slice, ks = _index(pl.program_id(0) * t.block_k, t.block_k)
    n_slice, ns = _index(pl.program_id(1) * t.block_n, t.block_n)
    k_ok, n_ok = ks < k, ns < n
    group = pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]

    def row_body(step, acc):
        row_slice, rows = _index(start + step * t.block_m, t.block_m)
        in_group = (rows < end)[:, None]
        a = plgpu.load(lhs_ref.at[row_slice, k_slice], mask=in_group & k_ok[None, :], other=0.0)
        b = plgpu.load(grad_ref.at[row_slice, n_slice], mask=in_group & n_ok[None, :], other=0.0)
        return acc + _dot(a, b, (0, 0))  # [bk, bn] += a^T @ b

    steps = pl.cdiv(end - start, t.block_m)
    acc = lax.fori_loop(0, steps, row_body, jnp.zeros((t.block_k, t.block_n), jnp.float32))
    mask = k_ok[:, None] & n_ok[None, :]
    plgpu.store(out_ref.at[group, k_slice, n_slice], acc.astype(out_ref.dtype), mask=mask)


# ---------------------------------------------------------------------------
# pallas_call wrappers.
# ---------------------------------------------------------------------------


def _params(t: Tiles) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped matmul with the Triton kernel (not differentiable by itself).

    Args:
      lhs: ``[m, k]``, rows sorted by group (inputs already validated).
      rhs: ``[g, k, n]``, or ``[g, n, k]`` with ``transpose_rhs``; any float dtype,
        tiles are cast to ``lhs.dtype`` in the kernel.
      group_sizes: ``[g]`` int.
      tiling: ``(block_m, block_k, block_n)`` override; None = ``TILE_TABLE``.
      interpret: Pallas interpret mode (CPU testing).

    Returns:
      ``[m, n]`` in ``lhs.dtype``; rows of no group are zeros.
    """
    (m, k), g = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    t, _ = tiles_for(lhs.dtype, m, k, n, tiling)
    starts, ends = group_bounds(group_sizes, m)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, t=t, transpose_rhs=transpose_rhs),
        grid=(pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n)),
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        compiler_params=_params(t),
        interpret=interpret,
        name="gmm_transposed_rhs" if transpose_rhs else "gmm",
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n,
            transcendentals=0,
            bytes_accessed=lhs.nbytes + g * k * n * rhs.dtype.itemsize + m * n * lhs.dtype.itemsize,
        ),
    )(starts, ends, lhs, rhs)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype: jnp.dtype,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-group ``lhs^T @ grad`` with the Triton kernel (not differentiable by itself).

    Args:
      lhs: ``[m, k]``; grad: ``[m, n]`` (same dtype), rows sorted by group.
      group_sizes: ``[g]`` int.
      out_dtype: dtype of the result (the weights' dtype in the backward).
      tiling, interpret: as in :func:`gmm`.

    Returns:
      ``[g, k, n]``; empty groups are zeros.
    """
    (m, k), n, g = lhs.shape, grad.shape[1], group_sizes.shape[0]
    _, t = tiles_for(lhs.dtype, m, k, n, tiling)
    starts, ends = group_bounds(group_sizes, m)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, t=t),
        grid=(pl.cdiv(k, t.block_k), pl.cdiv(n, t.block_n), g),
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        compiler_params=_params(t),
        interpret=interpret,
        name="tgmm",
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n,
            transcendentals=0,
            bytes_accessed=lhs.nbytes + grad.nbytes + g * k * n * jnp.dtype(out_dtype).itemsize,
        ),
    )(starts, ends, lhs, grad)
