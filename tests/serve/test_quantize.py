"""Int8 serving weights: the product's error stays inside the per-channel rounding bound, the
logits stay within a stated tolerance of float32 (and a scale on the wrong axis would not),
and ``js.LLM(quantize="int8")`` serves the quantized model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.cli import build_parser
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve.quantize import (
    SCALE,
    dense_interceptor,
    head_logits,
    matmul,
    quantize_kernel,
    quantize_params,
)

LOGITS_TOLERANCE = 0.10
"""Relative RMS error of int8 logits, per vocabulary entry (the worst one). Rounding to
nearest with a per-channel scale ``max|w| / 127`` gives one product a relative error of
``(max/rms) / (127 * sqrt(12))``: ~0.7% for Gaussian-like channels of 128-384 inputs
(max/rms ~ 3). Independent errors of the 15 products on a logit's path (two blocks of seven,
the head) add in quadrature: sqrt(15) * 0.7% ~ 2.7% for a typical entry, and the worst of
259 entries (estimated over 128 tokens) lies within about twice that: 10% bounds it, while
one scale per input channel rounds the small output channels away (tens of %)."""


def _spread(kernel: jax.Array, key, num_in: int) -> jax.Array:
    """``kernel`` with its output channels scaled over two decades, as trained weights'
    channel norms differ: a scale on the wrong axis then loses the small channels."""
    factors = 10.0 ** jax.random.uniform(key, kernel.shape[num_in:], minval=-1.5, maxval=0.5)
    return kernel * factors


def _num_in(path) -> int:
    return 2 if getattr(path[-2], "key", None) == "o" else 1


@pytest.fixture(scope="module")
def spread_model(tiny):
    model, params = tiny
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(leaves)))
    spread = jax.tree_util.tree_map_with_path(
        lambda p, x: _spread(x, next(keys), _num_in(p)) if p[-1].key == "kernel" else x, params
    )
    return model, spread


def _logits(model, params, ids):
    return jax.jit(lambda p, ids: _float_logits(model, p, ids))(params, ids)


def _float_logits(model, params, ids):
    hidden = model.apply({"params": params}, ids, return_hidden=True)
    return jnp.dot(hidden, model.head_kernel(params)).astype(jnp.float32)


def _int8_logits(model, params, ids):
    with nn.intercept_methods(dense_interceptor):
        hidden = model.apply({"params": params}, ids, return_hidden=True)
    return head_logits(hidden, params["lm_head"])


def _relative_error(approx, exact) -> float:
    """The worst vocabulary entry's RMS error over its logits' spread."""
    exact = np.asarray(exact).reshape(-1, exact.shape[-1])
    error = np.asarray(approx).reshape(exact.shape) - exact
    return float(np.max(np.sqrt(np.mean(error**2, axis=0)) / exact.std(axis=0)))


def test_int8_product_stays_within_the_rounding_bound():
    kx, kw, ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (5, 96))
    w = _spread(jax.random.normal(kw, (96, 40)), ks, 1)
    q, scale = quantize_kernel(w, 1)
    assert q.dtype == jnp.int8 and scale.shape == (40,)
    # activations keep ~15 bits on CPU (quantize._int8_product): |x - x^| <= dx
    dx = jnp.abs(x).max(axis=1, keepdims=True) / (2 * 127 * 254)
    # |x w - x^ w^| <= |x| |w - w^| + |x - x^| |w| + |x - x^| |w - w^|, per output channel
    bound = (
        jnp.abs(x).sum(1, keepdims=True) * scale / 2
        + dx * jnp.abs(w).sum(0)
        + x.shape[1] * dx * scale / 2
    )
    for rows in (x, x[:1]):
        err = jnp.abs(matmul(rows, q, scale, 1) - rows @ w)
        assert bool(jnp.all(err <= bound[: rows.shape[0]] * (1 + 1e-4) + 1e-6))
    # the bound is tight enough to catch a scale per input channel
    q_in, scale_in = quantize_kernel(w.T, 1)
    wrong = x @ (q_in.T.astype(jnp.float32) * scale_in[:, None])
    assert not bool(jnp.all(jnp.abs(wrong - x @ w) <= bound))


def test_int8_logits_within_tolerance_of_float32(spread_model):
    model, params = spread_model
    quantized = quantize_params(params)
    attn = quantized["layers_0"]["attn"] if "layers_0" in quantized else None
    if attn is not None:  # per output channel: q [embed, heads, d] -> [heads, d]; o -> [embed]
        assert attn["q"][SCALE].shape == attn["q"]["kernel"].shape[1:]
        assert attn["o"][SCALE].shape == attn["o"]["kernel"].shape[2:]
    assert quantized["lm_head"]["kernel"].dtype == jnp.int8
    assert quantized["embed"]["embedding"].dtype == jnp.float32  # gathered by row: kept
    ids = jax.random.randint(jax.random.PRNGKey(2), (4, 32), 0, model.config.vocab_size)
    exact = _logits(model, params, ids)
    int8 = jax.jit(lambda p, ids: _int8_logits(model, p, ids))(quantized, ids)
    assert _relative_error(int8, exact) < LOGITS_TOLERANCE
    # the same check fails for kernels rounded with one scale per input channel
    wrong = jax.tree_util.tree_map_with_path(
        lambda p, x: _wrong_axis(x, _num_in(p)) if p[-1].key == "kernel" else x, params
    )
    assert _relative_error(_logits(model, wrong, ids), exact) > LOGITS_TOLERANCE


def _wrong_axis(kernel: jax.Array, num_in: int) -> jax.Array:
    """``kernel`` rounded to int8 with one scale per input channel (dequantized)."""
    axes = tuple(range(num_in, kernel.ndim))
    scale = jnp.max(jnp.abs(kernel), axis=axes, keepdims=True) / 127
    return jnp.round(kernel / scale) * scale


def test_llm_serves_int8_weights(spread_model):
    model, params = spread_model
    prompt = [3, 17, 42, 5]
    quantized = quantize_params(params)
    forward = jax.jit(lambda p, ids: _int8_logits(model, p, ids))
    ids = list(prompt)
    for _ in range(3):  # greedy through the full (unpaged, causal) int8 forward: one shape
        logits = forward(quantized, jnp.array([ids + [0] * (8 - len(ids))]))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    options = dict(num_pages=8, page_size=4, token_buckets=(8,), seq_buckets=(2,))
    with LLM(model, params, quantize="int8", progress=False, **options) as llm:
        assert llm.engine.runner.quantized
        out = llm.generate([prompt], SamplingParams(max_tokens=3))[0]
    assert out.token_ids == ids[len(prompt) :]


def test_quantize_flag_and_bad_options(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="quantize='int4'"):
        LLM(model, params, quantize="int4")
    mesh = jax.make_mesh((1,), ("tensor",))
    with pytest.raises(ValueError, match="one device"):
        LLM(model, params, quantize="int8", mesh=mesh)
    with pytest.raises(ValueError, match="quantize='int4'"):
        quantize_params(params, "int4")
    serve = ["serve", "--hf", "d"]
    assert build_parser().parse_args([*serve, "--quantize", "int8"]).quantize == "int8"
    assert build_parser().parse_args(serve).quantize == "none"
