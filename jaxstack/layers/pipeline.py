"""Pipeline parallelism over the ``stage`` mesh axis: one SPMD program (MaxText's design).

A stack of ``L`` identical layers (weights with a leading ``[L]`` axis, sharded over ``stage``
in contiguous blocks by ``sharding_rules``) is viewed as ``[S, K]``: stage ``s`` holds layers
``s*K .. s*K + K - 1``. The batch ``[B, ...]`` is split into ``M`` microbatches of
``B / M`` rows (microbatch ``m`` takes rows ``m, m + M, ...``, so each stays spread over the
batch shards). GPipe schedule, ``M + S - 1`` iterations of one ``lax.scan``:

    state[s]   input of stage s (stage 0 reads microbatch t, stage s > 0 what stage s - 1
               produced last iteration: ``jnp.roll`` over the stage-sharded axis, which XLA
               lowers to a collective permute between neighbouring stages)
    out        = vmap(stage body)(weights [S, K, ...], state [S, mb, ...])   (every stage at
               once, each on its own devices: ``spmd_axis_name="stage"``)
    ys[t]      = out[S - 1]: microbatch t - S + 1 finished

Stage ``s`` works on microbatch ``t - s``; iterations where that is outside ``0 .. M - 1``
are the bubble, ``(S - 1) / (M + S - 1)`` of the time. The backward pass is the scan's own
transpose (the permutes run the other way). Weights of one stage never leave its devices;
only activations of ``[mb, ...]`` cross a stage boundary, once per iteration and direction.
Within a stage, FSDP-sharded weights are gathered at each use (once per microbatch) or, with
``fsdp_gather="once"``, once per step before the schedule.

Not supported here: the circular (interleaved) schedule, 1F1B / zero-bubble (they need
MPMD), KV caches (decoding runs the stack without stages).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sharding_rules import LOGICAL_AXIS_RULES, logical_to_spec, uses_our_axes

FSDP_GATHER = ("per_microbatch", "once")
"""When a stage gathers its FSDP-split weights (``pipeline``'s ``fsdp_gather``)."""

LayerFn = Callable[[Any, jax.Array, Any], jax.Array]
"""``(one layer's weights, x [mb, ...], extras of the microbatch) -> x``."""


@dataclass(frozen=True)
class PipelineSchedule:
    """How a stack of ``layers`` runs on ``stages`` stages over ``microbatches`` (GPipe)."""

    stages: int
    layers: int
    microbatches: int

    def __post_init__(self) -> None:
        if self.stages < 1 or self.layers % self.stages:
            raise ValueError(
                f"{self.layers} layers do not split into stage={self.stages} pipeline stages; "
                f"use a stage count that divides the layer count"
            )
        if self.microbatches < self.stages or self.microbatches % self.stages:
            raise ValueError(
                f"pipeline_microbatches={self.microbatches} is not a multiple of "
                f"stage={self.stages}; use {2 * self.stages} (2 x stages) or another multiple"
            )

    @property
    def iterations(self) -> int:
        """Scan iterations of one forward pass: ``microbatches + stages - 1``."""
        return self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Fraction of stage-iterations idle: ``(stages - 1) / (microbatches + stages - 1)``."""
        return (self.stages - 1) / self.iterations


def stage_count() -> int:
    """Size of the ``stage`` axis of the current mesh (``jax.set_mesh``); 1 outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh):
        return 1
    return dict(mesh.shape).get("stage", 1)


def batch_shards() -> int:
    """How many ways the current mesh splits the batch (the axes of logical ``batch``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh):
        return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(axis, 1) for axis in LOGICAL_AXIS_RULES["batch"])


def choose_microbatches(batch: int, stages: int, requested: int = 0, shards: int = 1) -> int:
    """Microbatches for a batch of ``batch`` rows on ``stages`` stages.

    ``requested`` > 0 is checked and returned. ``0`` picks ``2 x stages`` when the batch
    splits into that many microbatches whose rows divide over the ``shards`` batch shards,
    else ``stages`` on the same terms, else the largest multiple of ``stages`` (at most
    ``2 x stages``) that divides the batch.

    Raises:
        ValueError: the batch does not split into the requested count, or into any multiple
            of ``stages`` (the batch is too small or not a multiple of ``stages``).
    """
    if requested:
        if batch % requested:
            raise ValueError(
                f"a batch of {batch} rows does not split into pipeline_microbatches="
                f"{requested}; use a count that divides the batch (and is a multiple of "
                f"stage={stages})"
            )
        return requested
    candidates = [m for m in (2 * stages, stages) if batch % m == 0]
    for m in candidates:
        if (batch // m) % shards == 0:
            return m
    if candidates:
        return candidates[0]
    raise ValueError(
        f"a batch of {batch} rows cannot feed stage={stages} pipeline stages: it must be a "
        f"multiple of {stages} (best {2 * stages * shards}: 2 x stages microbatches over "
        f"{shards} batch shards); raise the batch size"
    )


def _constrain(x: jax.Array, first: tuple) -> jax.Array:
    """Constrain the leading dims of ``x`` to the mesh axes of logical names ``first``
    (``"stage"``, ``"batch"`` or None), the rest left to XLA; a no-op outside our mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh):
        return x
    sizes = dict(mesh.shape)
    spec = []
    for name, dim in zip(first, x.shape, strict=False):
        (axes,) = logical_to_spec([name], sizes)
        names = (axes,) if isinstance(axes, str) else (axes or ())
        fits = dim % math.prod(sizes[a] for a in names) == 0
        spec.append(axes if fits else PartitionSpec.UNCONSTRAINED)
    spec += [PartitionSpec.UNCONSTRAINED] * (x.ndim - len(spec))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def to_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...] -> [M, B / M, ...]``, microbatch ``m`` holding rows ``m, m + M, ...``."""
    rows = x.shape[0] // microbatches
    return jnp.swapaxes(x.reshape(rows, microbatches, *x.shape[1:]), 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
    """The inverse of ``to_microbatches``: ``[M, B / M, ...] -> [B, ...]``."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def pipeline(
    layer_fn: LayerFn,
    layer_weights: Any,
    x: jax.Array,
    extras: Any = None,
    *,
    stages: int,
    microbatches: int,
    fsdp_gather: str = "per_microbatch",
) -> jax.Array:
    """Run ``x [B, ...]`` through the stacked layers, pipelined over ``stages`` (GPipe).

    Args:
        layer_fn: one layer, ``(weights, x [mb, ...], extras) -> x`` (remat it yourself).
        layer_weights: pytree of ``[L, ...]`` arrays (``L`` a multiple of ``stages``), the
            leading axis sharded over ``stage``.
        x: activations ``[B, ...]``, ``B`` a multiple of ``microbatches``.
        extras: pytree of ``[B, ...]`` arrays travelling with each row (positions, segment
            ids), or None.
        stages, microbatches: the ``PipelineSchedule``.
        fsdp_gather: when weights split over ``fsdp`` inside a stage are gathered:
            ``per_microbatch`` (at each use, in every iteration: least memory) or ``once``
            (the stage's whole block before the schedule, its gradient reduced once after:
            fewest collectives, a stage's weights whole on each of its devices).

    Returns:
        ``[B, ...]``: the same as applying the ``L`` layers in order to every row.

    Raises:
        ValueError: the schedule is invalid (``PipelineSchedule``) or ``B`` does not split.
    """
    if fsdp_gather not in FSDP_GATHER:
        raise ValueError(f"fsdp_gather={fsdp_gather!r}; choose one of {FSDP_GATHER}")
    num_layers = jax.tree.leaves(layer_weights)[0].shape[0]
    schedule = PipelineSchedule(stages, num_layers, microbatches)
    choose_microbatches(x.shape[0], stages, microbatches)

    def per_stage(w):  # [L, ...] -> [S, K, ...]: stage s's block of layers, on its devices
        w = w.reshape(stages, num_layers // stages, *w.shape[1:])
        if fsdp_gather == "once" and uses_our_axes(jax.sharding.get_abstract_mesh()):
            return jax.lax.with_sharding_constraint(w, PartitionSpec("stage"))  # rest whole
        return _constrain(w, ("stage",))

    weights = jax.tree.map(per_stage, layer_weights)
    xs = _constrain(to_microbatches(x, microbatches), (None, "batch"))
    extras_mb = jax.tree.map(lambda e: to_microbatches(e, microbatches), extras)
    stage_ids = jnp.arange(stages)

    def stage_body(stage_weights, h, stage_extras):
        def one_layer(h, w):
            return layer_fn(w, h, stage_extras), None

        return jax.lax.scan(one_layer, h, stage_weights)[0]

    run_stages = jax.vmap(stage_body, spmd_axis_name="stage")

    def iteration(previous, t):
        # stage 0 takes microbatch t (past the last one it repeats it: bubble work, dropped);
        # stage s > 0 takes what stage s - 1 made last iteration (a collective permute)
        fresh = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, microbatches - 1), 0, False)
        rolled = jnp.roll(previous, 1, axis=0)
        first = (stage_ids == 0).reshape(stages, *[1] * (x.ndim))
        state = _constrain(jnp.where(first, fresh[None], rolled), ("stage", "batch"))
        index = jnp.clip(t - stage_ids, 0, microbatches - 1)  # stage s: microbatch t - s
        stage_extras = jax.tree.map(lambda e: _constrain(e[index], ("stage", "batch")), extras_mb)
        out = _constrain(run_stages(weights, state, stage_extras), ("stage", "batch"))
        return out, out[stages - 1]

    start = jnp.zeros((stages, *xs.shape[1:]), x.dtype)
    _, finished = jax.lax.scan(iteration, start, jnp.arange(schedule.iterations))
    return from_microbatches(finished[stages - 1 :])
