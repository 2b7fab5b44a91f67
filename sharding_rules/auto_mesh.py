"""``mesh="auto"``: the (data, fsdp, tensor) shape that fits and communicates least.

Every factorisation ``data * fsdp * tensor == num_devices`` is a candidate (``expert``
stays 1; ``sequence`` too unless ``split_sequence``, see below). A candidate is rejected
when the rules cannot shard the model over it (``ShardingRuleError``: e.g. tensor does not
divide the heads) or when its memory plan
(params + grads + optimizer state + activations per device) exceeds the device memory.
Among the rest the least communication per step wins, ties going to more data parallelism.

With ``split_sequence`` (a model with context parallelism) the factorisations with
``sequence`` > 1 are candidates too, but the smallest ``sequence`` that fits wins before
any cost is compared: the sequence is split only when a long one does not fit otherwise
(its ring traffic, K/V blocks per layer, is not in the cost model below).

Cost model: bytes each device sends per training step, ring collectives (a collective over
``n`` devices moves ``(n - 1) / n`` of its buffer per pass; an all-reduce is two passes):

- data: all-reduce of the gradients each device holds: ``2 (d-1)/d * grad_bytes``.
- fsdp: all-gather of the FSDP-sharded parameters in the forward pass and again in the
  backward pass, and a reduce-scatter of their gradients: ``(f-1)/f * (2 P_f + G_f)`` with
  ``P_f``/``G_f`` the gathered (unsharded over fsdp) bytes of those parameters / gradients.
- tensor: all-reduce of activations: ``2 (t-1)/t * A / (d * f)`` where ``A`` is the
  activation bytes all-reduced over ``tensor`` per step for the whole global batch, split
  over the ``d * f`` batch shards. ``tensor_allreduce_bytes`` derives ``A`` from a traced
  ``ModelAnalysis`` and the candidate's specs, for any model (Megatron: 4 x tokens x d_model
  x dtype bytes per layer: two all-reduces forward and two backward).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from sharding_rules.logical import MESH_AXES
from sharding_rules.plan import MemoryPlan, format_bytes, make_plan
from sharding_rules.rules import ShardingRuleError, divisors
from sharding_rules.trace import CONTRACT, FREE, LAYER, VOCAB, WIDTH, ModelAnalysis, ParamLabel


@dataclass(frozen=True)
class MeshCandidate:
    """One factorisation and its verdict (``plan`` is None when the rules rejected it)."""

    axis_sizes: dict[str, int]
    plan: MemoryPlan | None
    comm_bytes: float
    rejected: str | None


@dataclass(frozen=True)
class AutoMeshResult:
    """The chosen mesh axis sizes, its plan and cost, and every candidate considered."""

    axis_sizes: dict[str, int]
    plan: MemoryPlan
    comm_bytes: float
    candidates: tuple[MeshCandidate, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Axis sizes in ``MESH_AXES`` order, for ``jax.make_mesh(shape, MESH_AXES)``."""
        return tuple(self.axis_sizes[a] for a in MESH_AXES)


def _mentions(part: Any, axis: str) -> bool:
    return part == axis or (isinstance(part, tuple) and axis in part)


def tensor_allreduce_bytes(
    analysis: ModelAnalysis, specs: Any, itemsize: int, *, training: bool = True
) -> float:
    """Activation bytes all-reduced over ``tensor`` by one run of the traced computation
    (one micro-batch of the traced shapes) under the layout ``specs``.

    Read from the dataflow, for any model: a weight sharded over ``tensor`` on a contracted
    dimension (row-parallel) all-reduces its output, ``rows x output features``, in the
    forward pass and the same amount for the input gradient of its column-parallel partner in
    the backward pass; an output head sharded on its output (vocab-parallel, not feeding a
    row-parallel weight) all-reduces its input gradient; an embedding sharded over vocab or
    width all-reduces (gathers) its looked-up rows. A scanned stack counts every layer.
    ``rows`` are ``analysis.rows``; ``itemsize`` is the activation dtype's.
    ``training=False`` counts the forward pass alone.
    """
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    passes = 2 if training else 1
    total = 0.0
    for leaf, (spec, shape) in enumerate(zip(flat, analysis.shapes, strict=True)):
        sharded = [d for d, part in enumerate(spec) if _mentions(part, "tensor")]
        if not sharded or leaf not in analysis.rows:
            continue
        roles = [analysis.roles.get((leaf, d), frozenset()) for d in range(len(shape))]
        rows = analysis.rows[leaf] * _size_with(LAYER, shape, roles)
        if any(CONTRACT in roles[d] for d in sharded):
            total += passes * rows * _size_with(FREE, shape, roles)
        elif any(roles[d] & {VOCAB, WIDTH} for d in sharded):
            total += rows * _size_with(WIDTH, shape, roles)
        elif training and any(
            FREE in roles[d] and not _feeds_row_parallel(analysis, flat, leaf, d) for d in sharded
        ):
            total += rows * _size_with(CONTRACT, shape, roles)
    return total * itemsize


def _size_with(role: str, shape: tuple[int, ...], roles: list[frozenset[str]]) -> int:
    """Product of the dims of ``shape`` that have ``role``."""
    return math.prod(n for n, dim_roles in zip(shape, roles, strict=True) if role in dim_roles)


def _feeds_row_parallel(analysis: ModelAnalysis, flat: list, leaf: int, dim: int) -> bool:
    """Whether output ``dim`` of ``leaf`` is contracted by a weight sharded there over tensor."""
    for kind, consumer in analysis.sinks.get(ParamLabel(leaf, dim), ()):
        if kind == "row" and consumer is not None:
            spec = flat[consumer.leaf]
            if consumer.dim < len(spec) and _mentions(spec[consumer.dim], "tensor"):
                return True
    return False


def communication_bytes(
    plan: MemoryPlan,
    *,
    tensor_allreduce_bytes: float,
    grad_dtype: Any = None,
    training: bool = True,
) -> float:
    """Bytes each device sends per step under the module's cost model (``training=False``:
    a forward pass, with no gradients to all-reduce and one all-gather of fsdp params)."""
    sizes = plan.mesh_axis_sizes
    d, f, t = sizes["data"], sizes["fsdp"], sizes["tensor"]
    cost = 2 * (d - 1) / d * plan.grad_bytes if training else 0.0
    for e in plan.entries:
        if any(_mentions(s, "fsdp") for s in e.spec):
            gathered = e.bytes_per_device * f
            grads = gathered // e.dtype.itemsize * np.dtype(grad_dtype or e.dtype).itemsize
            cost += (f - 1) / f * ((2 * gathered + grads) if training else gathered)
    cost += 2 * (t - 1) / t * tensor_allreduce_bytes / (d * f)
    return cost


def auto_mesh(
    num_devices: int,
    device_memory_bytes: int,
    spec_fn: Callable[[dict[str, int]], Any],
    params: Any,
    *,
    tensor_allreduce_bytes: float | Callable[[Any], float],
    opt_state: Any = None,
    grad_dtype: Any = None,
    activation_bytes_fn: Callable[[dict[str, int]], int] | None = None,
    training: bool = True,
    split_sequence: bool = False,
) -> AutoMeshResult:
    """Pick the mesh axis sizes for ``num_devices`` devices of ``device_memory_bytes`` each.

    Args:
      num_devices: devices in the mesh.
      device_memory_bytes: usable memory per device.
      spec_fn: axis sizes -> param specs pytree, e.g.
        ``lambda s: infer_param_specs(model.apply, params, x, mesh_axis_sizes=s)`` (or
        ``param_rules`` on one ``analyze_model`` result, to trace once).
      params: parameter shapes.
      tensor_allreduce_bytes: activation bytes all-reduced over ``tensor`` per step for the
        global batch (module doc), or ``specs -> bytes`` (e.g. from
        ``tensor_allreduce_bytes(analysis, specs, itemsize)``) when it depends on the layout;
        required because with zero traffic tensor parallelism would look free.
      opt_state: optimizer state shapes (``jax.eval_shape(tx.init, params)``).
      grad_dtype: gradient dtype (default: each parameter's).
      activation_bytes_fn: axis sizes -> per-device activation bytes (default 0).
      training: plan gradients and count training traffic (False: inference).
      split_sequence: also consider ``sequence`` > 1, taking the smallest that fits (module
        doc); ``activation_bytes_fn`` should then divide the activations by it.

    Returns:
      The cheapest fitting candidate.

    Raises:
      ValueError: num_devices or device_memory_bytes is not positive.
      ShardingRuleError: no candidate fits; the message says what the smallest plan needs.
    """
    if num_devices < 1 or device_memory_bytes <= 0:
        raise ValueError(
            f"num_devices ({num_devices}) and device_memory_bytes ({device_memory_bytes}) "
            "must be positive"
        )
    candidates = []
    shapes = [
        (s, t, f)
        for s in (divisors(num_devices) if split_sequence else (1,))
        for t in divisors(num_devices // s)
        for f in divisors(num_devices // (s * t))
    ]
    for s, t, f in shapes:
        sizes = {a: 1 for a in MESH_AXES}
        sizes.update(data=num_devices // (s * t * f), fsdp=f, tensor=t, sequence=s)
        try:
            specs = spec_fn(dict(sizes))
        except ShardingRuleError as err:
            candidates.append(MeshCandidate(sizes, None, float("inf"), str(err)))
            continue
        act = activation_bytes_fn(dict(sizes)) if activation_bytes_fn else 0
        plan = make_plan(
            params,
            specs,
            sizes,
            opt_state=opt_state,
            grad_dtype=grad_dtype,
            activation_bytes=act,
            gradients=training,
        )
        traffic = tensor_allreduce_bytes
        if callable(traffic):
            traffic = traffic(specs) if sizes["tensor"] > 1 else 0.0
        cost = communication_bytes(
            plan, grad_dtype=grad_dtype, tensor_allreduce_bytes=traffic, training=training
        )
        over = plan.total_bytes > device_memory_bytes
        why = f"needs {format_bytes(plan.total_bytes)} per device" if over else None
        candidates.append(MeshCandidate(sizes, plan, cost, why))
    fitting = [c for c in candidates if c.rejected is None]
    if not fitting:
        planned = [c for c in candidates if c.plan is not None]
        if not planned:
            reasons = "; ".join(f"{c.axis_sizes}: {c.rejected}" for c in candidates)
            raise ShardingRuleError(f"the rules reject every mesh of {num_devices}: {reasons}")
        best = min(planned, key=lambda c: c.plan.total_bytes)
        raise ShardingRuleError(
            f"no mesh of {num_devices} devices fits {format_bytes(device_memory_bytes)} per "
            f"device: the smallest plan (data={best.axis_sizes['data']}, "
            f"fsdp={best.axis_sizes['fsdp']}, tensor={best.axis_sizes['tensor']}, "
            f"sequence={best.axis_sizes['sequence']}) needs "
            f"{format_bytes(best.plan.total_bytes)} per device. Use more devices, a smaller "
            "batch or more rematerialisation, or a smaller optimizer state."
        )
    best = min(
        fitting,
        key=lambda c: (
            c.axis_sizes["sequence"], c.comm_bytes, -c.axis_sizes["data"], -c.axis_sizes["fsdp"],
        ),
    )  # fmt: skip
    return AutoMeshResult(best.axis_sizes, best.plan, best.comm_bytes, tuple(candidates))
