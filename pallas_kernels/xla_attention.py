"""Blocked attention in plain XLA: the ``"xla"`` implementation for long causal sequences.

The query sequence is cut into blocks of ``block_q``; block ``i`` attends only to the keys
its mask can reach (up to its last query under ``causal``; from its first window start under
a window without sinks), through the reference's ``attend``. Masked-out key blocks are
never computed, which roughly halves causal attention's work and memory against the
reference (the oracle, which builds the full score matrix), with identical results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.masks import MaskSpec
from pallas_kernels.reference import attend


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
    """``[b, sq, hq, d]`` attention of validated inputs, one query block at a time."""
    sq, skv = q.shape[1], k.shape[1]
    outputs = []
    for start in range(0, sq, block_q):
        stop = min(start + block_q, sq)
        kv_lo, kv_hi = 0, skv
        if spec.causal:
            kv_hi = min(skv, stop + spec.q_offset)
        if spec.sliding_window is not None and not spec.num_sink_tokens:
            kv_lo = max(0, start + spec.q_offset - spec.sliding_window + 1)
        if kv_hi <= kv_lo:  # no visible key: the reference's zeros
            outputs.append(jnp.zeros((q.shape[0], stop - start, *q.shape[2:]), q.dtype))
            continue
        outputs.append(
            attend(
                q[:, start:stop],
                k[:, kv_lo:kv_hi],
                v[:, kv_lo:kv_hi],
                spec,
                jnp.arange(start, stop),
                jnp.arange(kv_lo, kv_hi),
                None if q_segment_ids is None else q_segment_ids[:, start:stop],
                None if kv_segment_ids is None else kv_segment_ids[:, kv_lo:kv_hi],
                scale=scale,
                logit_soft_cap=logit_soft_cap,
            )  # fmt: skip
        )
    return jnp.concatenate(outputs, axis=1)
