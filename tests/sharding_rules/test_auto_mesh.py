"""mesh="auto": fits, prefers less communication, then data parallelism; explains failures."""

import jax
import jax.numpy as jnp
import optax
import pytest
import toy_models as tm

from sharding_rules import (
    ShardingRuleError,
    analyze_model,
    auto_mesh,
    communication_bytes,
    make_plan,
    param_rules,
    tensor_allreduce_bytes,
)

IDS = jnp.zeros((2, 6), jnp.int32)
MODEL = tm.LlamaLike(scan=True)
PARAMS = tm.shapes_of(MODEL, IDS)
ANALYSIS = analyze_model(MODEL.apply, PARAMS, IDS)
OPT = jax.eval_shape(optax.adamw(1e-3).init, PARAMS)
# Megatron traffic per layer for a global batch of 64 x 512 tokens: 4 all-reduces of
# [tokens, D] float32 activations.
TP_BYTES = 4 * 64 * 512 * tm.D * 4


def spec_fn(sizes):
    return spec_fn_for(ANALYSIS, sizes)


def choose(memory, tensor_bytes=TP_BYTES, **kwargs):
    return auto_mesh(
        8,
        memory,
        spec_fn,
        PARAMS,
        tensor_allreduce_bytes=2 * tensor_bytes,
        opt_state=OPT,
        **kwargs,
    )


def dfst(sizes):
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def totals():
    """Per-device total bytes of every candidate the rules accept, by (data, fsdp, tensor)."""
    return {dfst(c.axis_sizes): c.plan.total_bytes for c in choose(2**40).candidates if c.plan}


def test_plenty_of_memory_is_pure_data_parallel():
    result = choose(2**40)
    assert result.axis_sizes == {
        "stage": 1, "data": 8, "fsdp": 1, "tensor": 1, "expert": 1, "sequence": 1,
    }  # fmt: skip
    assert result.shape == (1, 8, 1, 1, 1, 1)
    # KVH=2 key/value heads: tensor=4 and tensor=8 are rejected by the rules, with the reason.
    rejected = [c for c in result.candidates if c.plan is None]
    assert {c.axis_sizes["tensor"] for c in rejected} == {4, 8}
    assert all("tensor sizes that would work: [1, 2]" in c.rejected for c in rejected)


def test_tight_memory_forces_sharding_and_picks_least_communication():
    memory = totals()[(8, 1, 1)] - 1
    result = choose(memory)
    assert dfst(result.axis_sizes) != (8, 1, 1)
    assert result.plan.total_bytes <= memory
    fitting = [c for c in result.candidates if c.rejected is None]
    assert result.comm_bytes == min(c.comm_bytes for c in fitting)


def test_tensor_traffic_steers_between_fsdp_and_tensor():
    t = totals()
    memory = max(t[(4, 2, 1)], t[(4, 1, 2)])
    assert memory < t[(8, 1, 1)]
    costly = choose(memory, tensor_bytes=TP_BYTES)
    assert dfst(costly.axis_sizes) == (4, 2, 1)
    free = choose(memory, tensor_bytes=0)
    assert dfst(free.axis_sizes) == (4, 1, 2)


def test_activation_estimate_counts():
    result = choose(2**40, activation_bytes_fn=lambda s: 8 * 10**6 // (s["data"] * s["fsdp"]))
    assert result.plan.activation_bytes == 10**6


def test_nothing_fits_says_what_the_smallest_plan_needs():
    smallest = min(totals().values())
    with pytest.raises(ShardingRuleError, match="smallest plan .* needs"):
        choose(smallest - 1)


def test_rules_rejecting_every_mesh_raise():
    def reject(sizes):
        raise ShardingRuleError("no")

    with pytest.raises(ShardingRuleError, match="reject every mesh"):
        auto_mesh(2, 2**30, reject, PARAMS, tensor_allreduce_bytes=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="must be positive"):
        auto_mesh(0, 2**30, spec_fn, PARAMS, tensor_allreduce_bytes=0)


def test_communication_cost_model():
    dp = make_plan(PARAMS, spec_fn({"data": 8}), {"data": 8})
    none = {"tensor_allreduce_bytes": 2 * 10**9}
    assert communication_bytes(dp, **none) == pytest.approx(2 * 7 / 8 * dp.grad_bytes)
    tp = make_plan(PARAMS, spec_fn({"tensor": 2}), {"tensor": 2})
    cost = communication_bytes(tp, tensor_allreduce_bytes=3000)
    assert cost == pytest.approx(2 * 1 / 2 * 3 * 1000)
    fsdp = make_plan(PARAMS, spec_fn({"fsdp": 2}), {"fsdp": 2})
    sharded = sum(e.bytes_per_device for e in fsdp.entries if "fsdp" in e.spec)
    assert communication_bytes(fsdp, grad_dtype=jnp.bfloat16, **none) == pytest.approx(
        1 / 2 * (2 * 2 * sharded + sharded)
    )


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_tensor_traffic_is_read_from_the_trace(scan):
    model = tm.LlamaLike(scan=scan)
    params = tm.shapes_of(model, IDS)
    analysis = analyze_model(model.apply, params, IDS)
    specs = spec_fn_for(analysis, {"tensor": 2})
    tokens = IDS.size
    assert set(analysis.rows.values()) == {tokens}
    # per layer: o_proj and down_proj are row-parallel, each all-reducing [tokens, D] forward
    # and its partner's input gradient backward; the vocab-parallel embedding all-reduces its
    # looked-up rows, the vocab-parallel head its input gradient.
    pairs, ends = 2 * 2 * 2 * tokens * tm.D, 2 * tokens * tm.D
    assert tensor_allreduce_bytes(analysis, specs, 4) == 4 * (pairs + ends)
    assert tensor_allreduce_bytes(analysis, specs, 2, training=False) == 2 * (pairs / 2 + ends / 2)
    replicated = spec_fn_for(analysis, {"data": 2})
    assert tensor_allreduce_bytes(analysis, replicated, 4) == 0


def spec_fn_for(analysis, sizes):
    rules = param_rules(analysis, sizes)
    return jax.tree.unflatten(analysis.treedef, [r.spec for r in rules.values()])
