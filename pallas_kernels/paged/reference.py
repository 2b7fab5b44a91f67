"""Pure ``jax.numpy`` ragged paged attention: the oracle the kernels are tested against.

Every row gathers its sequence's whole page list (``[T, pages_per_seq * page_size]`` keys
per kv head) and takes a masked softmax in float32: obviously correct, memory ``T`` times
the longest sequence. Use ``implementation="xla"`` for a path that scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.masks import MaskSpec
from pallas_kernels.attention.reference import masked_softmax
from pallas_kernels.paged.layout import PagedBatch, query_tiles, split_kv

_HIGHEST = lax.Precision.HIGHEST


def paged_attention_reference(
    batch: PagedBatch,
    *,
    sm_scale: float,
    mask: MaskSpec,
) -> jax.Array:
    """Ragged paged attention (inputs already validated; ``mask``: causal, window, sinks).

    Shapes as in :func:`pallas_kernels.paged.ragged_paged_attention`; returns
    ``[T, hq, d]`` in ``q.dtype`` with padding rows zero.
    """
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = batch
    t, hq, d = q.shape
    h2 = kv_pages.shape[2]
    hkv = h2 // 2
    rows = query_tiles(t, 1, kv_lens, cu_q_lens, num_seqs)  # one tile per row
    k, v = split_kv(kv_pages[page_indices[rows.seq]])  # [T, pages_per_seq, page_size, hkv, d]
    k, v = (x.reshape(t, -1, hkv, d).astype(jnp.float32) for x in (k, v))  # [T, L, hkv, d]
    q_thgd = q.reshape(t, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("thgd,tkhd->thgk", q_thgd, k, precision=_HIGHEST) * sm_scale
    kv_pos = jnp.arange(k.shape[1])[None, :]
    visible = mask.visible(rows.pos0[:, None], kv_pos, rows.kv_len[:, None])  # [T, L]
    p = masked_softmax(logits, visible[:, None, None, :])
    out = jnp.einsum("thgk,tkhd->thgd", p, v, precision=_HIGHEST)
    return out.reshape(t, hq, d).astype(q.dtype)
