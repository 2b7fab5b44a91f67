"""Exact PartitionSpecs per parameter, for every layout the rules must handle, on several meshes."""

import jax
import jax.numpy as jnp
import pytest
import toy_models as tm
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from sharding_rules import (
    MESH_AXES,
    ShardingRuleError,
    analyze_model,
    infer_param_specs,
    param_rules,
)

IDS = jnp.zeros((2, 6), jnp.int32)
X = jnp.zeros((2, 6, tm.D))


def specs(model, arg, sizes, overrides=None):
    """{path without the 'params/' prefix: spec}."""
    rules = param_rules(analyze_model(model.apply, tm.shapes_of(model, arg), arg), sizes, overrides)
    return {path.removeprefix("params/"): rule.spec for path, rule in rules.items()}


def test_mlp_pair_is_column_then_row():
    s = specs(tm.MLPPair(), jnp.zeros((2, 8)), {"tensor": 2})
    assert s == {
        "fc1/kernel": P(None, "tensor"),
        "fc1/bias": P("tensor"),
        "fc2/kernel": P("tensor", None),
        "fc2/bias": P(None),
    }


def test_mlp_pair_with_fsdp():
    s = specs(tm.MLPPair(), jnp.zeros((2, 8)), {"tensor": 4, "fsdp": 2})
    assert s == {
        "fc1/kernel": P("fsdp", "tensor"),
        "fc1/bias": P("tensor"),
        "fc2/kernel": P("tensor", "fsdp"),
        "fc2/bias": P("fsdp"),
    }


def test_fsdp_only_takes_largest_divisible_dim_and_reports_skips():
    model, x = tm.MLPPair(), jnp.zeros((2, 8))
    rules = param_rules(analyze_model(model.apply, tm.shapes_of(model, x), x), {"fsdp": 32})
    got = {path: rule.spec for path, rule in rules.items()}
    assert got == {
        "params/fc1/bias": P("fsdp"),
        "params/fc1/kernel": P(None, "fsdp"),
        "params/fc2/bias": P(None),
        "params/fc2/kernel": P("fsdp", None),
    }
    assert "no free dimension divisible by fsdp=32" in rules["params/fc2/bias"].reason


def test_pure_data_parallel_replicates_everything():
    s = specs(tm.LlamaLike(), IDS, {"data": 8})
    assert all(all(e is None for e in spec) for spec in s.values())


def test_chain_of_equal_layers_pairs_alternate():
    s = specs(tm.MLPChain(), jnp.zeros((2, tm.D)), {"tensor": 2})
    assert [s[f"l{i}/kernel"] for i in range(4)] == [
        P(None, "tensor"),
        P("tensor", None),
        P(None, "tensor"),
        P("tensor", None),
    ]
    assert [s[f"l{i}/bias"] for i in range(4)] == [P("tensor"), P(None), P("tensor"), P(None)]


@pytest.mark.parametrize("tensor", [2, 4])
def test_dense_general_3d_kernels_shard_heads(tensor):
    s = specs(tm.DenseGeneralAttention(), X, {"tensor": tensor})
    for name in ("query", "key", "value"):
        assert s[f"{name}/kernel"] == P(None, "tensor", None)
        assert s[f"{name}/bias"] == P("tensor", None)
    assert s["out/kernel"] == P("tensor", None, None)
    assert s["out/bias"] == P(None)


def test_dense_general_heads_that_do_not_divide_raise():
    with pytest.raises(ShardingRuleError) as err:
        specs(tm.DenseGeneralAttention(), X, {"tensor": 8})
    msg = str(err.value)
    assert "tensor=8" in msg and "size 4" in msg and "[1, 2, 4]" in msg
    assert "params/out/kernel" in msg and "params/query/kernel" in msg


def test_gpt2_names_and_fused_qkv():
    s = specs(tm.GPT2(), IDS, {"tensor": 2})
    for i in range(2):
        assert s[f"h_{i}_attn/c_attn/kernel"] == P(None, "tensor")
        assert s[f"h_{i}_attn/c_attn/bias"] == P("tensor")
        assert s[f"h_{i}_attn/c_proj/kernel"] == P("tensor", None)
        assert s[f"h_{i}_attn/c_proj/bias"] == P(None)
        assert s[f"h_{i}_mlp/c_fc/kernel"] == P(None, "tensor")
        assert s[f"h_{i}_mlp/c_fc/bias"] == P("tensor")
        assert s[f"h_{i}_mlp/c_proj/kernel"] == P("tensor", None)
        assert s[f"h_{i}_mlp/c_proj/bias"] == P(None)
        assert s[f"h_{i}_ln_1/scale"] == P(None)
    assert s["wte/embedding"] == P("tensor", None)  # tied: also the column-parallel LM head
    assert s["wpe/embedding"] == P("tensor", None)
    assert s["ln_f/scale"] == P(None)


LLAMA_TP2_FSDP2 = {
    "q_proj/kernel": P("fsdp", "tensor"),
    "k_proj/kernel": P("fsdp", "tensor"),
    "v_proj/kernel": P("fsdp", "tensor"),
    "o_proj/kernel": P("tensor", "fsdp"),
    "gate_proj/kernel": P("fsdp", "tensor"),
    "up_proj/kernel": P("fsdp", "tensor"),
    "down_proj/kernel": P("tensor", "fsdp"),
    "attn_norm": P("fsdp"),
    "mlp_norm": P("fsdp"),
}


def test_flat_projection_llama_megatron_layout():
    s = specs(tm.LlamaLike(), IDS, {"tensor": 2, "fsdp": 2})
    for i in range(2):
        for name, spec in LLAMA_TP2_FSDP2.items():
            assert s[f"layers_{i}/{name}"] == spec, name
    assert s["embed/embedding"] == P("tensor", "fsdp")
    assert s["lm_head/kernel"] == P("fsdp", "tensor")
    assert s["final_norm"] == P("fsdp")


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_never_shard_the_layer_axis(remat):
    s = specs(tm.LlamaLike(scan=True, remat=remat), IDS, {"tensor": 2, "fsdp": 2})
    for name, spec in LLAMA_TP2_FSDP2.items():
        assert s[f"layers/{name}"] == P(None, *spec), name
    assert s["embed/embedding"] == P("tensor", "fsdp")
    assert s["lm_head/kernel"] == P("fsdp", "tensor")


def test_layer_axis_is_not_fsdp_sharded_even_when_it_is_the_only_divisible_dim():
    rules = param_rules(
        analyze_model(
            tm.LlamaLike(scan=True, layers=64).apply,
            tm.shapes_of(tm.LlamaLike(scan=True, layers=64), IDS),
            IDS,
        ),
        {"fsdp": 64},
    )
    norm = rules["params/layers/attn_norm"]
    assert norm.shape == (64, tm.D)
    assert norm.spec == P(None, None)
    assert "no free dimension divisible by fsdp=64" in norm.reason


def test_gqa_kv_heads_bound_tensor():
    with pytest.raises(ShardingRuleError) as err:
        specs(tm.LlamaLike(), IDS, {"tensor": 4})
    msg = str(err.value)
    assert "factor of size 2" in msg and "tensor sizes that would work: [1, 2]" in msg
    assert "k_proj" in msg and "o_proj" in msg


MESHES = [{"tensor": 2}, {"tensor": 2, "fsdp": 4}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]
ANONYMOUS_NAMES = {
    "p0": "embed/embedding",
    "p1": "layers_0/attn_norm",
    "p2": "layers_0/q_proj/kernel",
    "p3": "layers_0/k_proj/kernel",
    "p4": "layers_0/v_proj/kernel",
    "p5": "layers_0/o_proj/kernel",
    "p6": "layers_0/mlp_norm",
    "p7": "layers_0/gate_proj/kernel",
    "p8": "layers_0/up_proj/kernel",
    "p9": "layers_0/down_proj/kernel",
    "p10": "lm_head/kernel",
}


@pytest.mark.parametrize("sizes", MESHES)
def test_meaningless_names_get_the_same_layout(sizes):
    anonymous = specs(tm.Anonymous(), IDS, sizes)
    named = specs(tm.LlamaLike(layers=1), IDS, sizes)
    assert {p: anonymous[p] for p in ANONYMOUS_NAMES} == {
        p: named[n] for p, n in ANONYMOUS_NAMES.items()
    }
    if sizes.get("tensor", 1) > 1:
        assert anonymous["p2"][1] == "tensor" and anonymous["p5"][0] == "tensor"


@pytest.mark.parametrize(
    "kwargs, embed, head, head_bias",
    [
        ({}, P("tensor", None), P(None, "tensor"), P("tensor")),
        ({"one_hot": True}, P("tensor", None), P(None, "tensor"), P("tensor")),
        ({"vocab": 90}, P(None, "tensor"), P("tensor", None), P(None)),
    ],
)
def test_embedding_and_untied_head(kwargs, embed, head, head_bias):
    s = specs(tm.EmbedLM(**kwargs), IDS, {"tensor": 4})
    assert s["embed"] == embed
    assert s["lm_head/kernel"] == head
    assert s["lm_head/bias"] == head_bias
    assert s["mix/kernel"] == P(None, None)  # a lone residual projection has no pair
    model = tm.EmbedLM(**kwargs)
    rules = param_rules(analyze_model(model.apply, tm.shapes_of(model, IDS), IDS), {"tensor": 4})
    assert "in no column/row pair" in rules["params/mix/kernel"].reason


@pytest.mark.parametrize(
    "vocab, embed, bias", [(96, P("tensor", None), P("tensor")), (90, P(None, "tensor"), P(None))]
)
def test_tied_embedding(vocab, embed, bias):
    s = specs(tm.EmbedLM(vocab=vocab, tied=True), IDS, {"tensor": 4})
    assert s["embed"] == embed
    assert s["logits_bias"] == bias  # follows the vocab-parallel logits


def test_embedding_where_neither_vocab_nor_width_divides_raises():
    with pytest.raises(ShardingRuleError, match=r"params/embed.*tensor=7.*\[1, 2, 3, 5, 6"):
        specs(tm.EmbedLM(vocab=90), IDS, {"tensor": 7})


@pytest.mark.parametrize("ragged", [False, True])
def test_moe_expert_and_tensor(ragged):
    s = specs(tm.MoE(ragged=ragged), X, {"tensor": 2, "expert": 2, "fsdp": 2})
    assert s["w_in"] == P("expert", "fsdp", "tensor")
    assert s["w_out"] == P("expert", "tensor", "fsdp")
    assert s["router/kernel"] == P("fsdp", None)
    if not ragged:
        assert s["b_in"] == P("expert", "tensor")


def test_experts_that_do_not_divide_raise():
    with pytest.raises(ShardingRuleError, match=r"params/w_in.*expert=8.*\[1, 2, 4\]"):
        specs(tm.MoE(), X, {"expert": 8})


def test_overrides_take_precedence_first_match_wins():
    s = specs(
        tm.LlamaLike(),
        IDS,
        {"tensor": 2, "fsdp": 2},
        overrides={"layers_0/q_proj": P(), "q_proj": P("tensor", "fsdp"), "lm_head": P()},
    )
    assert s["layers_0/q_proj/kernel"] == P(None, None)
    assert s["layers_1/q_proj/kernel"] == P("tensor", "fsdp")
    assert s["lm_head/kernel"] == P(None, None)
    assert s["layers_0/k_proj/kernel"] == P("fsdp", "tensor")


def test_override_can_take_a_group_off_tensor():
    s = specs(tm.LlamaLike(), IDS, {"tensor": 4}, overrides={r"[qkvo]_proj": P()})
    assert s["layers_0/q_proj/kernel"] == P(None, None)
    assert s["layers_0/gate_proj/kernel"] == P(None, "tensor")
    assert s["layers_0/down_proj/kernel"] == P("tensor", None)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"lm_head": P(None, "tensor")}, r"lm_head.*dim 1 \(size 96\).*total size 5"),
        ({"lm_head": P("model")}, "unknown mesh axis 'model'"),
        ({"lm_head": P(None, None, None)}, "has 3 entries"),
        ({"lm_head": P("tensor", "tensor")}, "used twice"),
        ({"nothing_here": P()}, "match no parameter"),
        ({"lm_head": "tensor"}, "use a jax.sharding.PartitionSpec"),
        ({"lm_head(": P()}, "not a valid regex"),
    ],
)
def test_bad_overrides_raise(overrides, match):
    with pytest.raises(ShardingRuleError, match=match):
        specs(tm.LlamaLike(), IDS, {"tensor": 5}, overrides)


@pytest.mark.parametrize(
    "sizes, match", [({"model": 2}, "unknown mesh axes"), ({"tensor": 0}, "positive int")]
)
def test_bad_mesh_sizes_raise(sizes, match):
    with pytest.raises(ShardingRuleError, match=match):
        specs(tm.MLPPair(), jnp.zeros((2, 8)), sizes)


def test_infer_param_specs_returns_a_params_shaped_tree():
    model, x = tm.MLPPair(), jnp.zeros((2, 8))
    tree = infer_param_specs(model.apply, tm.shapes_of(model, x), x, mesh_axis_sizes={"tensor": 2})
    assert tree == {
        "params": {
            "fc1": {"bias": P("tensor"), "kernel": P(None, "tensor")},
            "fc2": {"bias": P(None), "kernel": P("tensor", None)},
        }
    }


def test_reasons_name_the_partner():
    model = tm.LlamaLike()
    rules = param_rules(analyze_model(model.apply, tm.shapes_of(model, IDS), IDS), {"tensor": 2})
    assert "feeds params/layers_0/o_proj/kernel" in rules["params/layers_0/q_proj/kernel"].reason
    assert "row-parallel" in rules["params/layers_0/down_proj/kernel"].reason
    assert "output head" in rules["params/lm_head/kernel"].reason


def test_a_mesh_gives_the_same_specs_as_its_axis_sizes():
    shape = (1, 2, 2, 2, 1, 1)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    model = tm.LlamaLike()
    params = tm.shapes_of(model, IDS)
    by_mesh = infer_param_specs(model.apply, params, IDS, mesh_axis_sizes=mesh)
    by_sizes = infer_param_specs(
        model.apply, params, IDS, mesh_axis_sizes=dict(zip(MESH_AXES, shape, strict=True))
    )
    assert by_mesh == by_sizes
    assert by_mesh["params"]["layers_0"]["q_proj"]["kernel"] == P("fsdp", "tensor")
