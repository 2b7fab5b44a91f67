"""The dataflow analysis: roles of parameter dims, and traversal of call / loop primitives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_models as tm
from jax.sharding import PartitionSpec as P

from sharding_rules import analyze_model, param_rules
from sharding_rules.trace import BATCH, CONTRACT, FREE, LAYER, VOCAB, WIDTH

D, F, L = 16, 32, 3
X = jax.ShapeDtypeStruct((4, D), jnp.float32)
PAIR = {
    "w1": jax.ShapeDtypeStruct((D, F), jnp.float32),
    "w2": jax.ShapeDtypeStruct((F, D), jnp.float32),
}


def tp2(apply_fn, params, *args):
    rules = param_rules(analyze_model(apply_fn, params, *args), {"tensor": 2})
    return {path: rule.spec for path, rule in rules.items()}


@jax.custom_vjp
def custom_relu(x):
    return jnp.maximum(x, 0.0)


custom_relu.defvjp(lambda x: (custom_relu(x), x), lambda x, g: (g * (x > 0),))


def test_pair_through_remat_custom_vjp_cond_callback_and_jit():
    def apply(p, x):
        h = jax.checkpoint(lambda a, w: a @ w)(x, p["w1"])
        h = custom_relu(h)
        h = jax.lax.cond(x[0, 0] > 0, jnp.tanh, jnp.sin, h)
        h = jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(h.shape, h.dtype), h)
        return jax.jit(lambda a, w: a @ w)(h, p["w2"])

    assert tp2(apply, PAIR, X) == {"w1": P(None, "tensor"), "w2": P("tensor", None)}


def test_opaque_gqa_kernel_is_followed_positionally():
    h, kvh, dh = 4, 2, 8
    params = {
        "q": jax.ShapeDtypeStruct((D, h * dh), jnp.float32),
        "k": jax.ShapeDtypeStruct((D, kvh * dh), jnp.float32),
        "v": jax.ShapeDtypeStruct((D, kvh * dh), jnp.float32),
        "o": jax.ShapeDtypeStruct((h * dh, D), jnp.float32),
    }

    def kernel(q, k, v):  # stands in for a Pallas attention kernel: never run here
        return np.asarray(q)

    def apply(p, x):
        b, s, _ = x.shape
        q = (x @ p["q"]).reshape(b, s, h, dh)
        k = (x @ p["k"]).reshape(b, s, kvh, dh)
        v = (x @ p["v"]).reshape(b, s, kvh, dh)
        out = jax.pure_callback(kernel, jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v)
        return x + out.reshape(b, s, h * dh) @ p["o"]

    x = jax.ShapeDtypeStruct((2, 5, D), jnp.float32)
    assert tp2(apply, params, x) == {
        "q": P(None, "tensor"),
        "k": P(None, "tensor"),
        "v": P(None, "tensor"),
        "o": P("tensor", None),
    }


def test_fori_loop_over_stacked_params():
    layers = 64
    params = {
        "w1": jax.ShapeDtypeStruct((layers, D, F), jnp.float32),
        "w2": jax.ShapeDtypeStruct((layers, F, D), jnp.float32),
    }

    def apply(p, x):
        def body(i, h):
            return h + jax.nn.relu(h @ p["w1"][i]) @ p["w2"][i]

        return jax.lax.fori_loop(0, layers, body, x)

    assert tp2(apply, params, X) == {"w1": P(None, None, "tensor"), "w2": P(None, "tensor", None)}
    # the indexed layer axis is the only one fsdp=64 divides, and it is left alone
    rules = param_rules(analyze_model(apply, params, X), {"fsdp": layers})
    assert [r.spec for r in rules.values()] == [P(None, None, None)] * 2


def test_reduced_hidden_is_not_a_pair():
    def apply(p, x):
        h = x @ p["w1"]
        h = (h - h.mean(-1, keepdims=True)) / (h.std(-1, keepdims=True) + 1e-6)
        return h @ p["w2"]

    # w1's output is normalised (reduced over), so w1 -> w2 is no Megatron pair; w2 alone
    # reaches the output and is sharded like an LM head.
    assert tp2(apply, PAIR, X) == {"w1": P(None, None), "w2": P(None, "tensor")}


def test_static_example_args_and_concrete_arrays():
    def apply(p, x, square):
        h = x @ p["w1"]
        return (h * h if square else h) @ p["w2"]

    params = {k: jnp.zeros(v.shape) for k, v in PAIR.items()}
    assert tp2(apply, params, jnp.zeros((4, D)), True) == {
        "w1": P(None, "tensor"),
        "w2": P("tensor", None),
    }


def test_roles_of_scanned_llama():
    model, ids = tm.LlamaLike(scan=True), jnp.zeros((2, 6), jnp.int32)
    an = analyze_model(model.apply, tm.shapes_of(model, ids), ids)
    leaf = {path: i for i, path in enumerate(an.paths)}
    q = leaf["params/layers/q_proj/kernel"]
    assert an.roles[(q, 0)] == {LAYER}
    assert an.roles[(q, 1)] == {CONTRACT}
    assert an.roles[(q, 2)] == {FREE}
    embed = leaf["params/embed/embedding"]
    assert an.roles[(embed, 0)] == {VOCAB}
    assert an.roles[(embed, 1)] == {WIDTH}
    assert (leaf["params/layers/attn_norm"], 1) not in an.roles


def test_roles_of_expert_weights():
    model = tm.MoE()
    x = jnp.zeros((2, 6, tm.D))
    an = analyze_model(model.apply, tm.shapes_of(model, x), x)
    w_in = an.paths.index("params/w_in")
    assert [an.roles[(w_in, d)] for d in range(3)] == [{BATCH}, {CONTRACT}, {FREE}]


def test_params_without_arrays_raise():
    with pytest.raises(ValueError, match="no array leaves"):
        analyze_model(lambda p, x: x, {}, X)
