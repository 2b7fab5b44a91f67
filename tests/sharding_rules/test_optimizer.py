"""Optimizer state follows its parameter; counts and odd-shaped statistics replicate."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from sharding_rules import optimizer_state_specs
from sharding_rules.paths import leaves_with_paths

PARAMS = {
    "params": {
        "dense": {"kernel": jax.ShapeDtypeStruct((32, 64), jnp.float32)},
        "block": {"dense": {"kernel": jax.ShapeDtypeStruct((32, 64), jnp.float32)}},
        "norm": jax.ShapeDtypeStruct((32,), jnp.float32),
    }
}
SPECS = {
    "params": {
        "dense": {"kernel": P(None, "tensor")},
        "block": {"dense": {"kernel": P("fsdp", None)}},
        "norm": P("fsdp"),
    }
}
BY_PARAM = {
    "params/dense/kernel": P(None, "tensor"),
    "params/block/dense/kernel": P("fsdp", None),
    "params/norm": P("fsdp"),
}


def expected(state_path: str) -> P:
    """The longest parameter path the state path ends with decides the spec."""
    hits = [p for p in BY_PARAM if state_path == p or state_path.endswith("/" + p)]
    return BY_PARAM[max(hits, key=len)] if hits else P()


def flat_specs(tx):
    state = jax.eval_shape(tx.init, PARAMS)
    tree = optimizer_state_specs(state, PARAMS, SPECS)
    paths, specs, _ = leaves_with_paths(tree)
    _, leaves, _ = leaves_with_paths(state)
    return dict(zip(paths, specs, strict=True)), dict(zip(paths, leaves, strict=True))


@pytest.mark.parametrize(
    "tx",
    [
        optax.adamw(1e-3),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
        optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), 4),
    ],
    ids=["adamw", "chain", "multisteps"],
)
def test_state_follows_params(tx):
    specs, leaves = flat_specs(tx)
    per_param = [p for p in specs if any(p.endswith(k) for k in BY_PARAM)]
    assert len(per_param) >= 2 * len(BY_PARAM)  # mu and nu (and acc_grads) per parameter
    for path, spec in specs.items():
        assert spec == expected(path), path
    counts = [p for p, leaf in leaves.items() if leaf.shape == ()]
    assert counts and all(specs[p] == P() for p in counts)


def test_multisteps_accumulator_follows_params():
    specs, _ = flat_specs(optax.MultiSteps(optax.adamw(1e-3), 2))
    assert specs["acc_grads/params/block/dense/kernel"] == P("fsdp", None)
    assert specs["acc_grads/params/dense/kernel"] == P(None, "tensor")


def test_factored_statistics_of_another_shape_replicate():
    specs, leaves = flat_specs(optax.adafactor(1e-3, min_dim_size_to_factor=8))
    shapes = {
        "params/dense/kernel": (32, 64),
        "params/block/dense/kernel": (32, 64),
        "params/norm": (32,),
    }
    odd = [p for p, leaf in leaves.items() if leaf.shape not in shapes.values()]
    assert odd  # the factored row/column statistics
    assert all(specs[p] == P() for p in odd)


def test_specs_not_shaped_like_params_raise():
    state = jax.eval_shape(optax.adamw(1e-3).init, PARAMS)
    with pytest.raises(ValueError, match="one PartitionSpec per parameter"):
        optimizer_state_specs(state, PARAMS, {"params": {"dense": {"kernel": P()}}})
