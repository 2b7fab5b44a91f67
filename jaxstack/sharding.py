"""``js.sharding``: the parts of ``sharding_rules`` a user needs, under one import.

- ``infer_param_specs(fn, params, *example_args, mesh_axis_sizes=..., overrides=...)``: the
  automatic rules; ``overrides`` maps path regexes to ``PartitionSpec`` (they match paths
  like ``"layers_0/attn/q/kernel"``; NNX paths match without their trailing ``/value``).
- ``make_plan`` / ``format_plan`` / ``MemoryPlan``: what each parameter costs per device.
- ``constrain``: a logical-axis hint on an activation (``("batch", "seq", "embed")``).
- ``auto_mesh``: choose the mesh shape; ``MESH_AXES`` the axis names; ``ShardingRuleError``
  what a mesh that cannot shard a model raises.
- ``PartitionSpec`` (jax's), for overrides.
"""

from jax.sharding import PartitionSpec

from sharding_rules import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    MemoryPlan,
    ShardingRuleError,
    analyze_model,
    auto_mesh,
    constrain,
    format_plan,
    infer_param_specs,
    make_plan,
    optimizer_state_specs,
    param_rules,
    specs_tree,
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "MemoryPlan",
    "PartitionSpec",
    "ShardingRuleError",
    "analyze_model",
    "auto_mesh",
    "constrain",
    "format_plan",
    "infer_param_specs",
    "make_plan",
    "optimizer_state_specs",
    "param_rules",
    "specs_tree",
]
