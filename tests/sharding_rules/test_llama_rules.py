"""Megatron layout on jaxstack's own Llama (DenseGeneral q/k/v/o kernels), scanned or not."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxstack.models.llama import Llama, preset
from sharding_rules import analyze_model, param_rules

IDS = jnp.zeros((2, 8), jnp.int32)


def llama_specs(sizes, **config):
    model = Llama(preset("tiny", **config))
    params = jax.eval_shape(model.init, jax.random.key(0), IDS)
    rules = param_rules(analyze_model(model.apply, params, IDS), sizes)
    return {path.removeprefix("params/"): rule.spec for path, rule in rules.items()}


BLOCK = {  # tiny: hidden 128, 4 heads, 2 kv heads, head_dim 32, intermediate 384
    "attn/q/kernel": P(None, "tensor", None),
    "attn/k/kernel": P(None, "tensor", None),
    "attn/v/kernel": P(None, "tensor", None),
    "attn/o/kernel": P("tensor", None, None),
    "mlp/gate/kernel": P(None, "tensor"),
    "mlp/up/kernel": P(None, "tensor"),
    "mlp/down/kernel": P("tensor", None),
    "attn_norm/scale": P(None),
    "mlp_norm/scale": P(None),
}


@pytest.mark.parametrize("scan", [False, True])
def test_tiny_llama_megatron_layout(scan):
    s = llama_specs({"tensor": 2}, scan_layers=scan, remat="full" if scan else "none")
    for name, spec in BLOCK.items():
        if scan:
            assert s[f"layers/block/{name}"] == P(None, *spec), name
        else:
            for i in range(4):
                assert s[f"layers_{i}/{name}"] == spec, (i, name)
    # vocab 259 is odd: the embedding shards its width, the LM head its input dim
    assert s["embed/embedding"] == P(None, "tensor")
    assert s["lm_head/kernel"] == P("tensor", None)
    assert s["final_norm/scale"] == P(None)


def test_divisible_vocab_shards_vocab():
    s = llama_specs({"tensor": 2, "fsdp": 2}, vocab_size=256)
    assert s["embed/embedding"] == P("tensor", "fsdp")
    assert s["lm_head/kernel"] == P("fsdp", "tensor")
    assert s["layers_0/attn/q/kernel"] == P("fsdp", "tensor", None)
    assert s["layers_0/attn/o/kernel"] == P("tensor", None, "fsdp")


def test_tied_embeddings_with_qkv_bias_and_qk_norm():
    s = llama_specs({"tensor": 2}, vocab_size=256, tie_embeddings=True, qkv_bias=True, qk_norm=True)
    assert "lm_head/kernel" not in s
    assert s["embed/embedding"] == P("tensor", None)
    assert s["layers_0/attn/q/bias"] == P("tensor", None)
    assert s["layers_0/attn/k/bias"] == P("tensor", None)
    assert s["layers_0/attn/q_norm/scale"] == P(None)


def test_pallas_attention_kernel_keeps_the_layout():
    """The Pallas kernel is opaque to the analysis; q, k, v still meet o through it."""
    model = Llama(preset("tiny", attention_impl="pallas"))
    ids = jnp.zeros((2, 128), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    rules = param_rules(analyze_model(model.apply, params, ids), {"tensor": 2})
    for name, spec in BLOCK.items():
        assert rules[f"params/layers_0/{name}"].spec == spec, name
