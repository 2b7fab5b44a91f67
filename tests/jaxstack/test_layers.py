"""The hand-written backward passes of the shared layers equal autodiff (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxstack.layers.dense import dense_dot_general
from jaxstack.layers.mlp import swiglu

DENSE_CASES = {  # x shape, kernel shape, dimension numbers (what flax passes)
    "dense": ((2, 5, 6), (6, 7), (((2,), (0,)), ((), ()))),
    "qkv-general": ((2, 5, 6), (6, 3, 4), (((2,), (0,)), ((), ()))),
    "out-general": ((2, 5, 3, 4), (3, 4, 6), (((2, 3), (0, 1)), ((), ()))),
    "batched (falls through)": ((3, 5, 6), (3, 6, 7), (((2,), (1,)), ((0,), (0,)))),
}


def _value_and_grads(fn, *args):
    out, pull = jax.vjp(fn, *args)
    cotangent = jax.random.normal(jax.random.PRNGKey(9), out.shape, out.dtype)
    return out, pull(cotangent)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_dot_general_equals_dot_general(case):
    x_shape, w_shape, dims = DENSE_CASES[case]
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
    out, grads = _value_and_grads(lambda x, w: dense_dot_general(x, w, dims), x, w)
    ref, ref_grads = _value_and_grads(lambda x, w: lax.dot_general(x, w, dims), x, w)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_equals_autodiff(dtype):
    gate, up = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 8)).astype(dtype)
    out, grads = _value_and_grads(swiglu, gate, up)
    ref, ref_grads = _value_and_grads(lambda g, u: jax.nn.silu(g) * u, gate, up)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), rtol=tol, atol=tol)
