"""Ragged paged attention in plain XLA, for CPU: query tiles walk key blocks with an
online softmax.

The batch's rows are cut into tiles of ``bq`` consecutive rows of one sequence
(:func:`layout.query_tiles`; ``bq = 1`` for decode-sized batches, where a tile is a row).
Each tile walks only the key blocks its rows can see, a block being ``block_pages``
consecutive pages of its sequence (``bk = block_pages * page_size`` keys, fewer the more
tiles there are: :func:`default_block_keys` keeps a step's gathered blocks in cache). A
loop step gathers, for every tile at once, its next block's pages from the cache and folds
them into a running softmax::

    for step j (until the tile that needs the most blocks is done):
        blk_w = first_w + j                          (tile w's j-th visible block)
        k, v = kv_pages[page_indices[seq_w, blk_w pages]]       [W, bk, hkv, d]
        s = q_w k^T * scale, masked                  [W, hkv, g, bq, bk]
        m' = max(m, rowmax(s)); p = e^(s - m'); l = l e^(m - m') + rowsum(p)
        acc = acc e^(m - m') + p v

Sink blocks (attention sinks before the window) run as a short first loop. A step
gathers ``W * bk`` keys (a prefill chunk's rows share each gathered block) and the work
is ``O(T * visible keys)``: never the whole cache, and with a window ``O(T * window)``
however long the sequences are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec
from pallas_kernels.paged.layout import PagedBatch, QueryTiles, query_tiles, split_kv

BLOCK_KEYS = 256
"""The most keys per loop step (rounded down to whole pages, at least one page)."""
BLOCK_BYTES = 4 << 20
"""What one loop step's gathered K/V blocks of all tiles may take: past the CPU caches,
the gather and the copies after it slow down many-fold (measured: 64 decode tiles of 192
keys, 4 KV heads x 64 dims f32, ran about 15x faster with 64-key blocks than with 256)."""
TILE_TOKENS = 8
"""Rows per query tile when the batch holds more than two rows per sequence slot."""
_HIGHEST = lax.Precision.HIGHEST


def default_tile_tokens(num_tokens: int, max_seqs: int) -> int:
    """1 (a tile per row) for decode-sized batches, ``TILE_TOKENS`` when prefill chunks
    can fill tiles (more than two rows per sequence slot)."""
    return 1 if num_tokens <= 2 * max_seqs else TILE_TOKENS


def default_block_keys(num_tiles: int, kv_pages: jax.Array) -> int:
    """Keys per loop step: the largest power of two up to ``BLOCK_KEYS`` whose gathered
    K/V blocks for ``num_tiles`` tiles fit ``BLOCK_BYTES`` (``kv_pages``: one layer's cache
    ``[P, page_size, 2 * hkv, d]``); whole pages are taken from it by the caller."""
    per_key = num_tiles * kv_pages.shape[2] * kv_pages.shape[3] * kv_pages.dtype.itemsize
    keys = max(1, BLOCK_BYTES // per_key)
    return min(BLOCK_KEYS, 1 << (keys.bit_length() - 1))


def _block_step(q, kv_pages, pages, tiles: QueryTiles, mask: MaskSpec, *, sm_scale, bp):
    """``step(blk, carry)``: fold block ``blk`` ([W], one per tile) into the running softmax
    ``carry = (acc [W, hkv, g, bq, d], m [W, hkv, g, bq], l [W, hkv, g, bq])``."""
    w, bq, hkv, _, d = q.shape
    bk = bp * kv_pages.shape[1]
    rows = jnp.arange(bq)
    q_pos = (tiles.pos0[:, None] + rows)[:, :, None]  # [W, bq, 1]
    row_ok = (tiles.start[:, None] + rows < tiles.end[:, None])[:, :, None]

    def step(blk, carry):
        acc, m, l_sum = carry
        page_ids = jnp.take_along_axis(pages, blk[:, None] * bp + jnp.arange(bp), axis=1)
        k, v = split_kv(kv_pages[page_ids].reshape(w, bk, 2 * hkv, d))  # [W, bk, hkv, d]
        s = jnp.einsum("wqhgd,wkhd->whgqk", q, k.astype(jnp.float32), precision=_HIGHEST)
        kv_pos = (blk[:, None] * bk + jnp.arange(bk))[:, None, :]  # [W, 1, bk]
        ok = mask.visible(q_pos, kv_pos, tiles.kv_len[:, None, None]) & row_ok
        ok = ok[:, None, None]  # [W, 1, 1, bq, bk]
        s = jnp.where(ok, s * sm_scale, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        pv = jnp.einsum("whgqk,wkhd->whgqd", p, v.astype(jnp.float32), precision=_HIGHEST)
        return acc * alpha[..., None] + pv, m_new, l_sum * alpha + p.sum(axis=-1)

    return step


def _guarded(step, active: jax.Array, blk: jax.Array, carry):
    """``step`` for tiles where ``active`` ([W]); the others keep their carry."""
    new = step(jnp.where(active, blk, 0), carry)
    return jax.tree.map(
        lambda n, c: jnp.where(active.reshape(-1, *([1] * (c.ndim - 1))), n, c), new, carry
    )


def paged_attention_xla(
    batch: PagedBatch,
    *,
    sm_scale: float,
    mask: MaskSpec,
    block_keys: int | None = None,
    tile_tokens: int | None = None,
) -> jax.Array:
    """Ragged paged attention with XLA ops (inputs already validated).

    ``block_keys`` overrides :func:`default_block_keys`, ``tile_tokens``
    :func:`default_tile_tokens`. Shapes as in
    :func:`pallas_kernels.paged.ragged_paged_attention`; returns ``[T, hq, d]`` in
    ``q.dtype``, padding rows zero.
    """
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch
    t, hq, d = q.shape
    page_size, hkv = kv_pages.shape[1], kv_pages.shape[2] // 2
    g = hq // hkv
    pages_per_seq = page_indices.shape[1]
    bq = tile_tokens or default_tile_tokens(t, kv_lens.shape[0])
    tiles = query_tiles(t, bq, kv_lens, cu_q_lens, num_seqs)
    w = tiles.seq.shape[0]
    block_keys = block_keys or default_block_keys(w, kv_pages)
    bp = max(1, min(block_keys // page_size, pages_per_seq))
    bk = bp * page_size
    pad = -pages_per_seq % bp  # padded pages are masked by kv_len
    pages = jnp.pad(page_indices, ((0, 0), (0, pad)))[tiles.seq]  # [W, pages_per_seq + pad]
    rows = tiles.start[:, None] + jnp.arange(bq)  # [W, bq]
    q_w = q[jnp.minimum(rows, t - 1)].reshape(w, bq, hkv, g, d).astype(jnp.float32)
    step = _block_step(q_w, kv_pages, pages, tiles, mask, sm_scale=sm_scale, bp=bp)
    q_last = tiles.pos0 + jnp.maximum(tiles.end - tiles.start, 1) - 1
    (_, sink_hi), (lo, hi) = mask.kv_block_ranges(tiles.pos0, q_last, tiles.kv_len, bk)
    carry = (
        jnp.zeros((w, hkv, g, bq, d), jnp.float32),
        jnp.full((w, hkv, g, bq), MASK_VALUE, jnp.float32),
        jnp.zeros((w, hkv, g, bq), jnp.float32),
    )
    if mask.num_sink_tokens:  # blocks [0, sink_hi), then [lo, hi): disjoint
        sink_step = lambda j, c: _guarded(step, j < sink_hi, jnp.full_like(lo, j), c)  # noqa: E731
        carry = lax.fori_loop(0, jnp.max(sink_hi), sink_step, carry)
    window_step = lambda j, c: _guarded(step, lo + j < hi, lo + j, c)  # noqa: E731
    acc, _, l_sum = lax.fori_loop(0, jnp.max(hi - lo), window_step, carry)
    out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]  # [W, hkv, g, bq, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(w * bq, hq, d).astype(q.dtype)
    dest = jnp.where(rows < tiles.end[:, None], rows, t).reshape(-1)  # t: dropped
    return jnp.zeros_like(q).at[dest].set(out, mode="drop")
