"""SwiGLU feed-forward block."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharding_rules import constrain


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x: [b, s, embed] -> [b, s, embed], hidden [b, s, mlp]."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        gate = dense(self.hidden_size, "gate")(x)
        up = dense(self.hidden_size, "up")(x)
        hidden = constrain(nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return dense(x.shape[-1], "down")(hidden)
