"""Megatron layout on jaxstack's own Llama (DenseGeneral q/k/v/o kernels), scanned or not."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxstack.lm import lm_functions
from jaxstack.models.llama import Llama, preset
from sharding_rules import analyze_model, infer_param_specs, param_rules

IDS = jnp.zeros((2, 8), jnp.int32)
FIELDS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


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


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("loss", ["fused", "optax"])
def test_head_is_vocab_parallel_when_traced_from_the_loss(loss, tie):
    """The Trainer's default: specs traced from ``loss_fn(params, batch, rng)``. The fused
    loss hides the logits inside a custom_vjp and a scan over chunks; the rules still see
    every use of the head's output reduce over the vocabulary."""
    model = Llama(preset("tiny", vocab_size=256, num_kv_heads=4, tie_embeddings=tie))
    params = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
    if loss == "fused":
        loss_fn, _ = lm_functions(model, chunk_size=3)  # 8 positions: 3 chunks, one padded
    else:

        def loss_fn(p, batch, rng):
            logits = model.apply({"params": p}, batch["input_ids"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    batch = {name: jax.ShapeDtypeStruct((4, 8), jnp.int32) for name in FIELDS}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    specs = infer_param_specs(loss_fn, params, batch, rng, mesh_axis_sizes={"data": 2, "tensor": 4})
    assert specs["embed"]["embedding"] == P("tensor", None)
    if not tie:
        assert specs["lm_head"]["kernel"] == P(None, "tensor")
    block = specs["layers_0"]
    assert block["attn"]["q"]["kernel"] == P(None, "tensor", None)
    assert block["mlp"]["down"]["kernel"] == P("tensor", None)
