"""Plan a run before allocating anything: memory per device for a mesh, and ``mesh="auto"``.

Parameter, gradient and optimizer-state bytes come from the real shapes (``jax.eval_shape``)
and the automatic sharding rules; activations are an estimate from the model config.
"""

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxstack.auto import device_memory_bytes
from jaxstack.lm import lm_analysis
from jaxstack.losses import DEFAULT_CHUNK_SIZE, chunk_layout
from jaxstack.mesh import parse_mesh
from jaxstack.models.llama import Llama, LlamaConfig
from jaxstack.optim import optimizer_for
from jaxstack.train_config import global_batch_size
from sharding_rules import (
    MESH_AXES,
    MemoryPlan,
    ShardingRuleError,
    auto_mesh,
    make_plan,
    optimizer_state_specs,
    param_rules,
    specs_tree,
    tensor_allreduce_bytes,
)

if TYPE_CHECKING:
    from jaxstack.run import RunConfig


def activation_bytes(
    config: LlamaConfig,
    micro_batch: int,
    seq_len: int,
    axis_sizes: dict[str, int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Estimated activation bytes per device kept for the backward pass of one micro-batch.

    Per token and layer, without remat: the residual and normed inputs (4 x width), q/k/v and
    the attention output, the three SwiGLU hidden tensors, in the compute dtype; with XLA
    attention (``xla``, or ``auto`` on CPU) also the float32 score matrix. ``full`` remat
    keeps only each layer's input (plus one layer recomputed at a time); ``dots`` policies
    keep the matmul outputs. The loss (``jaxstack.losses.fused_cross_entropy`` with
    ``chunk_size``) adds the float32 logits of one chunk of positions and their gradient,
    and a float32 logsumexp per token. Tensor-parallel parts divide by ``tensor``; tokens
    divide over ``data x fsdp``.
    """
    itemsize = jnp.dtype(config.dtype).itemsize
    tensor = axis_sizes.get("tensor", 1)
    rows = math.ceil(micro_batch / (axis_sizes.get("data", 1) * axis_sizes.get("fsdp", 1)))
    tokens = rows * seq_len
    d, hd, f = config.hidden_size, config.head_dim_, config.intermediate_size
    qkvo = (2 * config.num_heads + 2 * config.num_kv_heads) * hd / tensor
    xla = config.attention_impl == "xla" or (
        config.attention_impl == "auto" and jax.default_backend() == "cpu"
    )
    scores = seq_len * config.num_heads / tensor * 4 if xla else 0
    full_layer = tokens * (itemsize * (4 * d + qkvo + 3 * f / tensor) + scores)
    kept = {
        "none": full_layer,
        "full": tokens * itemsize * d,
        "dots": tokens * itemsize * (d + qkvo + 2 * f / tensor),
        "dots_no_batch": tokens * itemsize * (d + qkvo + 2 * f / tensor),
    }[config.remat]
    recompute = 0 if config.remat == "none" else full_layer
    chunk_tokens = rows * chunk_layout(seq_len, chunk_size)[1]
    logits = 2 * chunk_tokens * config.vocab_size / tensor * 4 + tokens * 4
    return int(config.num_layers * kept + recompute + logits)


def _abstract(run: "RunConfig"):
    model = Llama(run.model)
    params = jax.eval_shape(
        lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        jax.random.PRNGKey(0),
    )
    opt_state = jax.eval_shape(optimizer_for(run.train, run.train.num_steps or 1).init, params)
    return model, params, opt_state


def micro_batch_size(run: "RunConfig", sizes: dict[str, int]) -> int:
    """Global examples per micro-batch of ``run`` on a mesh of axis ``sizes``."""
    shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
    return global_batch_size(run.train, shards) // run.train.grad_accum_steps


def _rules_fn(run: "RunConfig", model: Llama, params):
    """axis sizes -> ``param_rules``, from one trace of the forward pass."""
    analysis = lm_analysis(model, run.data.seq_len, params)

    def rules_fn(sizes: dict[str, int]):
        shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
        micro = micro_batch_size(run, sizes)
        if micro % shards:
            raise ShardingRuleError(
                f"micro-batch of {micro} does not divide over data x fsdp = {shards}"
            )
        return param_rules(analysis, sizes)

    return analysis, rules_fn


def mesh_axis_sizes(run: "RunConfig", num_devices: int | None = None) -> dict[str, int]:
    """The run's mesh as axis sizes: parsed from ``run.mesh`` or chosen by ``auto``."""
    num_devices = num_devices or jax.device_count()
    if run.mesh != "auto":
        sizes = {a: 1 for a in MESH_AXES} | parse_mesh(run.mesh)
        free = [a for a, n in sizes.items() if n == -1]
        if free:
            sizes[free[0]] = num_devices // -math.prod(sizes.values())
        return sizes
    return choose_mesh(run, num_devices).axis_sizes


def choose_mesh(run: "RunConfig", num_devices: int, memory_bytes: int | None = None):
    """``mesh="auto"``: the fitting (data, fsdp, tensor) shape with the least communication."""
    model, params, opt_state = _abstract(run)
    cfg = run.model
    if run.train.per_device_batch_size is not None:
        raise ValueError(
            "mesh=auto with per_device_batch_size is ambiguous (each mesh shape gives another "
            "global batch); give --train.batch_size instead"
        )
    micro = micro_batch_size(run, {})
    analysis, rules_fn = _rules_fn(run, model, params)  # traced on one sequence
    itemsize = jnp.dtype(cfg.dtype).itemsize
    steps = micro * run.train.grad_accum_steps
    return auto_mesh(
        num_devices,
        memory_bytes or device_memory_bytes(),
        lambda sizes: specs_tree(analysis, rules_fn(sizes)),
        params,
        tensor_allreduce_bytes=lambda specs: (
            steps * tensor_allreduce_bytes(analysis, specs, itemsize)
        ),
        opt_state=opt_state,
        activation_bytes_fn=lambda sizes: activation_bytes(cfg, micro, run.data.seq_len, sizes),
    )


def plan_run(run: "RunConfig", num_devices: int | None = None) -> MemoryPlan:
    """The memory plan of ``run`` on its mesh (``auto`` included) for ``num_devices``."""
    sizes = mesh_axis_sizes(run, num_devices)
    model, params, opt_state = _abstract(run)
    analysis, rules_fn = _rules_fn(run, model, params)
    rules = rules_fn(sizes)
    specs = specs_tree(analysis, rules)
    micro = micro_batch_size(run, sizes)
    return make_plan(
        params,
        specs,
        sizes,
        opt_state=opt_state,
        opt_state_specs=optimizer_state_specs(opt_state, params, specs),
        activation_bytes=activation_bytes(run.model, micro, run.data.seq_len, sizes),
        reasons={path: rule.reason for path, rule in rules.items()},
    )
