"""Generation: the KV cache gives exactly the tokens of full recomputation; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.generate import generate, sample_logits
from jaxstack.models import Llama, preset


@pytest.fixture(scope="module")
def model_and_params():
    model = Llama(preset("tiny", num_layers=2))
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
    return model, params


def _greedy_without_cache(model, params, prompt, steps):
    """Full forward over the whole sequence at every step (right-padded to one fixed length,
    which causal attention makes invisible, so the forward compiles once)."""
    forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
    tokens = np.zeros((1, len(prompt) + steps), np.int32)
    tokens[0, : len(prompt)] = prompt
    for pos in range(len(prompt), len(prompt) + steps):
        tokens[0, pos] = int(jnp.argmax(forward(tokens)[0, pos - 1]))
    return tokens[0, len(prompt) :].tolist()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_with_cache_equals_recomputation(model_and_params, scan_layers):
    model, params = model_and_params
    if scan_layers:
        model = Llama(model.config.replace(scan_layers=True))
        layers = [params[f"layers_{i}"] for i in range(model.config.num_layers)]
        params = {k: v for k, v in params.items() if not k.startswith("layers_")}
        params["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    prompts = [[5, 6, 7, 8, 9, 10], [42], [100, 101, 102]]  # ragged prompt lengths
    out = generate(model, params, prompts, max_new_tokens=10)
    for prompt, tokens in zip(prompts, out, strict=True):
        assert tokens == _greedy_without_cache(model, params, prompt, 10)


def test_rows_stop_at_eos(model_and_params):
    model, params = model_and_params
    prompts = [[5, 6, 7], [42, 43]]
    free = generate(model, params, prompts, max_new_tokens=8)
    eos = free[0][2]
    stopped = generate(model, params, prompts, max_new_tokens=8, eos_id=eos)
    first = free[0].index(eos)
    assert stopped[0] == free[0][: first + 1]
    expected_second = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == expected_second


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]
    top1 = sample_logits(logits, keys, temperature=1.0, top_k=1)
    assert np.all(np.asarray(top1) == 0)
    nucleus = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.7))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.7
    free = np.asarray(sample_logits(logits, keys, temperature=1.0))
    assert set(free.tolist()) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.bincount(free, minlength=4) / len(free),
                               [0.5, 0.3, 0.15, 0.05], atol=0.04)  # fmt: skip


def test_bad_generation_input(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=1.5)
