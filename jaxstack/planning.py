"""Plan a run before allocating anything: memory per device for a mesh, and ``mesh="auto"``.

Parameter, gradient and optimizer-state bytes come from the real shapes (``jax.eval_shape``)
and the automatic sharding rules; activations are an estimate from the model config.
"""

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxstack.auto import device_memory_bytes
from jaxstack.layers.moe import expert_capacity
from jaxstack.layers.pipeline import PipelineSchedule, choose_microbatches
from jaxstack.lm import lm_analysis
from jaxstack.lora import LoRAConfig, adapter_specs, find_targets, init_adapters
from jaxstack.lora.training import adapter_reasons, combined_plan
from jaxstack.losses import DEFAULT_CHUNK_SIZE, chunk_layout
from jaxstack.mesh import BATCH_AXES, parse_mesh
from jaxstack.models import Llama, LlamaConfig, MixtralConfig, model_for
from jaxstack.models.llama import parse_remat
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
from sharding_rules.plan import format_bytes

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
    and a float32 logsumexp per token. Tensor-parallel parts divide by ``tensor`` (the
    residual stream and norms too with ``tensor_parallel`` other than ``plain``); tokens
    divide over the batch axes (``data x fsdp x expert``) and each sequence over ``sequence``
    (context parallelism). Context-parallel attention keeps no scores for the backward (it
    recomputes them ring step by ring step) but a float32 log-sum-exp per query and head;
    its one live step holds the scores and probabilities of a ``[s / sequence]^2`` block per
    head, counted once.

    A per-name ``remat`` keeps the activations it saves (``[tokens, hidden]`` each); offloaded
    ones live in host memory (``offloaded_activation_bytes``). With ``stage`` > 1 (GPipe,
    ``jaxstack.layers.pipeline``) a device keeps its ``num_layers / stage`` layers' residuals
    for every one of the ``microbatches + stage - 1`` iterations, each on one microbatch.

    An MoE layer (``MixtralConfig``) keeps, in place of the dense SwiGLU hidden tensors, its
    routing buffers (``moe_layer_bytes``).
    """
    itemsize = jnp.dtype(config.dtype).itemsize
    tensor = axis_sizes.get("tensor", 1)
    rows = math.ceil(micro_batch / batch_shards(axis_sizes))
    local_seq = math.ceil(seq_len / axis_sizes.get("sequence", 1))
    tokens = rows * local_seq
    context_parallel = config.context_parallel != "none" and axis_sizes.get("sequence", 1) > 1
    d, hd, f = config.hidden_size, config.head_dim_, config.intermediate_size
    # the residual stream and norms: split over tensor too with sequence parallelism
    resid = d / tensor if config.tensor_parallel != "plain" else d
    qkvo = (2 * config.num_heads + 2 * config.num_kv_heads) * hd / tensor
    xla = config.attention_impl == "xla" or (
        config.attention_impl == "auto" and jax.default_backend() == "cpu"
    )
    heads = config.num_heads / tensor
    # float32 per token: context parallel keeps a log-sum-exp per head, XLA attention a row of
    # scores per head, the flash kernels nothing
    per_key = 0 if context_parallel or not xla else seq_len
    scores = 4 * heads * (1 if context_parallel else per_key)
    live_block = 2 * rows * local_seq * local_seq * heads * 4 if context_parallel else 0
    moe_layers = len(config.moe_layers) if isinstance(config, MixtralConfig) else 0
    moe = moe_layer_bytes(config, tokens, axis_sizes) if moe_layers else 0
    dense_mlp = tokens * itemsize * 3 * f / tensor
    mlp = ((config.num_layers - moe_layers) * dense_mlp + moe_layers * moe) / config.num_layers
    full_layer = tokens * (itemsize * (4 * resid + qkvo) + scores) + mlp
    dots = tokens * itemsize * (resid + qkvo) + 2 / 3 * mlp  # the matmul outputs of the MLP
    named = parse_remat(config.remat)
    if named is not None:  # each named activation is [tokens, hidden]
        saved = sum(choice == "save" for choice in named.values())
        kept = tokens * itemsize * resid * saved
    else:
        kept = {"none": full_layer, "full": tokens * itemsize * resid}.get(config.remat, dots)
    recompute = (0 if config.remat == "none" else full_layer) + live_block
    layers = config.num_layers * kept
    stages = axis_sizes.get("stage", 1)
    if stages > 1:  # GPipe: a stage keeps its layers' residuals of every iteration
        microbatches = choose_microbatches(micro_batch, stages, config.pipeline_microbatches,
                                           batch_shards(axis_sizes))  # fmt: skip
        share = math.ceil(micro_batch / microbatches / batch_shards(axis_sizes)) / rows
        in_flight = microbatches + stages - 1
        layers = in_flight * config.num_layers // stages * kept * share
        recompute *= share
    chunk_tokens = rows * chunk_layout(local_seq, chunk_size)[1]
    logits = 2 * chunk_tokens * config.vocab_size / tensor * 4 + tokens * 4
    return int(layers + recompute + logits)


def moe_layer_bytes(config: MixtralConfig, tokens: int, axis_sizes: dict[str, int]) -> int:
    """Bytes one MoE MLP keeps per device for its ``tokens`` tokens: the float32 router logits
    and scores ``[tokens, E]``; the rows ``[a, d]`` gathered for the experts and their
    outputs in assignment order (``a = tokens * k``); the expert buffer ``[r, d]`` with its
    gate, up and activation ``[r, f / tensor]`` (``r = a``, or with expert parallelism the
    worst-case receive buffer ``a * expert``, ``E * capacity`` with a capacity factor); the
    shared expert's three hidden tensors."""
    itemsize = jnp.dtype(config.dtype).itemsize
    expert, tensor = axis_sizes.get("expert", 1), axis_sizes.get("tensor", 1)
    d, k, e = config.hidden_size, config.experts_per_token, config.num_experts
    assignments = tokens * k
    received = assignments * expert
    capacity = expert_capacity(tokens, k, e, config.capacity_factor)
    if capacity is not None:
        received = min(received, capacity * e)
    router = tokens * e * 4 * 2
    experts = received * (d + 3 * config.expert_intermediate_size / tensor)
    shared = tokens * 3 * config.shared_intermediate_size / tensor
    return int(router + itemsize * (2 * assignments * d + experts + shared))


def _abstract(run: "RunConfig"):
    model = model_for(run.model)
    params = jax.eval_shape(
        lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        jax.random.PRNGKey(0),
    )
    opt_state = jax.eval_shape(optimizer_for(run.train, run.train.num_steps or 1).init, params)
    return model, params, opt_state


def batch_shards(sizes: dict[str, int]) -> int:
    """How many ways a mesh of axis ``sizes`` splits the batch (``BATCH_AXES``)."""
    return math.prod(sizes.get(name, 1) for name in BATCH_AXES)


def micro_batch_size(run: "RunConfig", sizes: dict[str, int]) -> int:
    """Global examples per micro-batch of ``run`` on a mesh of axis ``sizes``."""
    return global_batch_size(run.train, batch_shards(sizes)) // run.train.grad_accum_steps


def _rules_fn(run: "RunConfig", model: Llama, params):
    """axis sizes -> ``param_rules``, from one trace of the forward pass."""
    analysis = lm_analysis(model, run.data.seq_len, params)

    def rules_fn(sizes: dict[str, int]):
        shards = batch_shards(sizes)
        micro = micro_batch_size(run, sizes)
        if micro % shards:
            raise ShardingRuleError(
                f"micro-batch of {micro} does not divide over data x fsdp x expert = {shards}"
            )
        split = 2 * sizes.get("sequence", 1)  # the zig-zag layout of context parallelism
        if split > 2 and run.data.seq_len % split:
            raise ShardingRuleError(
                f"sequence length {run.data.seq_len} does not split into {split} zig-zag "
                f"chunks over sequence={split // 2}"
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
    """``mesh="auto"``: the fitting (data, fsdp, tensor) shape with the least communication;
    with context parallelism in the model, the smallest ``sequence`` split when a long
    sequence fits no mesh without one."""
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
        split_sequence=cfg.context_parallel != "none",
    )


def offloaded_activation_bytes(
    config: LlamaConfig, micro_batch: int, seq_len: int, axis_sizes: dict[str, int]
) -> int:
    """Host bytes per device of the activations a per-name ``remat`` offloads (``[tokens,
    hidden]`` per name and layer; under stages, those of every in-flight iteration)."""
    named = parse_remat(config.remat) or {}
    offloaded = sum(choice == "offload" for choice in named.values())
    shards, stages = batch_shards(axis_sizes), axis_sizes.get("stage", 1)
    rows, layers = math.ceil(micro_batch / shards), config.num_layers
    if stages > 1:
        microbatches = choose_microbatches(micro_batch, stages, config.pipeline_microbatches,
                                           shards)  # fmt: skip
        rows = math.ceil(micro_batch / microbatches / shards)
        layers = (microbatches + stages - 1) * config.num_layers // stages
    width = config.hidden_size * jnp.dtype(config.dtype).itemsize
    tokens = rows * math.ceil(seq_len / axis_sizes.get("sequence", 1))
    return int(layers * offloaded * tokens * width)


def plan_notes(run: "RunConfig", plan: MemoryPlan) -> list[str]:
    """Lines the plan table leaves out: the pipeline schedule of a ``stage`` mesh (its
    bubble, per-stage memory and the bytes crossing each stage boundary per step) and host
    offload (device bytes saved, host bytes used)."""
    sizes, cfg = plan.mesh_axis_sizes, run.model
    micro = micro_batch_size(run, sizes)
    notes = []
    stages = sizes.get("stage", 1)
    if stages > 1:
        shards = batch_shards(sizes)
        m = choose_microbatches(micro, stages, cfg.pipeline_microbatches, shards)
        schedule = PipelineSchedule(stages, cfg.num_layers, m)
        # per device and direction: one [microbatch rows, seq, hidden] slice per iteration
        slice_bytes = (
            math.ceil(micro / m / shards) * math.ceil(run.data.seq_len / sizes["sequence"])
            * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
        )  # fmt: skip
        boundary = 2 * schedule.iterations * slice_bytes * run.train.grad_accum_steps
        notes += [
            f"pipeline: GPipe, {stages} stages x {cfg.num_layers // stages} layers, {m} "
            f"microbatches of {micro // m} rows; bubble (stages-1)/(microbatches+stages-1) = "
            f"{schedule.bubble_fraction:.1%}",
            f"  per stage (each device of a stage): {format_bytes(plan.total_bytes)} "
            f"(params {format_bytes(plan.param_bytes)}, optimizer "
            f"{format_bytes(plan.opt_state_bytes)}, activations of {schedule.iterations} "
            f"in-flight iterations {format_bytes(plan.activation_bytes)})",
            f"  crossing each stage boundary per step, per device: {format_bytes(boundary)} "
            "(forward and backward)",
        ]
    if run.train.optimizer_offload:
        notes.append(
            f"optimizer offload: the {format_bytes(plan.opt_state_bytes)} of optimizer state "
            "per device live in pinned_host (host) memory between steps; on the device "
            f"{format_bytes(plan.total_bytes - plan.opt_state_bytes)}"
        )
    if run.lora.enabled:
        full = plan_run(dataclasses.replace(run, lora=LoRAConfig(rank=0)),
                        math.prod(sizes.values()))  # fmt: skip
        notes.append(
            f"LoRA rank {run.lora.rank}: gradients + optimizer state "
            f"{format_bytes(plan.grad_bytes + plan.opt_state_bytes)} per device (adapters "
            f"only; full fine-tuning: {format_bytes(full.grad_bytes + full.opt_state_bytes)})"
        )
    host = offloaded_activation_bytes(cfg, micro, run.data.seq_len, sizes)
    if host:
        notes.append(
            f"activation offload (remat={cfg.remat!r}): {format_bytes(host)} per device in "
            "pinned_host (host) memory, not on the device"
        )
    return notes


def plan_run(run: "RunConfig", num_devices: int | None = None) -> MemoryPlan:
    """The memory plan of ``run`` on its mesh (``auto`` included) for ``num_devices``
    (``plan_notes`` adds what lives in host memory and the pipeline schedule)."""
    sizes = mesh_axis_sizes(run, num_devices)
    model, params, opt_state = _abstract(run)
    analysis, rules_fn = _rules_fn(run, model, params)
    rules = rules_fn(sizes)
    specs = specs_tree(analysis, rules)
    micro = micro_batch_size(run, sizes)
    reasons = {path: rule.reason for path, rule in rules.items()}
    activations = activation_bytes(run.model, micro, run.data.seq_len, sizes)
    if run.lora.enabled:  # the base frozen; gradients and optimizer state of adapters only
        targets = find_targets(analysis, run.lora)
        adapters = jax.eval_shape(lambda rng: init_adapters(rng, targets, run.lora.rank),
                                  jax.random.PRNGKey(0))  # fmt: skip
        a_specs = adapter_specs(params, specs, adapters)
        a_opt = jax.eval_shape(optimizer_for(run.train, run.train.num_steps or 1).init, adapters)
        trained = make_plan(adapters, a_specs, sizes, opt_state=a_opt,
                            opt_state_specs=optimizer_state_specs(a_opt, adapters, a_specs),
                            activation_bytes=activations,
                            reasons=adapter_reasons(adapters))  # fmt: skip
        frozen = make_plan(params, specs, sizes, gradients=False, reasons=reasons)
        return combined_plan(frozen, trained)
    return make_plan(
        params,
        specs,
        sizes,
        opt_state=opt_state,
        opt_state_specs=optimizer_state_specs(opt_state, params, specs),
        activation_bytes=activations,
        reasons=reasons,
    )
