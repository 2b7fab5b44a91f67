"""Llama model: shapes, parameter count, causal and segment masking, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.models import Llama, init_cache, preset


def _init(config, seq=8):
    model = Llama(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq), jnp.int32))["params"]
    return model, params


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shapes_and_param_count(scan_layers):
    config = preset("tiny", scan_layers=scan_layers)
    model, params = _init(config)
    ids = jnp.arange(2 * 12).reshape(2, 12) % config.vocab_size
    logits = model.apply({"params": params}, ids)
    assert logits.shape == (2, 12, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    if scan_layers:
        assert params["layers"]["block"]["attn"]["q"]["kernel"].shape == (
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.head_dim_,
        )


def test_scan_and_loop_give_same_logits():
    looped, params = _init(preset("tiny"))
    scanned = Llama(preset("tiny", scan_layers=True, remat="full"))
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[f"layers_{i}"] for i in range(looped.config.num_layers)]
    stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    ids = jnp.arange(20).reshape(2, 10)
    np.testing.assert_allclose(
        looped.apply({"params": params}, ids),
        scanned.apply({"params": stacked}, ids),
        atol=1e-5,
    )


def test_causal_mask_hides_future_tokens():
    model, params = _init(preset("tiny"))
    ids = jnp.arange(16)[None] % 200
    changed = ids.at[0, 10].set(199)
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_segment_ids_isolate_packed_documents():
    model, params = _init(preset("tiny"))
    doc_a, doc_b = jnp.arange(6) + 3, jnp.arange(5) + 50
    packed = jnp.concatenate([doc_a, doc_b])[None]
    segments = jnp.array([[1] * 6 + [2] * 5])
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(5)])[None]
    packed_logits = model.apply(
        {"params": params}, packed, positions=positions, segment_ids=segments
    )
    alone = model.apply({"params": params}, doc_b[None])
    np.testing.assert_allclose(packed_logits[0, 6:], alone[0], atol=1e-5)
    # without segment ids the second document would see the first
    unmasked = model.apply({"params": params}, packed, positions=positions)
    assert not np.allclose(unmasked[0, 6:], alone[0], atol=1e-4)


def test_sliding_window_limits_context():
    # one layer, window 4: query i sees keys (i-4, i], so token 0 only reaches positions 0..3
    model, params = _init(preset("tiny", sliding_window=4, num_layers=1))
    ids = jnp.arange(12)[None] + 1
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, ids.at[0, 0].set(100))
    np.testing.assert_allclose(a[0, 4:], b[0, 4:], atol=1e-6)
    assert not np.allclose(a[0, :4], b[0, :4])


def test_bf16_compute_keeps_fp32_params_and_logits():
    model, params = _init(preset("tiny", dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
    ref_model = Llama(preset("tiny"))
    ref = ref_model.apply({"params": params}, jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.1)


def test_prefill_cache_matches_full_forward():
    config = preset("tiny")
    model, params = _init(config)
    ids = jnp.arange(14).reshape(2, 7) + 5
    full = model.apply({"params": params}, ids)
    logits, cache = model.apply({"params": params}, ids, cache=init_cache(config, 2, 16))
    np.testing.assert_allclose(logits, full, atol=1e-5)
    nxt = jnp.array([[9], [11]])
    step_logits, _ = model.apply(
        {"params": params}, nxt, cache=cache, decode_index=jnp.array([7, 7])
    )
    longer = model.apply({"params": params}, jnp.concatenate([ids, nxt], axis=1))
    np.testing.assert_allclose(step_logits[:, 0], longer[:, -1], atol=1e-5)


def test_flops_per_token_counts_matmuls_and_the_keys_causal_attention_sees():
    config = preset("100m")
    norms = (2 * config.num_layers + 1) * config.hidden_size  # scales: not matmuls
    n = config.num_params(include_embedding=False) + config.vocab_size * config.hidden_size
    n -= norms
    # 6N rule plus the attention term over the keys each query sees (half, for causal)
    per_key = 6 * 2 * config.num_layers * config.num_heads * config.head_dim_
    assert config.flops_per_token(1024) == pytest.approx(6 * n + per_key * 1025 / 2, rel=1e-6)
    assert config.flops_per_token(1024, training=False) * 3 == config.flops_per_token(1024)
    windowed = config.replace(sliding_window=256)
    seen = np.mean([min(i + 1, 256) for i in range(1024)])  # brute force over positions
    assert windowed.keys_per_query(1024) == pytest.approx(seen, rel=1e-12)
    assert windowed.flops_per_token(1024) == pytest.approx(6 * n + per_key * seen, rel=1e-6)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"remat": "sometimes"}, "remat"),
        ({"dtype": "int8"}, "dtype"),
        ({"hidden_size": 130}, "set head_dim"),
    ],
)
def test_bad_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **changes)


def test_unknown_preset_and_key():
    with pytest.raises(KeyError, match="choose one of"):
        preset("13t")
    with pytest.raises(TypeError, match="no_such_key"):
        preset("tiny", no_such_key=1)
