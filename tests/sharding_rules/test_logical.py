"""The logical-axis table: specs per mesh, and constraints that never force the wrong layout."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from sharding_rules import constrain, fitting_spec, logical_to_spec


def test_logical_to_spec_drops_unit_axes():
    sizes = {"data": 2, "fsdp": 1, "tensor": 4}
    assert logical_to_spec(("batch", "seq", "heads"), sizes) == PartitionSpec(
        "data", None, "tensor"
    )
    sizes["fsdp"] = 2
    assert logical_to_spec(("batch", None), sizes) == PartitionSpec(("data", "fsdp"), None)


def test_fitting_spec_leaves_non_dividing_dims_unsharded():
    sizes = {"data": 2, "fsdp": 2, "tensor": 4}
    assert fitting_spec((1, 8, 6), ("batch", "seq", "heads"), sizes) == PartitionSpec(
        None, None, None
    )
    assert fitting_spec((4, 8, 8), ("batch", "seq", "heads"), sizes) == PartitionSpec(
        ("data", "fsdp"), None, "tensor"
    )


def test_constrain_shards_under_our_mesh_and_ignores_foreign_meshes():
    x = jnp.ones((8, 4, 8))
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "heads")))
    ours = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(ours):
        assert f(x).sharding.spec == PartitionSpec("data", None, "tensor")
    foreign = jax.make_mesh((4, 2), ("dp", "mp"), axis_types=(AxisType.Auto,) * 2)
    x_foreign = jax.device_put(x, jax.sharding.NamedSharding(foreign, PartitionSpec("dp")))
    with jax.set_mesh(foreign):
        assert f(x_foreign).sharding.spec[0] == "dp"  # left alone, not forced to replicate
