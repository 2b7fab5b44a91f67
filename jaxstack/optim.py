"""Optimizer, learning-rate schedule and weight-decay mask built from a ``TrainConfig``."""

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxstack.train_config import SCHEDULES, TrainConfig
from sharding_rules import ModelAnalysis
from sharding_rules.trace import BATCH, CONTRACT, FREE, VOCAB, WIDTH


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_steps: int, kind: str, min_ratio: float
) -> optax.Schedule:
    """Linear warmup to ``peak`` then cosine/linear decay to ``peak * min_ratio`` (or constant).

    Steps count optimizer updates, never micro-batches.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}; choose one of {SCHEDULES}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds num_steps={total_steps}")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, peak * min_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [warmup_steps])


def optimizer_for(
    config: TrainConfig, num_steps: int, decay_mask: Any = None
) -> optax.GradientTransformation:
    """AdamW with ``config``'s schedule over ``num_steps`` updates.

    The learning rate is an injected hyperparameter, so the value each update used is in the
    optimizer state (``learning_rate_of``). ``decay_mask`` (a pytree of bools like the params,
    or None: decay everything) selects the parameters weight decay applies to. Clipping is
    not part of it: the Trainer clips before any optimizer (``TrainConfig.grad_clip``).
    """
    schedule = learning_rate_schedule(
        config.learning_rate, num_steps, config.warmup_steps, config.schedule, config.min_lr_ratio
    )
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        mask=decay_mask,
    )


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def learning_rate_of(opt_state: Any) -> jax.Array | None:
    """The learning rate the last update used, read from the optimizer state.

    Found where the optimizer (or one stage of an ``optax.chain``) was built with
    ``optax.inject_hyperparams`` and has a ``learning_rate``; None when no stage says (a
    learning rate the state does not hold is never guessed).
    """
    states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _INJECTED))
    rates = [s.hyperparams["learning_rate"] for s in states if isinstance(s, _INJECTED)
             and "learning_rate" in s.hyperparams]  # fmt: skip
    return jnp.asarray(rates[0], jnp.float32) if len(rates) == 1 else None


def weight_decay_mask(analysis: ModelAnalysis, config: TrainConfig) -> Any:
    """Which parameters weight decay applies to, from how the computation uses them.

    A weight matrix (some matmul contracts it against an activation, or an expert weight
    batched against one) decays; an embedding table (read by a gather or one-hot matmul, a
    tied output head included) decays only with ``config.decay_embeddings``; everything else
    (norm scales, biases) never does. Paths matching ``config.no_decay`` never decay.
    Returns a pytree of bools shaped like the params.
    """
    pattern = re.compile(config.no_decay) if config.no_decay else None
    mask = []
    for leaf, path in enumerate(analysis.paths):
        roles = set().union(*(analysis.roles.get((leaf, d), ()) for d in
                              range(len(analysis.shapes[leaf]))))  # fmt: skip
        if roles & {VOCAB, WIDTH}:
            decays = config.decay_embeddings
        else:
            decays = bool(roles & {CONTRACT, FREE, BATCH})
        mask.append(decays and not (pattern and pattern.search(path)))
    return jax.tree.unflatten(analysis.treedef, mask)


HOST = "pinned_host"
"""The memory kind offloaded state lives in (``TrainConfig.optimizer_offload``)."""


def in_memory(tree: Any, shardings: Any, kind: str) -> Any:
    """``tree`` moved to memory ``kind`` (``device`` or ``pinned_host``) of its ``shardings``
    (a pytree of ``NamedSharding``); inside ``jit`` a transfer XLA schedules in the step."""
    return jax.device_put(tree, jax.tree.map(lambda s: s.with_memory_kind(kind), shardings))


def host_argument_bytes(compiled: jax.stages.Compiled) -> int:
    """Bytes per device of a compiled step's arguments laid out in host memory (memory space
    ``S(5)`` in its entry layout): what offload keeps off the device. XLA's CPU
    ``memory_analysis`` counts them among the device arguments; GPU and TPU report them apart."""
    text = compiled.as_text()
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", text)
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]\{[^}]*S\(5\)", layout.group(1)):
        itemsize = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8  # f32, s32, bf16
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += itemsize * count
    return total


def clip_by_global_norm(grads: Any, norm: jax.Array, max_norm: float | None) -> Any:
    """``grads`` scaled so that their global norm (``norm``, computed once by the caller) is at
    most ``max_norm``; unchanged when ``max_norm`` is None."""
    if max_norm is None:
        return grads
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
