"""Pipeline parallelism over the ``stage`` mesh axis: one SPMD program (MaxText's design).

A stack of ``L`` identical layers (weights with a leading ``[L]`` axis, sharded over ``stage``
in contiguous blocks by ``sharding_rules``) runs on ``S`` stages in ``R`` repeats: the layers
form ``S x R`` groups of ``K = L / (S R)``, group ``g`` runs on stage ``g mod S`` (``R = 1``:
GPipe, stage ``s`` runs layers ``s*K .. s*K + K - 1``; ``R > 1``: the circular, interleaved
schedule, each stage holding ``R`` non-contiguous groups). The batch ``[B, ...]`` is split
into ``M`` microbatches of ``B / M`` rows (microbatch ``m`` takes rows ``m, m + M, ...``, so
each stays spread over the batch shards). ``R M + S - 1`` iterations of one ``lax.scan``:

    state[s]   input of stage s: what stage s - 1 produced last iteration (``jnp.roll`` over
               the stage-sharded axis, which XLA lowers to a collective permute between
               neighbouring stages); stage 0 reads a fresh microbatch in the first repeat,
               and later what came round from stage S - 1 one repeat earlier (kept on
               stage 0's devices in a buffer of M microbatches until its turn)
    out        = vmap(stage body)(weights [S, R, K, ...], state [S, mb, ...])   (every stage
               at once, each on its own devices: ``spmd_axis_name="stage"``; stage s uses
               its group of the repeat it is in)
    ys[t]      = out[S - 1]: the last M are the finished microbatches

Stage ``s`` works on item ``t - s`` (repeat ``(t - s) // M``, microbatch ``(t - s) mod M``);
iterations where that is outside ``0 .. R M - 1`` are the bubble, ``(S - 1) / (R M + S - 1)``
of the time. The backward pass is the scan's own transpose (the permutes run the other way).
Only activations of ``[mb, ...]`` cross a stage boundary, once per iteration and direction.
Within a stage, FSDP-sharded weights are gathered at each use (once per microbatch) or, with
``fsdp_gather="once"``, once per step before the schedule. The circular schedule regroups the
contiguously stored layers into each stage's groups once per step (``(R - 1) / R`` of a
stage's weights move to other stages, and their gradients back): fewer idle iterations for
that traffic.

Not supported here: a gather per repeat, 1F1B / zero-bubble (they need MPMD), KV caches
(decoding runs the stack without stages).
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
    """How a stack of ``layers`` runs on ``stages`` stages over ``microbatches``, each stage
    visited ``repeats`` times per microbatch (1: GPipe, more: the circular schedule)."""

    stages: int
    layers: int
    microbatches: int
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"pipeline_repeats={self.repeats}; use 1 (GPipe) or more (circular)")
        if self.stages < 1 or self.layers % (self.stages * self.repeats):
            raise ValueError(
                f"{self.layers} layers do not split into stage={self.stages} pipeline stages "
                f"x pipeline_repeats={self.repeats}; use a stage count and repeats whose product "
                "divides the layer count"
            )
        if self.microbatches < self.stages or self.microbatches % self.stages:
            raise ValueError(
                f"pipeline_microbatches={self.microbatches} is not a multiple of "
                f"stage={self.stages}; use {2 * self.stages} (2 x stages) or another multiple"
            )

    @property
    def layers_per_group(self) -> int:
        """Layers a stage runs in one visit: ``layers / (stages x repeats)``."""
        return self.layers // (self.stages * self.repeats)

    @property
    def iterations(self) -> int:
        """Scan iterations of one forward pass: ``repeats x microbatches + stages - 1``."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Fraction of stage-iterations idle: ``(stages - 1) / (repeats x microbatches +
        stages - 1)``."""
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
    repeats: int = 1,
    fsdp_gather: str = "per_microbatch",
) -> jax.Array:
    """Run ``x [B, ...]`` through the stacked layers, pipelined over ``stages``.

    Args:
        layer_fn: one layer, ``(weights, x [mb, ...], extras) -> x`` (remat it yourself).
        layer_weights: pytree of ``[L, ...]`` arrays (``L`` a multiple of ``stages x
            repeats``), the leading axis sharded over ``stage``.
        x: activations ``[B, ...]``, ``B`` a multiple of ``microbatches``.
        extras: pytree of ``[B, ...]`` arrays travelling with each row (positions, segment
            ids), or None.
        stages, microbatches, repeats: the ``PipelineSchedule`` (``repeats=1``: GPipe; more:
            circular, each stage visited ``repeats`` times with a different group of layers).
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
    schedule = PipelineSchedule(stages, num_layers, microbatches, repeats)
    choose_microbatches(x.shape[0], stages, microbatches)
    group = schedule.layers_per_group

    def per_stage(w):  # [L, ...] -> [S, R, K, ...]: layer r*S*K + s*K + k at [s, r, k]
        def placed(part):  # [S, ...] -> on the stage axis
            if fsdp_gather == "once" and uses_our_axes(jax.sharding.get_abstract_mesh()):
                return jax.lax.with_sharding_constraint(part, PartitionSpec("stage"))
            return _constrain(part, ("stage",))

        rows = stages * group  # repeat r: the contiguous layers r*S*K .. (r+1)*S*K - 1
        parts = [w[r * rows : (r + 1) * rows].reshape(stages, group, *w.shape[1:])
                 for r in range(repeats)]  # fmt: skip
        return placed(jnp.stack([placed(part) for part in parts], axis=1))

    weights = jax.tree.map(per_stage, layer_weights)
    xs = _constrain(to_microbatches(x, microbatches), (None, "batch"))
    extras_mb = jax.tree.map(lambda e: to_microbatches(e, microbatches), extras)
    stage_ids = jnp.arange(stages)
    first = (stage_ids == 0).reshape(stages, *[1] * x.ndim)

    def stage_body(stage_weights, repeat, h, stage_extras):
        def one_layer(h, w):
            return layer_fn(w, h, stage_extras), None

        this_repeat = jax.tree.map(lambda w: w[repeat], stage_weights)
        return jax.lax.scan(one_layer, h, this_repeat)[0]

    run_stages = jax.vmap(stage_body, spmd_axis_name="stage")

    def iteration(carry, t):
        previous, waiting = carry
        # stage s > 0 takes what stage s - 1 made last iteration, stage 0 what stage S - 1
        # made (a collective permute); stage 0 parks that in its buffer until the item's
        # next repeat and takes microbatch t mod M from it (at first the fresh microbatches)
        rolled = jnp.roll(previous, 1, axis=0)
        if repeats > 1:
            parked = jax.lax.dynamic_update_index_in_dim(
                waiting, rolled[:, None], (t - stages) % microbatches, 1
            )
            waiting = jnp.where(t >= stages, parked, waiting)
        fresh = jax.lax.dynamic_index_in_dim(waiting, t % microbatches, 1, False)
        state = _constrain(jnp.where(first, fresh, rolled), ("stage", "batch"))
        item = jnp.clip(t - stage_ids, 0, repeats * microbatches - 1)  # stage s: item t - s
        index = item % microbatches
        stage_extras = jax.tree.map(lambda e: _constrain(e[index], ("stage", "batch")), extras_mb)
        out = run_stages(weights, item // microbatches, state, stage_extras)
        out = _constrain(out, ("stage", "batch"))
        return (out, waiting), out[stages - 1]

    start = jnp.zeros((stages, *xs.shape[1:]), x.dtype)
    # the buffer of stage 0's waiting microbatches, [S, M, mb, ...] so it lives by stage
    # (only stage 0's row is read); GPipe reads the fresh microbatches from it and no more
    waiting = _constrain(jnp.broadcast_to(xs, (stages, *xs.shape)), ("stage", None, "batch"))
    _, finished = jax.lax.scan(iteration, (start, waiting), jnp.arange(schedule.iterations))
    return from_microbatches(finished[-microbatches:])
