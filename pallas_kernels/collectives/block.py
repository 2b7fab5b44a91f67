"""One (query block, key block) pair of attention, with its log-sum-exp: the unit of work of
context-parallel attention, written so that partial results over key blocks merge exactly.

Forward, over the keys ``kv`` of one block (``lse`` is the row's log-sum-exp)::

    s   = cap(q k^T * scale)               masked where the key is not visible
    lse = log sum_j exp(s_j)               o = softmax(s) v

Merging two partial results of the same rows over disjoint key sets (online softmax)::

    lse = logaddexp(lse_a, lse_b)          o = o_a exp(lse_a - lse) + o_b exp(lse_b - lse)

Backward of one block given the *final* ``o`` and ``lse`` of the whole row
(``delta = rowsum(do * o)``), the flash-attention backward restricted to the block::

    p  = exp(s - lse)                       dv = p^T do        dp = do v^T
    ds = p * (dp - delta) * (1 - (s / cap)^2) * scale          (no cap: no factor)
    dq = ds k                               dk = ds^T q

A row that sees no key has ``lse = MASK_VALUE`` (finite, so merges stay NaN-free) and
``o = 0``, as the reference gives. Visibility is decided from *global* sequence indices
(``q_index``, ``kv_index``) with :class:`pallas_kernels.attention.masks.MaskSpec` and segment
ids, so a block may hold any positions of the sequence (a zig-zag shard, a ring step's keys).

Shapes: q, o, do ``[b, q, h, g, d]`` (``h`` KV heads, ``g`` query heads per KV head);
k, v ``[b, k, h, d]``; lse, delta ``[b, q, h, g]``; all float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.masks import MASK_VALUE, MaskSpec, segment_visible, soft_cap

_HIGHEST = lax.Precision.HIGHEST


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=_HIGHEST)


def visible(
    spec: MaskSpec,
    q_index: jax.Array,
    kv_index: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> jax.Array:
    """``[1 or b, q, 1, 1, k]`` bool mask of a block, from global indices and segment ids."""
    mask = spec.visible(q_index[:, None], kv_index[None, :], jnp.inf)[None]  # [1, q, k]
    if q_segment_ids is not None:
        mask = mask & segment_visible(q_segment_ids, kv_segment_ids)
    return mask[:, :, None, None, :]


def _scores(q, k, scale, cap):
    """Capped scores ``[b, q, h, g, k]``, masked or not."""
    return soft_cap(_einsum("bqhgd,bkhd->bqhgk", q, k) * scale, cap)


def block_forward(q, k, v, mask, *, scale: float, cap: float | None):
    """``(o, lse)`` of the queries over this block's keys (module doc)."""
    s = jnp.where(mask, _scores(q, k, scale, cap), MASK_VALUE)
    m = jnp.max(s, axis=-1)
    e = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(e, axis=-1)
    seen = denom > 0.0
    o = _einsum("bqhgk,bkhd->bqhgd", e, v) / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), MASK_VALUE)
    return o, lse


def merge(o_a, lse_a, o_b, lse_b):
    """Online-softmax merge of two partial ``(o, lse)`` over disjoint keys (module doc)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    o = o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None]
    return o, lse


def block_backward(q, k, v, do, lse, delta, mask, *, scale: float, cap: float | None):
    """``(dq, dk, dv)`` of one block from the row's final ``lse`` and ``delta`` (module doc)."""
    s = _scores(q, k, scale, cap)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dv = _einsum("bqhgk,bqhgd->bkhd", p, do)
    ds = p * (_einsum("bqhgd,bkhd->bqhgk", do, v) - delta[..., None])
    if cap is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
        ds = ds * (1.0 - jnp.square(s / cap))
    ds = ds * scale
    return _einsum("bqhgk,bkhd->bqhgd", ds, k), _einsum("bqhgk,bqhgd->bkhd", ds, q), dv
