"""Automatic sharding rules: params + mesh -> PartitionSpecs, and the logical axis table."""

from sharding_rules.auto_mesh import (
    AutoMeshResult,
    MeshCandidate,
    auto_mesh,
    communication_bytes,
    tensor_allreduce_bytes,
)
from sharding_rules.logical import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    constrain,
    fitting_spec,
    logical_to_spec,
    uses_our_axes,
)
from sharding_rules.optimizer import optimizer_state_specs
from sharding_rules.plan import MemoryPlan, ParamEntry, format_plan, make_plan
from sharding_rules.rules import (
    ParamRule,
    ShardingRuleError,
    infer_param_specs,
    param_rules,
    specs_tree,
)
from sharding_rules.trace import ModelAnalysis, analyze_model

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "AutoMeshResult",
    "MemoryPlan",
    "MeshCandidate",
    "ModelAnalysis",
    "ParamEntry",
    "ParamRule",
    "ShardingRuleError",
    "analyze_model",
    "auto_mesh",
    "communication_bytes",
    "constrain",
    "fitting_spec",
    "format_plan",
    "infer_param_specs",
    "logical_to_spec",
    "make_plan",
    "optimizer_state_specs",
    "param_rules",
    "specs_tree",
    "tensor_allreduce_bytes",
    "uses_our_axes",
]
