"""``mesh="auto"`` for any model: the mesh shape chosen from the traced computation.

The Trainer (and the Predictor) trace the user's function once (``sharding_rules``'
``ModelAnalysis``); every ``(data, fsdp, tensor)`` factorisation of the devices that the
rules can shard is planned (parameters, plus gradients and optimizer state when training)
and costed by the bytes each device sends per step (``sharding_rules.auto_mesh``), with the
tensor-parallel traffic read from the same trace (``tensor_allreduce_bytes``). The
cheapest one that fits in device memory wins. Activations are not in the plan of a model
the stack knows nothing about; ``jaxstack plan`` adds its estimate for the Llama family.
"""

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxstack.mesh import make_mesh
from sharding_rules import (
    ModelAnalysis,
    ShardingRuleError,
    auto_mesh,
    param_rules,
    specs_tree,
    tensor_allreduce_bytes,
)


def device_memory_bytes() -> int:
    """Usable memory of one local device (host RAM split over CPU devices)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // jax.local_device_count()


def choose_mesh_for(
    analysis: ModelAnalysis,
    abstract_params: Any,
    *,
    batch_size: int,
    calls_per_step: int = 1,
    opt_state: Any = None,
    overrides: dict[str, PartitionSpec] | None = None,
    training: bool = True,
    activation_dtype: Any = None,
    devices: list | None = None,
) -> Mesh:
    """The cheapest fitting mesh over ``devices`` (default all) for the traced computation.

    Args:
      analysis: ``analyze_model`` of the function the mesh runs (the loss or prediction),
        traced on one call's global shapes.
      abstract_params: parameter shapes.
      batch_size: global examples per call; a candidate whose ``data x fsdp`` does not
        divide it is rejected.
      calls_per_step: traced calls per optimizer step (gradient accumulation).
      opt_state: optimizer state shapes (training), planned beside params and gradients.
      training: count gradients and the backward pass's traffic.
      activation_dtype: dtype of the all-reduced activations (default: the params').

    Raises:
      ShardingRuleError: no candidate fits; the message says what the smallest needs.
    """
    devices = list(jax.devices() if devices is None else devices)
    leaves = jax.tree.leaves(abstract_params)
    itemsize = np.dtype(activation_dtype or leaves[0].dtype).itemsize

    def specs_for(sizes: dict[str, int]) -> Any:
        shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
        if batch_size % shards:
            raise ShardingRuleError(f"a batch of {batch_size} does not divide over {shards}")
        return specs_tree(analysis, param_rules(analysis, sizes, overrides))

    result = auto_mesh(
        len(devices),
        device_memory_bytes(),
        specs_for,
        abstract_params,
        tensor_allreduce_bytes=lambda specs: (
            calls_per_step * tensor_allreduce_bytes(analysis, specs, itemsize, training=training)
        ),
        opt_state=opt_state,
        training=training,
    )
    sizes = result.axis_sizes
    return make_mesh(**sizes, devices=devices)
