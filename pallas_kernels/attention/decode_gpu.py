"""Decode attention for GPU (flash-decoding): a Pallas Triton split-KV kernel.

Shapes: ``q: [b, hq, d]`` (one new token per row, at position ``lengths[i] - 1``),
``k_cache, v_cache: [b, S, hkv, d]``, ``lengths: [b]``; group ``g = hq // hkv``.

One program per (split, batch, kv head) handles the ``g`` query heads that share
the kv head as the rows of one ``[g, d]`` tile (GQA without repeating K/V), over
its contiguous share of the cache. Only key blocks the query can see are
visited: ``[0, lengths)`` intersected with the window (plus sink blocks)::

    for visible key blocks j of this split:
        s = soft_cap(q @ k_j^T * scale) masked      [g, bk]
        m' = max(m, rowmax(s)); p = exp2(s - m'); l = l 2^(m - m') + rowsum(p)
        acc = acc 2^(m - m') + p @ v_j

The partial ``(acc, m, l)`` of all splits are merged in XLA
(:func:`blocks.combine_partials`)::

    M = max_s m_s;  o = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)

Rows that see no key (length 0) return zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.blocks import combine_partials, triton_table_key
from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec, soft_cap

_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16
# Enough programs to fill an H100 (132 SMs) twice over.
_TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class _DecodeGpuCall:
    mask: MaskSpec
    scale: float
    logit_soft_cap: float | None
    head_dim: int
    groups: int
    block_kv: int
    blocks_per_split: int
    interpret: bool


# (padded head_dim, bytes per element) -> KV tile of the decode kernel, which runs with
# num_warps=4, num_stages=2 (jax's Pallas Triton decode defaults). 128 where it fits (jax's
# default block_k), halved as head_dim or element size grow so the two pipelined K/V
# buffers stay near 128 KiB; see docs/kernels.md ("Triton tile table") and
# tests/pallas_kernels/test_tiles.py (shared-memory estimate per entry).
DECODE_BLOCK_KV: dict[tuple[int, int], int] = {
    (64, 2): 128,
    (128, 2): 128,
    (256, 2): 64,
    (64, 4): 128,
    (128, 4): 64,
    (256, 4): 32,
}
NUM_WARPS, NUM_STAGES = 4, 2


def default_block_kv(cache_len: int, head_dim: int, dtype: jnp.dtype) -> int:
    """``DECODE_BLOCK_KV``'s tile for ``head_dim`` / ``dtype``, halved until it divides
    ``cache_len``.

    Returns 0 when no tile >= 16 divides it (the cache is then padded).

    Raises:
      ValueError: ``head_dim > 256`` (:func:`blocks.triton_table_key`).
    """
    block = DECODE_BLOCK_KV[triton_table_key(head_dim, dtype)]
    while block >= _MIN_BLOCK and cache_len % block:
        block //= 2
    return block if block >= _MIN_BLOCK else 0


def num_splits(batch: int, kv_heads: int, num_blocks: int) -> int:
    """KV splits so that ``batch * kv_heads * splits`` fills the GPU, >= 4 blocks each."""
    return max(1, min(pl.cdiv(_TARGET_PROGRAMS, batch * kv_heads), num_blocks // 4))


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, cfg: _DecodeGpuCall):
    # len_ref: []  q_ref: [gp, dp]  k_ref, v_ref: [S, dp]
    # acc_ref: [gp, dp]  m_ref, l_ref: [gp]
    gp, dp = q_ref.shape
    bk = cfg.block_kv
    num_blocks = k_ref.shape[0] // bk
    length = len_ref[()]
    rows_ok = lax.broadcasted_iota(jnp.int32, (gp, dp), 0) < cfg.groups
    cols_ok = lax.broadcasted_iota(jnp.int32, (gp, dp), 1) < cfg.head_dim
    q = plgpu.load(q_ref, mask=rows_ok & cols_ok, other=0.0)
    head_cols = (jnp.arange(dp) < cfg.head_dim)[None, :]

    def body(j, carry):
        acc, m, l_sum = carry
        kv = pl.ds(j * bk, bk)
        k = plgpu.load(k_ref.at[kv, :], mask=head_cols, other=0.0)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = soft_cap(s * cfg.scale, cfg.logit_soft_cap)
        kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (gp, bk), 1)
        s = jnp.where(cfg.mask.visible(length - 1, kv_pos, length), s * _LOG2E, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = plgpu.load(v_ref.at[kv, :], mask=head_cols, other=0.0)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc * alpha[:, None] + pv, m_new, l_sum * alpha + jnp.sum(p, axis=1)

    first = pl.program_id(0) * cfg.blocks_per_split
    last = jnp.minimum(first + cfg.blocks_per_split, num_blocks)
    (sink_lo, sink_hi), (lo, hi) = cfg.mask.kv_block_ranges(length - 1, length - 1, length, bk)
    carry = (
        jnp.zeros((gp, dp), jnp.float32),
        jnp.full((gp,), MASK_VALUE, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    if cfg.mask.num_sink_tokens:
        sink_lo = jnp.maximum(sink_lo, first)
        sink_hi = jnp.maximum(jnp.minimum(sink_hi, last), sink_lo)
        carry = lax.fori_loop(sink_lo, sink_hi, body, carry)
    lo = jnp.maximum(lo, first)
    acc, m, l_sum = lax.fori_loop(lo, jnp.maximum(jnp.minimum(hi, last), lo), body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l_sum


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    mask: MaskSpec,
    scale: float,
    logit_soft_cap: float | None,
    block_kv: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Split-KV decode attention with the Triton kernel (inputs already validated).

    Args:
      q: ``[b, hq, d]``; k_cache, v_cache: ``[b, S, hkv, d]``; lengths: ``[b]`` int32.
      mask: causal mask with the window / sinks (``q_offset`` unused: the query
        position is ``lengths - 1`` per row).
      scale, logit_soft_cap: logit scale and cap.
      block_kv: KV tile (power of two >= 16). None picks one dividing ``S``
        (:func:`default_block_kv`); if ``S`` is not a multiple of the tile the
        cache is zero-padded, a full copy: allocate caches in multiples of 128.
      interpret: Pallas interpret mode (CPU testing).

    Returns:
      ``[b, hq, d]`` in ``q.dtype``.
    """
    b, hq, d = q.shape
    s_len, hkv = k_cache.shape[1], k_cache.shape[2]
    if block_kv is not None and (block_kv < _MIN_BLOCK or block_kv & (block_kv - 1)):
        raise ValueError(f"block_kv must be a power of two >= {_MIN_BLOCK}, got {block_kv}.")
    table_block = DECODE_BLOCK_KV[triton_table_key(d, q.dtype)]  # raises for d > 256
    bk = block_kv or default_block_kv(s_len, d, q.dtype) or table_block
    if s_len % bk:
        pad = [(0, 0), (0, pl.cdiv(s_len, bk) * bk - s_len), (0, 0), (0, 0)]
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    s_pad = k_cache.shape[1]
    groups = hq // hkv
    gp, dp = max(_MIN_BLOCK, pl.next_power_of_2(groups)), pl.next_power_of_2(d)
    splits = num_splits(b, hkv, s_pad // bk)
    cfg = _DecodeGpuCall(
        mask=mask,
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        head_dim=d,
        groups=groups,
        block_kv=bk,
        blocks_per_split=pl.cdiv(s_pad // bk, splits),
        interpret=interpret,
    )
    acc, m, l_sum = pl.pallas_call(
        functools.partial(_decode_kernel, cfg=cfg),
        grid=(splits, b, hkv),
        in_specs=[
            pl.BlockSpec((None,), lambda s, n, h: (n,)),
            pl.BlockSpec((None, None, gp, dp), lambda s, n, h: (n, h, 0, 0)),
            pl.BlockSpec((None, s_pad, None, dp), lambda s, n, h: (n, 0, h, 0)),
            pl.BlockSpec((None, s_pad, None, dp), lambda s, n, h: (n, 0, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, dp), lambda s, n, h: (s, n, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, n, h: (s, n, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, n, h: (s, n, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, hkv, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, gp), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, gp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="decode_attention",
    )(lengths, q.reshape(b, hkv, groups, d), k_cache, v_cache)
    out = combine_partials(
        acc[..., :groups, :d], m[..., :groups], l_sum[..., :groups], base2=True
    )  # [b, hkv, g, d]
    return out.reshape(b, hq, d).astype(q.dtype)
