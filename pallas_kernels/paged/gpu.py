"""Ragged paged attention for GPU: a Pallas Triton kernel over (query tile, kv head).

Shapes: ``q: [T, hq, d]`` packed sequence after sequence, ``kv_pages: [P, page_size,
2 * hkv, d]`` (K of kv head ``h`` at ``2h``, V at ``2h + 1``); group ``g = hq // hkv``,
padded to a power of two ``gp``.

Work items: each sequence's new tokens are cut into tiles of ``bq`` tokens starting at
its first row, so a tile never straddles two sequences; there are at most
``cdiv(T, bq) + S`` of them (a static grid; spare items do nothing). Their sequence,
rows, first position and KV length are computed in XLA before the call. The queries
are laid out ``[hkv, T * gp, d]`` so that a tile's ``bq`` tokens times the ``gp`` heads
sharing one kv head are ``bq * gp`` consecutive rows: one ``[rows, d]`` operand.

One program per (item, kv head) walks the key blocks its rows can see (window and sink
blocks only), a block being ``pages_per_block`` of the sequence's pages gathered by page
id (``bk`` keys), with an online softmax in base 2::

    for visible key blocks j:
        k, v = pages[ids_j][:, :, 2h], pages[ids_j][:, :, 2h + 1]     [bk, d]
        s = (q @ k^T) * scale * log2(e), masked                      [rows, bk]
        m' = max(m, rowmax(s)); p = exp2(s - m'); l = l 2^(m - m') + rowsum(p)
        acc = acc 2^(m - m') + p @ v
    out = acc / l          (rows that see no key: 0)

Split over keys (FlashDecoding): a batch of few work items over long contexts would leave
most of the GPU idle with one program per (item, kv head), so :func:`key_splits` adds a
third grid axis that cuts each item's visible blocks into ``num_splits`` runs. Each
program then writes its run's unnormalised ``acc`` and its softmax ``m``, ``l`` (float32),
and XLA combines the runs::

    m* = max_s m_s;  w_s = 2^(m_s - m*);  out = sum_s w_s acc_s / sum_s w_s l_s

(sink blocks go to split 0; a run with no visible block has ``l = 0`` and weight 0).
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

from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec
from pallas_kernels.paged.layout import PagedBatch, query_tiles

_LOG2E = math.log2(math.e)
TILE_ROWS = 64
"""Query rows (tokens x heads of one group) per program."""
BLOCK_KEYS = 64
"""Keys per loop step (whole pages; at least one page)."""
NUM_WARPS, NUM_STAGES = 4, 2
SPLIT_MIN_BLOCKS = 8
"""Split the keys only where a sequence can span this many blocks, and keep at least about
this many blocks per run (fewer make the combine cost more than the parallelism gives)."""
TARGET_PROGRAMS = 128
"""Programs to aim for when splitting (about the streaming multiprocessors of an H100)."""
TRITON_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def unsupported_reason(q: jax.Array, kv_pages: jax.Array, *, sinks: int | None) -> str | None:
    """Why the Triton kernel cannot run this call; None when it can (it has sinks)."""
    del sinks
    if q.dtype != kv_pages.dtype:
        return f"q ({q.dtype}) and kv_pages ({kv_pages.dtype}) must share one dtype"
    if q.dtype not in TRITON_DTYPES:
        return f"the Triton kernel takes bfloat16/float16/float32, got {q.dtype}"
    page_size, head_dim = kv_pages.shape[1], kv_pages.shape[3]
    if not _pow2(page_size):
        return f"page_size must be a power of two for the Triton kernel, got {page_size}"
    if not (_pow2(head_dim) and 16 <= head_dim <= 256):
        return f"head_dim must be a power of two in [16, 256] for Triton, got {head_dim}"
    return None


@dataclasses.dataclass(frozen=True)
class _PagedGpuCall:
    mask: MaskSpec
    scale: float
    groups: int
    tile_tokens: int
    pages_per_block: int
    num_splits: int = 1


def key_splits(num_items: int, hkv: int, max_blocks: int) -> int:
    """Runs to cut each work item's key blocks into: 1 unless the ``num_items * hkv``
    programs are fewer than ``TARGET_PROGRAMS`` and a sequence can span ``max_blocks >=
    2 * SPLIT_MIN_BLOCKS`` blocks; then enough to near ``TARGET_PROGRAMS``, each run at least
    ``SPLIT_MIN_BLOCKS`` blocks long."""
    programs = num_items * hkv
    if programs >= TARGET_PROGRAMS or max_blocks < 2 * SPLIT_MIN_BLOCKS:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // programs), max_blocks // SPLIT_MIN_BLOCKS))


def _kernel(
    start_ref, end_ref, pos0_ref, kv_len_ref, pages_ref, q_ref, k_ref, v_ref, *out_refs,
    cfg: _PagedGpuCall,
):  # fmt: skip
    # scalars: start, end (rows), pos0, kv_len   pages_ref: [pages_pad]
    # q_ref: [rows_pad, d]   k_ref, v_ref: [P, page_size, d]
    # out_refs: o [rows_pad, d]; split: acc [rows_pad, d] f32, m, l [rows_pad] f32
    d = q_ref.shape[1]
    page_size = k_ref.shape[1]
    gp = _padded_groups(cfg.groups)
    rows = cfg.tile_tokens * gp
    npb = cfg.pages_per_block
    bk = npb * page_size
    start, end, pos0, kv_len = start_ref[()], end_ref[()], pos0_ref[()], kv_len_ref[()]
    row_ids = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    tok = row_ids // gp  # token within the tile
    row_ok = (start + tok < end) & (row_ids % gp < cfg.groups)  # [rows, 1]
    q_pos = pos0 + tok
    tile = pl.ds(pl.multiple_of(start * gp, gp), rows)
    q = plgpu.load(q_ref.at[tile, :], mask=row_ok, other=0.0)

    def body(j, carry):
        acc, m, l_sum = carry
        ids = pages_ref[pl.ds(j * npb, npb)]
        k = k_ref[ids].reshape(bk, d)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        visible = cfg.mask.visible(q_pos, kv_pos, kv_len) & row_ok
        s = jnp.where(visible, s * (cfg.scale * _LOG2E), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[ids].reshape(bk, d)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return acc * alpha[:, None] + pv, m_new, l_sum * alpha + jnp.sum(p, axis=1)

    q_last = pos0 + jnp.maximum(end - start, 1) - 1
    (sink_lo, sink_hi), (lo, hi) = cfg.mask.kv_block_ranges(pos0, q_last, kv_len, bk)
    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if cfg.num_splits > 1:  # this program's run of the visible blocks; sinks in the first
        split = pl.program_id(2)
        per_split = (hi - lo + cfg.num_splits - 1) // cfg.num_splits
        lo = lo + split * per_split
        hi = jnp.minimum(hi, lo + per_split)
        sink_hi = jnp.where(split == 0, sink_hi, sink_lo)
    if cfg.mask.num_sink_tokens:
        carry = lax.fori_loop(sink_lo, sink_hi, body, carry)
    acc, m, l_sum = lax.fori_loop(lo, hi, body, carry)
    if cfg.num_splits > 1:
        acc_ref, m_ref, l_ref = out_refs
        plgpu.store(acc_ref.at[tile, :], acc, mask=row_ok)
        plgpu.store(m_ref.at[tile], m, mask=row_ok[:, 0])
        plgpu.store(l_ref.at[tile], l_sum, mask=row_ok[:, 0])
        return
    (o_ref,) = out_refs
    out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[:, None]
    plgpu.store(o_ref.at[tile, :], out.astype(o_ref.dtype), mask=row_ok)


def _padded_groups(groups: int) -> int:
    return pl.next_power_of_2(groups)


def paged_attention(
    batch: PagedBatch,
    *,
    sm_scale: float,
    mask: MaskSpec,
    interpret: bool = False,
    num_splits: int | None = None,
    block_keys: int = BLOCK_KEYS,
) -> jax.Array:
    """Ragged paged attention with the Triton kernel (inputs validated and supported per
    :func:`unsupported_reason`). Returns ``[T, hq, d]``; padding rows are left unwritten.

    ``num_splits``: runs per work item over the keys (default :func:`key_splits`);
    ``block_keys``: keys per loop step, whole pages (tests use small blocks)."""
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch
    t, hq, d = q.shape
    num_pages, page_size, h2, _ = kv_pages.shape
    hkv, groups = h2 // 2, hq // (h2 // 2)
    gp = _padded_groups(groups)
    tile_tokens = max(1, TILE_ROWS // gp)
    npb = max(1, block_keys // page_size)
    tiles = query_tiles(t, tile_tokens, kv_lens, cu_q_lens, num_seqs)
    num_items = tiles.seq.shape[0]
    max_blocks = -(-page_indices.shape[1] // npb)
    num_splits = num_splits or key_splits(num_items, hkv, max_blocks)
    pad = -page_indices.shape[1] % npb  # pages past kv_len are never read
    pages = jnp.pad(page_indices, ((0, 0), (0, pad)))[tiles.seq]  # [W, pages_per_seq + pad]
    rows_pad = (t + tile_tokens) * gp  # a tile starting at any row stays in bounds
    q_hrd = jnp.pad(q.reshape(t, hkv, groups, d), ((0, 0), (0, 0), (0, gp - groups), (0, 0)))
    q_hrd = jnp.pad(q_hrd.transpose(1, 0, 2, 3).reshape(hkv, t * gp, d),
                    ((0, 0), (0, rows_pad - t * gp), (0, 0)))  # fmt: skip
    cfg = _PagedGpuCall(
        mask=mask,
        scale=sm_scale,
        groups=groups,
        tile_tokens=tile_tokens,
        pages_per_block=npb,
        num_splits=num_splits,
    )
    scalar = pl.BlockSpec((None,), lambda w, h, s: (w,))
    kv_spec = lambda parity: pl.BlockSpec(  # noqa: E731
        (num_pages, page_size, None, d), lambda w, h, s: (0, 0, 2 * h + parity, 0)
    )
    if num_splits == 1:
        out_specs = pl.BlockSpec((None, rows_pad, d), lambda w, h, s: (h, 0, 0))
        out_shape = jax.ShapeDtypeStruct((hkv, rows_pad, d), q.dtype)
    else:  # per run: acc [rows, d], m, l [rows]
        rows_spec = pl.BlockSpec((None, None, rows_pad), lambda w, h, s: (s, h, 0))
        out_specs = [
            pl.BlockSpec((None, None, rows_pad, d), lambda w, h, s: (s, h, 0, 0)),
            rows_spec,
            rows_spec,
        ]
        f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
        out_shape = [f32(num_splits, hkv, rows_pad, d), *[f32(num_splits, hkv, rows_pad)] * 2]
    out = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(num_items, hkv, num_splits),
        in_specs=[
            *[scalar] * 4,
            pl.BlockSpec((None, pages.shape[1]), lambda w, h, s: (w, 0)),
            pl.BlockSpec((None, rows_pad, d), lambda w, h, s: (h, 0, 0)),
            kv_spec(0),
            kv_spec(1),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="ragged_paged_attention",
    )(tiles.start, tiles.end, tiles.pos0, tiles.kv_len, pages, q_hrd, kv_pages, kv_pages)
    if num_splits > 1:
        out = _combine(*out).astype(q.dtype)
    out = out[:, : t * gp].reshape(hkv, t, gp, d)[:, :, :groups]
    return out.transpose(1, 0, 2, 3).reshape(t, hq, d)


def _combine(acc: jax.Array, m: jax.Array, l_sum: jax.Array) -> jax.Array:
    """The runs' partial softmaxes (``acc [splits, ..., d]``, base-2 ``m``, ``l [splits,
    ...]``) folded into the normalised output ``[..., d]`` (rows seeing no key: 0)."""
    weight = jnp.exp2(m - jnp.max(m, axis=0))
    total = jnp.sum(weight * l_sum, axis=0)
    out = jnp.sum(weight[..., None] * acc, axis=0)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]
