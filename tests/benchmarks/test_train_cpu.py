"""The CPU training benchmark's plain JAX floor is jaxstack's model (the benchmark itself runs
outside the suite; its table is tested on records in test_report.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import plain_llama
from jaxstack.lm import lm_functions
from jaxstack.models.llama import Llama, preset


@pytest.mark.parametrize("name", ["tiny", "100m"])
def test_plain_model_has_the_config_parameter_count(name):
    config = preset(name)
    shapes = jax.eval_shape(lambda: plain_llama.init_params(config, jax.random.key(0)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == config.num_params()


def test_plain_loss_and_grads_equal_jaxstack_llama_on_the_same_params():
    config = preset("tiny")
    model = Llama(config)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
    batch = {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
        "loss_mask": jnp.ones((2, 32), jnp.int32),
    }
    params = model.init(jax.random.key(2), batch["input_ids"])["params"]
    jaxstack_loss = lambda p: lm_functions(model)[0](p, batch, jax.random.key(0))[0]  # noqa: E731
    plain_loss = lambda p: plain_llama.loss_fn(config, p, batch)  # noqa: E731

    expected, expected_grads = jax.jit(jax.value_and_grad(jaxstack_loss))(params)
    mapped = plain_llama.params_from_jaxstack(config, params)
    loss, grads = jax.jit(jax.value_and_grad(plain_loss))(mapped)

    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    expected_grads = plain_llama.params_from_jaxstack(config, expected_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_bf16_dots_route_computes_the_same_loss_and_grads_as_plain_matmuls():
    config = preset("tiny", dtype="bfloat16", num_layers=1)
    params = plain_llama.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
    batch["positions"] = jnp.broadcast_to(jnp.arange(16), (2, 16))
    results = {
        dots: jax.jit(
            jax.value_and_grad(lambda p, d=dots: plain_llama.loss_fn(config, p, batch, d))
        )(params)
        for dots in plain_llama.DOTS
    }
    (loss, grads), (bf16_loss, bf16_grads) = results["xla"], results["bf16"]
    np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
    for got, want in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(grads), strict=True):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-6)
