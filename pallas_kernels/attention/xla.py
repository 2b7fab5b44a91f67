"""Blocked attention in plain XLA: the ``"xla"`` implementation (CPU, and the fallback).

Same semantics and float32 math as ``reference.attention_reference``, arranged for XLA:CPU:

* **Heads first.** q: ``[b, sq, hkv * g, d]`` is viewed as ``[b, hkv, sq, g, d]`` and k, v
  as ``[b, hkv, skv, d]`` (one transpose each), so that the ``g`` query heads of a KV head
  and a block of query rows form one ``[tq * g, d]`` matrix: every score and value matmul
  is a plain batched matmul over ``(b, hkv)`` and no logits-sized array is ever transposed.
* **Blocks.** Query rows are cut into blocks of ``block_q``; block ``i`` sees only the key
  range its mask can reach (``block_ranges``): up to its last query under ``causal``, from
  its first window start under a window without sinks. Keys outside it are never computed,
  which roughly halves causal attention's work against the reference's full score matrix.
* **A hand-written backward** (``jax.custom_vjp``). The forward keeps each block's
  probabilities ``p`` (``reference.masked_softmax``, so rows that see no key stay zeros);
  the backward is the textbook softmax one, with every matmul's large operand in its
  natural layout::

      s  = cap(q k^T * scale)          p = masked_softmax(s)          o = p v
      dv = p^T do                      dp = do v^T
      ds = p * (dp - rowsum(do * o)) * (1 - (s / cap)^2) * scale       (no cap: no factor)
      dq = ds k                        dk = ds^T q

  ``dk`` and ``dv`` are accumulated transposed (``[b, hkv, d, skv]``) so that ``p`` and
  ``ds`` enter their matmuls as stored, and transposed once at the end.

Shapes in the code: ``b`` batch, ``h`` KV heads, ``q``/``k`` query/key rows of a block,
``g`` query heads per KV head, ``d`` head width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.masks import MaskSpec, segment_visible, soft_cap
from pallas_kernels.attention.reference import masked_softmax

Block = tuple[int, int, int, int]
"""``(q_start, q_stop, kv_lo, kv_hi)``: query rows ``[q_start, q_stop)`` see keys only in
``[kv_lo, kv_hi)`` (an empty key range when ``kv_hi == kv_lo``)."""


def block_ranges(spec: MaskSpec, sq: int, skv: int, block_q: int) -> tuple[Block, ...]:
    """The query blocks of ``block_q`` rows and the key range each one's mask can reach."""
    blocks = []
    for start in range(0, sq, block_q):
        stop = min(start + block_q, sq)
        kv_lo, kv_hi = 0, skv
        if spec.causal:
            kv_hi = min(skv, stop + spec.q_offset)
        if spec.sliding_window is not None and not spec.num_sink_tokens:
            kv_lo = max(0, start + spec.q_offset - spec.sliding_window + 1)
        blocks.append((start, stop, kv_lo, max(kv_lo, kv_hi)))
    return tuple(blocks)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: MaskSpec,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    scale: float | None,
    logit_soft_cap: float | None,
    block_q: int = 128,
) -> jax.Array:
    """``[b, sq, hq, d]`` attention of validated inputs (module doc), in ``q.dtype``.

    q: ``[b, sq, hq, d]``; k, v: ``[b, skv, hkv, d]``; segment ids ``[b, sq]`` / ``[b, skv]``
    or None (``kv_segment_ids`` must be given whenever ``q_segment_ids`` is).
    """
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    f32 = jnp.float32
    q_bhsgd = q.astype(f32).reshape(b, sq, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
    k_bhsd, v_bhsd = (x.astype(f32).transpose(0, 2, 1, 3) for x in (k, v))
    out = _attention(
        q_bhsgd,
        k_bhsd,
        v_bhsd,
        q_segment_ids,
        kv_segment_ids,
        block_ranges(spec, sq, skv, block_q),
        spec,
        1.0 / math.sqrt(d) if scale is None else scale,
        logit_soft_cap,
    )
    return out.transpose(0, 2, 1, 3, 4).reshape(b, sq, hq, d).astype(q.dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]]):
    """Float32 matmul batched over the leading ``(b, h)`` dims of both operands."""
    dims = (contract, ((0, 1), (0, 1)))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)


def _visible(spec: MaskSpec, block: Block, q_segment_ids, kv_segment_ids) -> jax.Array:
    """A block's mask, ``[1 or b, 1, q, 1, k]`` against its ``[b, h, q, g, k]`` scores."""
    start, stop, kv_lo, kv_hi = block
    q_pos = jnp.arange(start, stop)[:, None] + spec.q_offset
    mask = spec.visible(q_pos, jnp.arange(kv_lo, kv_hi)[None, :], jnp.inf)[None]
    if q_segment_ids is not None:
        q_ids, kv_ids = q_segment_ids[:, start:stop], kv_segment_ids[:, kv_lo:kv_hi]
        mask = mask & segment_visible(q_ids, kv_ids)
    return mask[:, None, :, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_segment_ids, kv_segment_ids, blocks, spec, scale, cap):
    """q: [b, h, sq, g, d], k, v: [b, h, skv, d] float32 -> o: [b, h, sq, g, d]."""
    return _attention_fwd(q, k, v, q_segment_ids, kv_segment_ids, blocks, spec, scale, cap)[0]


def _attention_fwd(q, k, v, q_segment_ids, kv_segment_ids, blocks, spec, scale, cap):
    """The output and, per block, its probabilities (and capped scores under a cap)."""
    outputs, saved = [], []
    for block in blocks:
        start, stop, kv_lo, kv_hi = block
        if kv_hi == kv_lo:  # no visible key: the reference's zeros
            outputs.append(jnp.zeros_like(q[:, :, start:stop]))
            saved.append(None)
            continue
        s = _dot(q[:, :, start:stop], k[:, :, kv_lo:kv_hi], ((4,), (3,)))  # [b, h, q, g, k]
        s = soft_cap(s * scale, cap)
        p = masked_softmax(s, _visible(spec, block, q_segment_ids, kv_segment_ids))
        outputs.append(_dot(p, v[:, :, kv_lo:kv_hi], ((4,), (2,))))  # [b, h, q, g, d]
        saved.append((p, None if cap is None else s))
    out = jnp.concatenate(outputs, axis=2)
    return out, (q, k, v, out, saved)


def _attention_bwd(blocks, spec, scale, cap, residuals, d_out):
    """The module doc's backward, block by block; segment ids get no cotangent."""
    del spec
    q, k, v, out, saved = residuals
    b, h, skv, d = k.shape
    dk_t = jnp.zeros((b, h, d, skv), k.dtype)  # dk, dv transposed: [b, h, d, skv]
    dv_t = jnp.zeros((b, h, d, skv), v.dtype)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [b, h, sq, g, 1]
    dq = []
    for (start, stop, kv_lo, kv_hi), block_saved in zip(blocks, saved, strict=True):
        if block_saved is None:
            dq.append(jnp.zeros_like(q[:, :, start:stop]))
            continue
        p, s = block_saved
        q_blk, do_blk = q[:, :, start:stop], d_out[:, :, start:stop]
        k_blk, v_blk = k[:, :, kv_lo:kv_hi], v[:, :, kv_lo:kv_hi]
        rows = ((2, 3), (2, 3))  # contract the (q, g) rows: [b, h, d, k]
        dv_t = dv_t.at[:, :, :, kv_lo:kv_hi].add(_dot(do_blk, p, rows))
        ds = p * (_dot(do_blk, v_blk, ((4,), (3,))) - delta[:, :, start:stop])
        if cap is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
            ds = ds * (1.0 - jnp.square(s / cap))
        ds = ds * scale
        dq.append(_dot(ds, k_blk, ((4,), (2,))))
        dk_t = dk_t.at[:, :, :, kv_lo:kv_hi].add(_dot(q_blk, ds, rows))
    dk, dv = jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3)
    return jnp.concatenate(dq, axis=2), dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
