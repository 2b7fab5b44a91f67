"""The batched LoRA matmul as two dense XLA matmuls over every stacked adapter (CPU, TPU).

Instead of gathering a ``[d_in, r]`` matrix per token, project each token through all ``n``
adapters at once and keep its own with a scaled one-hot::

    h = x @ A.reshape(d_in, n*r)      [t, n*r]    (A as [d_in, n, r])
    h = h * (onehot(idx) * scale)     [t, n, r]   (the -1 row is all zero)
    out = h @ B.reshape(n*r, d_out)   [t, d_out]

``n * r`` is small for serving (``max_loras x max_lora_rank``), so this costs about one extra
projection of width ``n * r`` and never copies weights per token.
"""

import jax
import jax.numpy as jnp


def lora_bgmv_xla(
    x: jax.Array, a: jax.Array, b: jax.Array, adapter_idx: jax.Array, scale: jax.Array
) -> jax.Array:
    """Same contract as ``lora_bgmv_reference``."""
    (t, d_in), (n, _, r), d_out = x.shape, a.shape, b.shape[-1]
    h = jnp.dot(x, jnp.swapaxes(a, 0, 1).reshape(d_in, n * r).astype(x.dtype),
                preferred_element_type=jnp.float32)  # fmt: skip
    pick = (adapter_idx[:, None] == jnp.arange(n)[None, :]) * scale.astype(jnp.float32)
    h = (h.reshape(t, n, r) * pick[:, :, None]).reshape(t, n * r)
    out = jnp.dot(h.astype(x.dtype), b.reshape(n * r, d_out).astype(x.dtype),
                  preferred_element_type=jnp.float32)  # fmt: skip
    return out.astype(x.dtype)
