"""SwiGLU feed-forward block."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxstack.layers import tensor_parallel
from sharding_rules import constrain


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``, elementwise in the inputs' dtype.

    Its backward keeps only ``gate`` and ``up`` (the two matmul outputs, alive anyway) and
    recomputes the sigmoid, so the forward is one pass over ``[b, s, mlp]`` instead of
    autodiff's three (it would store the sigmoid and the SiLU for the backward)::

        d_up   = g * silu(gate)
        d_gate = g * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return d_gate, g * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); x: [b, s, embed] -> [b, s, embed], hidden [b, s, mlp]."""

    hidden_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    tensor_parallel: str = "plain"
    """The mode of ``jaxstack.layers.tensor_parallel`` that applies: in the split modes gate
    and up all-gather x, split over the sequence on ``tensor``, and down reduce-scatters back
    to that layout (``collective_matmul``: in ring steps overlapping the matmuls)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        column, row = tensor_parallel.dot_generals(self.tensor_parallel)
        dense = lambda features, name, dot_general: nn.Dense(  # noqa: E731
            features,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=dot_general,
            name=name,
        )
        # in the split modes x is gathered once for both
        projections = [dense(self.hidden_size, name, column) for name in ("gate", "up")]
        gate, up = tensor_parallel.project(x, projections, self.tensor_parallel)
        hidden = constrain(swiglu(gate, up), ("batch", "seq", "mlp"))
        return dense(x.shape[-1], "down", row)(hidden)
