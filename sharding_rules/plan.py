"""Memory plan: every parameter's spec and bytes per device, and per-device totals.

Computed from shapes only, before anything is allocated. A dimension of size ``n`` sharded
over axes of total size ``k`` holds ``ceil(n / k)`` per device (what
``addressable_shards[0]`` of the placed array holds).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from sharding_rules.optimizer import optimizer_state_specs
from sharding_rules.paths import leaves_with_paths
from sharding_rules.rules import MeshSizes, axis_sizes


@dataclass(frozen=True)
class ParamEntry:
    """One parameter in a plan."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    spec: PartitionSpec
    bytes_per_device: int
    reason: str


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory, in bytes, for one mesh."""

    mesh_axis_sizes: dict[str, int]
    entries: tuple[ParamEntry, ...]
    param_bytes: int
    grad_bytes: int
    opt_state_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        """Params + grads + optimizer state + activations, per device."""
        return self.param_bytes + self.grad_bytes + self.opt_state_bytes + self.activation_bytes


def shard_shape(
    shape: tuple[int, ...], spec: PartitionSpec, sizes: Mapping[str, int]
) -> tuple[int, ...]:
    """The per-device block shape of an array of ``shape`` sharded by ``spec``."""
    entries = (*spec, *([None] * (len(shape) - len(spec))))
    out = []
    for n, entry in zip(shape, entries, strict=True):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        out.append(-(-n // math.prod(sizes.get(a, 1) for a in axes)))
    return tuple(out)


def bytes_per_device(
    shape: tuple[int, ...], dtype: Any, spec: PartitionSpec, sizes: Mapping[str, int]
) -> int:
    """Bytes one device holds of an array of ``shape``/``dtype`` sharded by ``spec``."""
    return math.prod(shard_shape(shape, spec, sizes)) * np.dtype(dtype).itemsize


def _specs(tree: Any, specs: Any, what: str) -> list[PartitionSpec]:
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    n = len(jax.tree.leaves(tree))
    if len(flat) != n or not all(isinstance(s, PartitionSpec) for s in flat):
        raise ValueError(f"{what} must hold one PartitionSpec per leaf ({n} leaves)")
    return flat


def make_plan(
    params: Any,
    param_specs: Any,
    mesh_axis_sizes: MeshSizes,
    *,
    opt_state: Any = None,
    opt_state_specs: Any = None,
    grad_dtype: Any = None,
    activation_bytes: int = 0,
    reasons: Mapping[str, str] | None = None,
    gradients: bool = True,
) -> MemoryPlan:
    """Predict per-device memory for ``params`` placed with ``param_specs`` on a mesh.

    Args:
      params: parameters or their ``ShapeDtypeStruct``s.
      param_specs: a PartitionSpec per parameter, shaped like ``params``.
      mesh_axis_sizes: axis sizes (absent axes are 1) or a Mesh.
      opt_state: the optimizer state's shapes, ``jax.eval_shape(tx.init, params)``.
      opt_state_specs: its specs; default ``optimizer_state_specs(opt_state, params, ...)``.
      grad_dtype: gradient dtype; default each parameter's dtype.
      activation_bytes: the caller's per-device activation estimate (the model knows its
        batch, sequence length and remat policy).
      reasons: ``{path: why}`` shown in the table, e.g. from ``param_rules``.
      gradients: count a gradient per parameter (False: inference).

    Raises:
      ValueError: if a spec tree does not match its pytree, or activation_bytes < 0.
    """
    if activation_bytes < 0:
        raise ValueError(f"activation_bytes must be >= 0, got {activation_bytes}")
    sizes = axis_sizes(mesh_axis_sizes)
    paths, leaves, _ = leaves_with_paths(params)
    specs = _specs(params, param_specs, "param_specs")
    entries, grad_bytes = [], 0
    for path, leaf, spec in zip(paths, leaves, specs, strict=True):
        shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
        nbytes = bytes_per_device(shape, dtype, spec, sizes)
        if gradients:
            grad_bytes += bytes_per_device(shape, grad_dtype or dtype, spec, sizes)
        reason = (reasons or {}).get(path, "")
        entries.append(ParamEntry(path, shape, dtype, spec, nbytes, reason))
    opt_bytes = 0
    if opt_state is not None:
        if opt_state_specs is None:
            opt_state_specs = optimizer_state_specs(opt_state, params, param_specs)
        o_specs = _specs(opt_state, opt_state_specs, "opt_state_specs")
        for leaf, spec in zip(jax.tree.leaves(opt_state), o_specs, strict=True):
            opt_bytes += bytes_per_device(tuple(np.shape(leaf)), leaf.dtype, spec, sizes)
    return MemoryPlan(
        mesh_axis_sizes=sizes,
        entries=tuple(entries),
        param_bytes=sum(e.bytes_per_device for e in entries),
        grad_bytes=grad_bytes,
        opt_state_bytes=opt_bytes,
        activation_bytes=int(activation_bytes),
    )


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.2f} {units[i]}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table: one row per parameter, then per-device totals."""
    mesh = ", ".join(f"{a}={n}" for a, n in plan.mesh_axis_sizes.items())
    rows = [("parameter", "shape", "dtype", "spec", "per device", "why")]
    for e in plan.entries:
        spec = ", ".join(str(s) for s in e.spec)
        shape = "x".join(str(n) for n in e.shape) or "scalar"
        per_device = format_bytes(e.bytes_per_device)
        rows.append((e.path, shape, str(e.dtype), f"({spec})", per_device, e.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"sharding plan for mesh ({mesh})"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[5])
    lines.append("per device:")
    for label, n in (
        ("params", plan.param_bytes),
        ("gradients", plan.grad_bytes),
        ("optimizer state", plan.opt_state_bytes),
        ("activations (est.)", plan.activation_bytes),
        ("total", plan.total_bytes),
    ):
        lines.append(f"  {label:<20}{format_bytes(n):>12}")
    return "\n".join(lines)
