"""The oracle of the batched gathered LoRA matmul: each token gathers its own adapter.

    out[t] = scale[i] * (x[t] @ A[i]) @ B[i]     i = adapter_idx[t];  0 where i == -1

``x: [t, d_in]``, ``A: [n, d_in, r]``, ``B: [n, r, d_out]``, ``scale: [n]``. Adapters of
smaller rank are zero-padded to ``r`` (:func:`stack_adapters`); the padding adds nothing.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

RANK_BUCKETS = (8, 16, 32, 64, 128, 256)
"""The ranks stacked adapters are padded to (a new adapter of a rank within the bucket
compiles nothing new)."""


def lora_bgmv_reference(
    x: jax.Array, a: jax.Array, b: jax.Array, adapter_idx: jax.Array, scale: jax.Array
) -> jax.Array:
    """``[t, d_out]`` in ``x.dtype`` (module doc), accumulated in float32."""
    safe = jnp.maximum(adapter_idx, 0)
    f32 = jnp.float32
    h = jnp.einsum("td,tdr->tr", x.astype(f32), a[safe].astype(f32))
    y = jnp.einsum("tr,tro->to", h, b[safe].astype(f32)) * scale[safe].astype(f32)[:, None]
    return jnp.where((adapter_idx >= 0)[:, None], y, 0.0).astype(x.dtype)


def rank_bucket(rank: int, buckets: Sequence[int] = RANK_BUCKETS) -> int:
    """The smallest bucket holding ``rank``.

    Raises:
        ValueError: ``rank`` is above the largest bucket.
    """
    for bucket in sorted(buckets):
        if rank <= bucket:
            return bucket
    raise ValueError(f"LoRA rank {rank} exceeds the largest rank bucket {max(buckets)}; add one")


def stack_adapters(
    pairs: Sequence[tuple[jax.Array, jax.Array]], buckets: Sequence[int] = RANK_BUCKETS
) -> tuple[jax.Array, jax.Array]:
    """``[(A_i: [d_in, r_i], B_i: [r_i, d_out]), ...]`` -> ``A: [n, d_in, R]``,
    ``B: [n, R, d_out]`` with ``R`` the bucket of the largest rank, zero-padded."""
    rank = rank_bucket(max(a.shape[-1] for a, _ in pairs), buckets)
    a = jnp.stack([jnp.pad(a, ((0, 0), (0, rank - a.shape[-1]))) for a, _ in pairs])
    b = jnp.stack([jnp.pad(b, ((0, rank - b.shape[0]), (0, 0))) for _, b in pairs])
    return a, b
