"""Pure ``jax.numpy`` attention: the oracle every kernel is tested against.

Everything is computed in float32 and cast back to the query dtype. GQA is an
einsum over a ``[b, s, hkv, g, d]`` view of the queries, so K/V are never
repeated. Masks come from :mod:`pallas_kernels.attention.masks`; a query row that sees
no key at all yields zeros (and zero gradients), never NaN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec, segment_visible, soft_cap
from pallas_kernels.attention.validation import check_attention_inputs, check_decode_inputs

_HIGHEST = lax.Precision.HIGHEST


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give 0."""
    s = jnp.where(mask, logits, MASK_VALUE)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(denom == 0.0, 1.0, denom)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Reference multi-head attention with the semantics of ``pallas_kernels.attention``.

    Args:
      q: ``[b, sq, hq, d]`` queries.
      k, v: ``[b, skv, hkv, d]`` keys and values, ``hq % hkv == 0``.
      causal: mask keys after the query position (ends aligned when ``sq != skv``).
      q_segment_ids, kv_segment_ids: ``[b, sq]`` / ``[b, skv]`` int; attend within
        equal ids only. ``kv_segment_ids`` defaults to ``q_segment_ids``.
      sliding_window: key ``j`` visible from query position ``p`` only if ``p - j < window``.
      num_sink_tokens: keys ``j < num_sink_tokens`` stay visible despite the window.
      logit_soft_cap: ``logits -> cap * tanh(logits / cap)`` (after scaling).
      scale: logit scale, default ``1 / sqrt(d)``.

    Returns:
      ``[b, sq, hq, d]`` in ``q.dtype``.
    """
    check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, sliding_window, num_sink_tokens,
        logit_soft_cap, scale,
    )  # fmt: skip
    spec = MaskSpec.for_attention(
        q.shape[1], k.shape[1], causal=causal, sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens,
    )  # fmt: skip
    kv_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    return attend(
        q, k, v, spec, jnp.arange(q.shape[1]), jnp.arange(k.shape[1]), q_segment_ids, kv_ids,
        scale=scale, logit_soft_cap=logit_soft_cap,
    )  # fmt: skip


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    q_index: jax.Array,
    kv_index: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    scale: float | None,
    logit_soft_cap: float | None,
) -> jax.Array:
    """Attention of the queries at sequence indices ``q_index`` ([tq]) to the keys at
    ``kv_index`` ([tk]) of one ``attention`` call; q: ``[b, tq, hq, d]``, k, v:
    ``[b, tk, hkv, d]``, segment ids ``[b, tq]`` / ``[b, tk]`` (or None). The full call is
    ``q_index = arange(sq)``, ``kv_index = arange(skv)``; a block of it gives those rows."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_bsHgd = q.reshape(b, tq, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q_bsHgd, k.astype(jnp.float32), precision=_HIGHEST)
    logits = soft_cap(logits * scale, logit_soft_cap)
    q_pos = q_index[:, None] + spec.q_offset
    mask = spec.visible(q_pos, kv_index[None, :], jnp.inf)  # [tq, tk]
    if q_segment_ids is not None:
        mask = mask & segment_visible(q_segment_ids, kv_segment_ids)[:, None, None]
    p = masked_softmax(logits, mask)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(b, tq, hq, d).astype(q.dtype)


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Reference single-token attention against a KV cache.

    Args:
      q: ``[b, hq, d]``, the query of row ``i`` sits at position ``lengths[i] - 1``.
      k_cache, v_cache: ``[b, S, hkv, d]``; keys ``[0, lengths[i])`` are valid.
      lengths: ``[b]`` int. A row with length 0 returns zeros.
      sliding_window, num_sink_tokens, logit_soft_cap, scale: as in ``attention``.

    Returns:
      ``[b, hq, d]`` in ``q.dtype``.
    """
    check_decode_inputs(
        q, k_cache, v_cache, lengths, sliding_window, num_sink_tokens, logit_soft_cap, scale
    )
    b, hq, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    spec = MaskSpec(
        causal=True,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens if sliding_window is not None else 0,
    )
    q_bHgd = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("bhgd,bkhd->bhgk", q_bHgd, k_cache.astype(jnp.float32), precision=_HIGHEST)
    logits = soft_cap(logits * scale, logit_soft_cap)
    lengths = lengths.astype(jnp.int32)[:, None]
    mask = spec.visible(lengths - 1, jnp.arange(s)[None, :], lengths)  # [b, S]
    p = masked_softmax(logits, mask[:, None, None, :])
    out = jnp.einsum("bhgk,bkhd->bhgd", p, v_cache.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(b, hq, d).astype(q.dtype)
