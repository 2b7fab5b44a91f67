"""The blocked "xla" implementation equals the reference (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention, attention_reference

CASES = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "window": dict(causal=True, sliding_window=20),
    "window-sinks": dict(causal=True, sliding_window=20, num_sink_tokens=3),
    "segments-softcap": dict(causal=True, segments=True, logit_soft_cap=5.0),
}


SHAPES = [(case, 100, 100) for case in CASES] + [
    (case, sq, skv)
    for case in CASES
    if not CASES[case].get("segments")
    for sq, skv in [(70, 100), (100, 60)]
]  # segment ids pair queries and keys of one sequence: sq == skv only; with sq > skv and the
# ends aligned, the first causal query blocks see no key at all (zeros, zero gradients)


@pytest.mark.parametrize("case, sq, skv", SHAPES)
def test_blocked_xla_equals_reference(case, sq, skv):
    options = dict(CASES[case])
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (2, sq, 4, 16))
    k = jax.random.normal(keys[1], (2, skv, 2, 16))
    v = jax.random.normal(keys[2], (2, skv, 2, 16))
    if options.pop("segments", False):
        ids = jnp.cumsum(jax.random.bernoulli(keys[3], 0.05, (2, sq)), axis=1).astype(jnp.int32)
        options["q_segment_ids"] = ids

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, **options)))

    blocked = lambda q, k, v, **o: attention(q, k, v, implementation="xla", block_q=32, **o)  # noqa: E731
    out, grads = jax.value_and_grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
    ref, ref_grads = jax.value_and_grad(
        lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2)
    )(q, k, v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        blocked(q, k, v, **options), attention_reference(q, k, v, **options), atol=1e-5
    )
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_blocked_xla_keeps_bfloat16_and_matches_the_reference():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (1, 40, 4, 16), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, 40, 2, 16), jnp.bfloat16) for key in keys[1:])

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    blocked = lambda q, k, v: attention(q, k, v, implementation="xla", block_q=16)  # noqa: E731
    out, grads = jax.value_and_grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
    ref, ref_grads = jax.value_and_grad(
        lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2)
    )(q, k, v)
    assert blocked(q, k, v).dtype == jnp.bfloat16
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), r.astype(jnp.float32), atol=1e-2)
