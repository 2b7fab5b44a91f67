"""The pure training and evaluation steps the Trainer jits (no I/O, no host syncs).

``loss_fn(params, batch, rng)`` returns ``loss`` or ``(loss, metrics)``. It may say what its
loss is a mean over by putting ``metrics["num_tokens"]`` (a scalar: e.g. the target tokens
of the micro-batch). Micro-batches and evaluation batches are then weighted by it, so a
loss summed over every token and divided once is exact whatever the split: gradient
accumulation over packed or masked data equals the large-batch step. Without it every
micro-batch weighs the same.
"""

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxstack.optim import HOST, clip_by_global_norm, in_memory, learning_rate_of

NUM_TOKENS = "num_tokens"
"""The ``loss_fn`` metric that names its normaliser (module doc)."""

Params = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, jax.Array], jax.Array | tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: saved whole in every checkpoint."""

    step: jax.Array
    """Steps taken (updates applied or skipped); the loader position follows it."""
    params: Params
    opt_state: optax.OptState
    rng: jax.Array
    skipped_in_row: jax.Array
    """Consecutive steps whose update was skipped for a non-finite loss or gradient."""
    skipped_total: jax.Array
    """Steps skipped over the whole run."""


def cast_floating(params: Params, dtype: str | None) -> Params:
    """``params`` with floating leaves cast to ``dtype`` (the mixed-precision compute copy)."""
    if dtype is None:
        return params
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def weighted_loss(
    loss_fn: LossFn, compute_dtype: str | None, scale: bool = True
) -> Callable[..., tuple[jax.Array, tuple]]:
    """``(params, batch, rng, *frozen) -> (loss * weight, (loss, weight, metrics))`` for
    ``grad`` (``loss`` alone first with ``scale=False``). ``frozen``: inputs the loss reads but
    never trains (a LoRA base), passed on to ``loss_fn`` after ``rng`` and cast like params.

    ``weight`` is ``metrics.pop("num_tokens")`` as float32 without gradient, or None when
    ``loss_fn`` gives none (then every batch weighs 1).
    """

    def fn(params, batch, rng, *frozen):
        out = loss_fn(
            cast_floating(params, compute_dtype),
            batch,
            rng,
            *(cast_floating(f, compute_dtype) for f in frozen),
        )
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(metrics, dict):
            raise TypeError(
                "loss_fn must return loss or (loss, dict of metrics), got a "
                f"{type(metrics).__name__} as second element"
            )
        loss = jnp.asarray(loss, jnp.float32)
        if loss.shape != ():
            raise ValueError(f"loss_fn must return a scalar loss, got shape {loss.shape}")
        metrics = dict(metrics)
        weight = metrics.pop(NUM_TOKENS, None)
        if weight is None:
            return loss, (loss, None, metrics)
        weight = jax.lax.stop_gradient(jnp.asarray(weight, jnp.float32))
        return (loss * weight if scale else loss), (loss, weight, metrics)

    return fn


def _one_if_none(weight: jax.Array | None) -> jax.Array:
    return jnp.ones((), jnp.float32) if weight is None else weight


def _divide(total: Any, weight: jax.Array) -> Any:
    safe = jnp.where(weight > 0, weight, 1.0)
    return jax.tree.map(lambda x: (x / safe).astype(x.dtype), total)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int,
    grad_clip: float | None,
    compute_dtype: str | None,
    offload_shardings: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``(state, batch, *frozen) -> (state, metrics)``: one optimizer update (module doc);
    ``frozen`` inputs reach ``loss_fn`` untrained (``weighted_loss``).

    With ``offload_shardings`` (the optimizer state's ``NamedSharding``s) the state's
    optimizer state lives in host memory (``pinned_host``): it comes to the device for the
    update and goes back after it, inside the step.

    The batch's leading dim is split into ``grad_accum_steps`` micro-batches (micro-batch
    ``i`` takes examples ``i, i+k, ...`` so each stays spread over every batch shard). The
    global gradient norm is computed once and reused for clipping. A non-finite loss or
    norm leaves params and optimizer state untouched (the step still counts) and bumps the
    skip counters. Metrics: ``loss``, ``grad_norm``, ``skipped``, ``lr`` when the optimizer
    state holds one, ``num_tokens`` when ``loss_fn`` gives it, and ``loss_fn``'s own metrics
    (weighted means over micro-batches).
    """
    grad_fn = jax.value_and_grad(
        weighted_loss(loss_fn, compute_dtype, scale=grad_accum_steps > 1), has_aux=True
    )

    def gradients(params, batch, rng, frozen):
        """(grads, loss, metrics, num_tokens or None), exact over micro-batches."""
        if grad_accum_steps == 1:
            (loss, (_, weight, metrics)), grads = grad_fn(params, batch, rng, *frozen)
            return grads, loss, metrics, weight
        micro_batches = jax.tree.map(lambda x: split_micro_batches(x, grad_accum_steps), batch)

        def micro_step(grad_sum, inputs):
            micro_batch, index = inputs
            (weighted, (_, weight, metrics)), grads = grad_fn(
                params, micro_batch, jax.random.fold_in(rng, index), *frozen
            )
            scaled = jax.tree.map(lambda m: m * _one_if_none(weight), metrics)
            return jax.tree.map(jnp.add, grad_sum, grads), (weighted, weight, scaled)

        grad_sum, (weighted, weights, metrics) = jax.lax.scan(
            micro_step,
            jax.tree.map(jnp.zeros_like, params),
            (micro_batches, jnp.arange(grad_accum_steps)),
        )
        total = jnp.float32(grad_accum_steps) if weights is None else weights.sum()
        metrics = _divide(jax.tree.map(lambda m: m.sum(0), metrics), total)
        grads = _divide(grad_sum, total)
        loss = _divide(weighted.sum(), total)
        return grads, loss, metrics, None if weights is None else total

    def step(state: TrainState, batch: Batch, *frozen) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grads, loss, metrics, num_tokens = gradients(state.params, batch, step_rng, frozen)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            # clipped here, XLA fuses the scaling into the optimizer's elementwise update;
            # clipped before the cond, the gradients are written out once more as a
            # parameter-sized temporary (on CPU that made the update 2.6x slower)
            params, opt_state = operands
            clipped = clip_by_global_norm(grads, grad_norm, grad_clip)
            updates, opt_state = optimizer.update(clipped, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        opt_state = state.opt_state
        if offload_shardings is not None:
            opt_state = in_memory(opt_state, offload_shardings, "device")
        params, opt_state = jax.lax.cond(
            finite, update, lambda operands: operands, (state.params, opt_state)
        )
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=(
                opt_state
                if offload_shardings is None
                else in_memory(opt_state, offload_shardings, HOST)
            ),  # fmt: skip
            rng=rng,
            skipped_in_row=jnp.where(finite, 0, state.skipped_in_row + 1),
            skipped_total=state.skipped_total + skipped,
        )
        out = {**metrics, "loss": loss, "grad_norm": grad_norm, "skipped": skipped}
        learning_rate = learning_rate_of(opt_state)
        if learning_rate is not None:
            out["lr"] = learning_rate

        if num_tokens is not None:
            out[NUM_TOKENS] = num_tokens
        return new_state, out

    return step


def make_eval_step(
    loss_fn: LossFn, compute_dtype: str | None
) -> Callable[[Params, Batch, jax.Array], tuple[jax.Array, jax.Array, dict]]:
    """``(params, batch, rng, *frozen) -> (loss * weight, weight, metrics * weight)``: one
    evaluation batch's sums (weight 1 without ``num_tokens``), added over batches and divided
    once."""
    fn = weighted_loss(loss_fn, compute_dtype)

    def eval_step(params, batch, rng, *frozen):
        weighted, (_, weight, metrics) = fn(params, batch, rng, *frozen)
        weight = _one_if_none(weight)
        return weighted, weight, jax.tree.map(lambda m: m * weight, metrics)

    return eval_step


def split_micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """[accum * micro, ...] -> [accum, micro, ...], taking every accum-th example per micro-batch
    so that each micro-batch stays spread over all batch shards."""
    micro = x.shape[0] // accum
    return jnp.swapaxes(x.reshape(micro, accum, *x.shape[1:]), 0, 1)
