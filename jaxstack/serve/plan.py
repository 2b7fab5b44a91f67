"""What serving a model will hold on each device, computed before anything is loaded
(``jaxstack serve ... --dry-run``): the weights' share under the serving sharding, the KV
pages' share, and the KV capacity in tokens."""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from jaxstack.models import model_for
from jaxstack.serve.engine import EngineConfig
from jaxstack.serve.runner import page_shape, page_spec, serving_param_specs
from sharding_rules import MESH_AXES

MIB = 2**20


@dataclass(frozen=True)
class ServingPlan:
    """Bytes per device of one serving configuration (the largest share over devices)."""

    tensor: int
    dtype: str
    weight_bytes: int
    """The weights on one device."""
    model_bytes: int
    """The whole model in ``dtype`` (what one device would hold without sharding)."""
    kv_bytes: int
    """The KV pages on one device."""
    kv_tokens: int
    """Token slots of the KV cache (shared by all running requests)."""

    @property
    def device_bytes(self) -> int:
        """Weights plus KV pages on one device."""
        return self.weight_bytes + self.kv_bytes

    def __str__(self) -> str:
        return "\n".join(
            [
                f"serving plan: tensor={self.tensor}, {self.dtype}, per device:",
                f"  weights   {self.weight_bytes / MIB:10.1f} MiB"
                f"   (whole model {self.model_bytes / MIB:.1f} MiB)",
                f"  KV cache  {self.kv_bytes / MIB:10.1f} MiB   ({self.kv_tokens} token slots)",
                f"  total     {self.device_bytes / MIB:10.1f} MiB",
            ]
        )


def plan_serving(model_config, *, tensor: int, engine: EngineConfig | None = None) -> ServingPlan:
    """The per-device bytes of serving ``model_config`` (in its ``dtype``) ``tensor``-way
    parallel with the engine sizes of ``engine``; traces the model abstractly, allocates
    nothing and needs no devices."""
    engine = engine or EngineConfig()
    mesh = AbstractMesh(tuple(tensor if a == "tensor" else 1 for a in MESH_AXES), MESH_AXES)
    model = model_for(model_config)
    dtype = jnp.dtype(model_config.dtype)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    specs = serving_param_specs(model, abstract["params"], mesh)

    def share(shape: tuple[int, ...], spec) -> int:
        return math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * dtype.itemsize

    leaves = jax.tree.leaves(abstract["params"])
    weights = sum(map(share, [x.shape for x in leaves], jax.tree.leaves(specs)))
    max_len = engine.max_model_len or model_config.max_seq_len
    # without num_pages the engine sizes the cache from free memory, at most this many
    num_pages = engine.num_pages or math.ceil(max_len / engine.page_size) * engine.seq_buckets[-1]
    layer = page_shape(model_config, num_pages, engine.page_size)
    kv = model_config.num_layers * share(layer, page_spec(layer, dict(mesh.shape)))
    return ServingPlan(
        tensor=tensor,
        dtype=str(dtype),
        weight_bytes=weights,
        model_bytes=sum(x.size for x in leaves) * dtype.itemsize,
        kv_bytes=kv,
        kv_tokens=num_pages * engine.page_size,
    )
