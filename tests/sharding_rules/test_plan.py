"""The memory plan agrees with what placed arrays occupy; the table reads well."""

import jax
import jax.numpy as jnp
import optax
import pytest
import toy_models as tm
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding_rules import (
    MESH_AXES,
    analyze_model,
    format_plan,
    make_plan,
    optimizer_state_specs,
    param_rules,
)

IDS = jnp.zeros((2, 6), jnp.int32)


def rules_and_specs(model, arg, sizes):
    params = tm.shapes_of(model, arg)
    analysis = analyze_model(model.apply, params, arg)
    rules = param_rules(analysis, sizes)
    specs = jax.tree.unflatten(analysis.treedef, [r.spec for r in rules.values()])
    return rules, specs


def placed_bytes_per_device(tree, specs, mesh):
    """Bytes each device holds after device_put with NamedSharding(mesh, spec)."""
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    placed = jax.device_put(tree, shardings)
    totals = {}
    for leaf in jax.tree.leaves(placed):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return totals


@pytest.mark.parametrize(
    "model, arg, sizes",
    [
        (tm.LlamaLike(scan=True), IDS, {"data": 2, "fsdp": 2, "tensor": 2}),
        (tm.GPT2(), IDS, {"fsdp": 4, "tensor": 2}),
        (tm.MoE(), jnp.zeros((2, 6, tm.D)), {"expert": 2, "fsdp": 2, "tensor": 2}),
    ],
    ids=["llama-scan", "gpt2", "moe"],
)
def test_plan_matches_placed_params_and_optimizer_state(model, arg, sizes):
    rules, specs = rules_and_specs(model, arg, sizes)
    tx = optax.adamw(1e-3)
    shapes = tm.shapes_of(model, arg)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    opt_state = tx.init(params)
    opt_specs = optimizer_state_specs(opt_state, params, specs)
    plan = make_plan(
        shapes,
        specs,
        sizes,
        opt_state=jax.eval_shape(tx.init, params),
        reasons={p: r.reason for p, r in rules.items()},
    )
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    actual = placed_bytes_per_device(params, specs, mesh)
    actual_opt = placed_bytes_per_device(opt_state, opt_specs, mesh)
    assert len(actual) == 8
    predicted = plan.param_bytes + plan.opt_state_bytes
    for device, nbytes in actual.items():
        assert abs(nbytes + actual_opt[device] - predicted) <= 0.05 * predicted
    full = sum(x.nbytes for x in jax.tree.leaves(params))
    assert plan.param_bytes < full / 2  # the plan really shards


def test_grad_dtype_and_totals():
    _, specs = rules_and_specs(tm.MLPPair(), jnp.zeros((2, 8)), {"tensor": 2})
    params = tm.shapes_of(tm.MLPPair(), jnp.zeros((2, 8)))
    plan = make_plan(params, specs, {"tensor": 2}, grad_dtype=jnp.bfloat16, activation_bytes=100)
    # fc1: 8x32/2 + 32/2, fc2: 32/2x16 + 16 float32 values per device
    assert plan.param_bytes == 4 * (8 * 16 + 16 + 16 * 16 + 16)
    assert plan.grad_bytes == plan.param_bytes // 2
    assert plan.opt_state_bytes == 0
    assert plan.total_bytes == plan.param_bytes + plan.grad_bytes + 100


def test_format_plan_lists_every_parameter_and_totals():
    rules, specs = rules_and_specs(tm.MLPPair(), jnp.zeros((2, 8)), {"tensor": 2, "fsdp": 2})
    params = tm.shapes_of(tm.MLPPair(), jnp.zeros((2, 8)))
    plan = make_plan(
        params,
        specs,
        {"tensor": 2, "fsdp": 2},
        opt_state=jax.eval_shape(optax.adam(1e-3).init, params),
        activation_bytes=3 * 2**20,
        reasons={p: r.reason for p, r in rules.items()},
    )
    text = format_plan(plan)
    for rule in rules.values():
        assert rule.path in text
    assert "(fsdp, tensor)" in text and "(tensor, fsdp)" in text and "column-parallel" in text
    assert "fsdp=2" in text and "tensor=2" in text
    for label in ("params", "gradients", "optimizer state", "activations (est.)", "total"):
        assert label in text
    assert "3.00 MiB" in text


def test_bad_inputs_raise():
    params = tm.shapes_of(tm.MLPPair(), jnp.zeros((2, 8)))
    specs = jax.tree.map(lambda _: P(), params)
    with pytest.raises(ValueError, match="activation_bytes"):
        make_plan(params, specs, {}, activation_bytes=-1)
    with pytest.raises(ValueError, match="one PartitionSpec per leaf"):
        make_plan(params, {"params": {}}, {})
