"""Decode attention for TPU: a Pallas Mosaic split-KV kernel.

Shapes: ``q: [b, hq, d]`` (one token per row, at position ``lengths[i] - 1``),
``k_cache, v_cache: [b, S, hkv, d]``, ``lengths: [b]``; group ``g = hq // hkv``.

The cache is read in place as ``[b, S, hkv * d]`` (a free reshape): one
``[bk, hkv * d]`` tile carries every kv head, and a static loop over kv heads
attends the ``[g, d]`` query rows of each group to its ``[bk, d]`` column slice
(GQA without repeated K/V, no transpose of the cache for any ``d``).

Grid ``(split, batch, step)``: the cache blocks are cut into ``splits``
contiguous shares (parallel, for multi-core chips); the step axis walks only the
blocks the row can see (``[0, length)`` intersected with window and sink
blocks, via the scalar-prefetched ``lengths`` in the index map), repeating the
last block index when a row has fewer, so those steps neither copy nor compute::

    s = soft_cap(q_h k_h^T * scale) masked;  m' = max(m, rowmax(s))
    p = exp(s - m');  l = l e^(m - m') + rowsum(p);  acc = acc e^(m - m') + p v_h

Split partials are merged by :func:`blocks.combine_partials`; length-0 rows give 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.blocks import combine_partials, round_up
from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec, nth_block, soft_cap

_LANES = 128


@dataclasses.dataclass(frozen=True)
class _DecodeTpuCall:
    mask: MaskSpec
    scale: float
    logit_soft_cap: float | None
    num_kv_heads: int
    head_dim: int
    block_kv: int
    blocks_per_split: int


def default_block_kv(cache_len: int) -> int:
    """Largest power-of-two tile in [8, 512] dividing ``cache_len``, else 0 (pad to 128)."""
    for block in (512, 256, 128, 64, 32, 16, 8):
        if cache_len % block == 0:
            return block
    return 0


def _step(cfg: _DecodeTpuCall, length, split, t):
    """Cache block visited at step ``t`` of ``split`` for a row of ``length``, and validity."""
    first = split * cfg.blocks_per_split
    end = first + cfg.blocks_per_split
    ranges = cfg.mask.kv_block_ranges(length - 1, length - 1, length, cfg.block_kv)
    clipped = tuple((jnp.maximum(lo, first), jnp.minimum(hi, end)) for lo, hi in ranges)
    return nth_block(clipped, t)


def _decode_kernel(
    len_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, m_sc, l_sc, acc_sc, *, cfg: _DecodeTpuCall
):
    # len_ref: [b] (SMEM)  q_ref: [hkv, g, d]  k_ref, v_ref: [bk, hkv * d]
    # acc_ref, acc_sc: [hkv, g, d]  m_ref, l_ref, m_sc, l_sc: [hkv, g, 128]
    split, n, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[n]
    j, run = _step(cfg, length, split, t)
    hkv, g, d = q_ref.shape
    bk = cfg.block_kv

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(run)
    def _attend():
        kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (g, bk), 1)
        visible = cfg.mask.visible(length - 1, kv_pos, length)
        for h in range(hkv):
            cols = pl.ds(h * d, d)
            k = k_ref[:, cols]
            s = lax.dot_general(
                q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            s = jnp.where(visible, soft_cap(s * cfg.scale, cfg.logit_soft_cap), -jnp.inf)
            m_prev = m_sc[h]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])  # [g, 128]
            p = jnp.exp(s - jnp.tile(m_next, (1, pl.cdiv(bk, _LANES)))[:, :bk])
            alpha = jnp.exp(m_prev - m_next)
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1)[:, None]
            m_sc[h] = m_next
            v = v_ref[:, cols]
            pv = lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            acc_sc[h] = jnp.tile(alpha, (1, pl.cdiv(d, _LANES)))[:, :d] * acc_sc[h] + pv

    @pl.when(t == pl.num_programs(2) - 1)
    def _finish():
        acc_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


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
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Split-KV decode attention with the Mosaic kernel (inputs already validated).

    Args:
      q: ``[b, hq, d]``; k_cache, v_cache: ``[b, S, hkv, d]``; lengths: ``[b]`` int32.
      mask: causal mask with the window / sinks; the query position is ``lengths - 1``.
      scale, logit_soft_cap: logit scale and cap.
      block_kv: cache tile, a multiple of 8. None = :func:`default_block_kv`; when
        ``S`` is not a multiple of the tile the cache is padded (a full copy:
        allocate caches in multiples of 128).
      num_splits: parallel shares of the cache; None = 2 for batch 1 (both cores of
        a megacore chip busy), else 1.
      interpret: Pallas interpret mode (CPU testing).

    Returns:
      ``[b, hq, d]`` in ``q.dtype``.
    """
    b, hq, d = q.shape
    s_len, hkv = k_cache.shape[1], k_cache.shape[2]
    if block_kv is not None and (block_kv <= 0 or block_kv % 8):
        raise ValueError(f"block_kv must be a positive multiple of 8 on TPU, got {block_kv}.")
    bk = block_kv or default_block_kv(s_len) or _LANES
    s_pad = round_up(s_len, bk)
    if s_pad != s_len:
        pad = [(0, 0), (0, s_pad - s_len), (0, 0), (0, 0)]
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    num_blocks = s_pad // bk
    splits = min(num_splits or (2 if b == 1 else 1), num_blocks)
    cfg = _DecodeTpuCall(
        mask=mask,
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        num_kv_heads=hkv,
        head_dim=d,
        block_kv=bk,
        blocks_per_split=pl.cdiv(num_blocks, splits),
    )
    steps = cfg.blocks_per_split
    if mask.sliding_window is not None:  # window blocks (+1 straddling) and sink blocks
        steps = min(steps, pl.cdiv(mask.sliding_window, bk) + 1 + pl.cdiv(mask.num_sink_tokens, bk))
    g = hq // hkv
    cache_index = lambda s, n, t, len_ref: (n, _step(cfg, len_ref[n], s, t)[0], 0)
    partial = lambda *shape: pl.BlockSpec((None, None, *shape), lambda s, n, t, _: (s, n, 0, 0, 0))
    acc, m, l_sum = pl.pallas_call(
        functools.partial(_decode_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(splits, b, steps),
            in_specs=[
                pl.BlockSpec((None, hkv, g, d), lambda s, n, t, _: (n, 0, 0, 0)),
                pl.BlockSpec((None, bk, hkv * d), cache_index),
                pl.BlockSpec((None, bk, hkv * d), cache_index),
            ],
            out_specs=[partial(hkv, g, d), partial(hkv, g, _LANES), partial(hkv, g, _LANES)],
            scratch_shapes=[
                pltpu.VMEM((hkv, g, _LANES), jnp.float32),
                pltpu.VMEM((hkv, g, _LANES), jnp.float32),
                pltpu.VMEM((hkv, g, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((splits, b, hkv, g, d), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, g, _LANES), jnp.float32),
            jax.ShapeDtypeStruct((splits, b, hkv, g, _LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="decode_attention_tpu",
    )(
        lengths,
        q.reshape(b, hkv, g, d),
        k_cache.reshape(b, s_pad, hkv * d),
        v_cache.reshape(b, s_pad, hkv * d),
    )
    out = combine_partials(acc, m[..., 0], l_sum[..., 0], base2=False)  # [b, hkv, g, d]
    return out.reshape(b, hq, d).astype(q.dtype)
