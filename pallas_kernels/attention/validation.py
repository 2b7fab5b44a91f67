"""Argument checks for the attention ops, raised where bad input enters."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")


def _check_mask_options(
    sliding_window: int | None,
    num_sink_tokens: int,
    logit_soft_cap: float | None,
    scale: float | None,
) -> None:
    is_int = isinstance(sliding_window, int) and not isinstance(sliding_window, bool)
    if sliding_window is not None and (not is_int or sliding_window < 1):
        raise ValueError(
            f"sliding_window must be a positive int or None (no window), got {sliding_window!r}."
        )
    if not isinstance(num_sink_tokens, int) or num_sink_tokens < 0:
        raise ValueError(f"num_sink_tokens must be an int >= 0, got {num_sink_tokens!r}.")
    if logit_soft_cap is not None and not (
        isinstance(logit_soft_cap, int | float) and logit_soft_cap > 0
    ):
        raise ValueError(
            f"logit_soft_cap must be a positive number or None (no capping), got "
            f"{logit_soft_cap!r}."
        )
    if scale is not None and not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(d)), got {scale!r}.")


def check_attention_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    sliding_window: int | None,
    num_sink_tokens: int,
    logit_soft_cap: float | None,
    scale: float | None,
) -> None:
    """Validate ``attention`` arguments; raise ``ValueError``/``TypeError`` naming the fix."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, seq, heads, head_dim], got shape {x.shape}."
            )
        _check_floating(name, x)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}.")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them "
            "to the compute dtype before calling attention."
        )
    b, sq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"q {q.shape} and k {k.shape} must agree on batch (dim 0) and head_dim (dim 3)."
        )
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for "
            "grouped-query attention."
        )
    skv = k.shape[1]
    if kv_segment_ids is not None and q_segment_ids is None:
        raise ValueError("kv_segment_ids was given without q_segment_ids; pass both or neither.")
    if q_segment_ids is not None:
        if kv_segment_ids is None and sq != skv:
            raise ValueError(
                f"kv_segment_ids defaults to q_segment_ids only when sq == skv (got {sq} vs "
                f"{skv}); pass kv_segment_ids of shape ({b}, {skv})."
            )
        for name, ids, s in (
            ("q_segment_ids", q_segment_ids, sq),
            ("kv_segment_ids", kv_segment_ids, skv),
        ):
            if ids is None:
                continue
            if ids.shape != (b, s):
                raise ValueError(f"{name} must have shape ({b}, {s}), got {ids.shape}.")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {ids.dtype}.")
    _check_mask_options(sliding_window, num_sink_tokens, logit_soft_cap, scale)


def check_decode_inputs(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    sliding_window: int | None,
    num_sink_tokens: int,
    logit_soft_cap: float | None,
    scale: float | None,
) -> None:
    """Validate ``decode_attention`` arguments; raise naming the fix."""
    if q.ndim != 3:
        raise ValueError(
            f"q must have rank 3 [batch, heads, head_dim] (one token per row), got {q.shape}."
        )
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, max_len, kv_heads, head_dim], got {x.shape}."
            )
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_floating(name, x)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {k_cache.shape} and "
            f"{v_cache.shape}."
        )
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(
            f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}."
        )
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(
            f"q {q.shape} and k_cache {k_cache.shape} must agree on batch and head_dim."
        )
    if hq % k_cache.shape[2]:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({k_cache.shape[2]})."
        )
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer array of shape ({b},), got {lengths.dtype}{lengths.shape}."
        )
    _check_mask_options(sliding_window, num_sink_tokens, logit_soft_cap, scale)
