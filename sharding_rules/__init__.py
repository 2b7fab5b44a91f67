"""Automatic sharding rules: params + mesh -> PartitionSpecs, and the logical axis table."""

from sharding_rules.logical import LOGICAL_AXIS_RULES, MESH_AXES, constrain, logical_to_spec

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "constrain", "logical_to_spec"]
