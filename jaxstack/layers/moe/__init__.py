"""Mixture-of-experts feed-forward, split by job:

- ``routing``: top-k routing, its losses, and auxiliary-loss-free balancing (the bias and
  its sign update);
- ``dispatch``: the dropless (or capacity-bounded) grouped-matmul mixture on one device;
- ``expert_parallel``: the same dispatch per device under ``shard_map``, with the token
  exchange between the ranks that own the experts;
- ``layer``: the ``MoE`` Flax module and the summary of what it sows.
"""

from jaxstack.layers.moe.dispatch import (
    Dispatch,
    combine,
    expert_capacity,
    expert_mlp,
    grouped_matmul,
    routed_experts,
    sort_by_expert,
)
from jaxstack.layers.moe.expert_parallel import (
    EXCHANGES,
    dispatch_experts,
    exchange_plan,
    expert_parallel,
    padded_ragged_all_to_all,
)
from jaxstack.layers.moe.layer import MOE_COLLECTION, Experts, MoE, MoESummary, moe_summary
from jaxstack.layers.moe.routing import (
    BIAS_PROBE_SCALE,
    ROUTER_BIAS,
    SCORE_FUNCTIONS,
    Routing,
    balance_probe,
    route,
    route_router_bias,
)

__all__ = [
    "BIAS_PROBE_SCALE",
    "EXCHANGES",
    "MOE_COLLECTION",
    "ROUTER_BIAS",
    "SCORE_FUNCTIONS",
    "Dispatch",
    "Experts",
    "MoE",
    "MoESummary",
    "Routing",
    "balance_probe",
    "combine",
    "dispatch_experts",
    "exchange_plan",
    "expert_capacity",
    "expert_mlp",
    "expert_parallel",
    "grouped_matmul",
    "moe_summary",
    "padded_ragged_all_to_all",
    "route",
    "route_router_bias",
    "routed_experts",
    "sort_by_expert",
]
