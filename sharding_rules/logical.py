"""The one table: logical axis names -> mesh axes.

Modules name the axes of their activations logically (``("batch", "seq", "embed")``);
this table decides which mesh axes shard them. Mesh axes of size 1, or missing from the
current mesh, drop out, so the same annotations run on one device and on a pod.
"""

import math
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("stage", "data", "fsdp", "tensor", "expert", "sequence")
"""Mesh axis names, outermost first: ``stage`` (pipeline stages, ``jaxstack.layers.pipeline``)
spans the slowest links."""

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),  # expert: data-parallel outside the MoE layers
    "seq": ("sequence",),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "stage": ("stage",),  # the leading axis of stacked pipeline-stage weights and activations
}


def logical_to_spec(
    logical_axes: Sequence[str | None], mesh_axis_sizes: dict[str, int]
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over the mesh axes that exist (size > 1)."""
    spec = []
    for name in logical_axes:
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(
                f"unknown logical axis {name!r}; known axes: {sorted(LOGICAL_AXIS_RULES)}"
            )
        axes = tuple(a for a in LOGICAL_AXIS_RULES.get(name, ()) if mesh_axis_sizes.get(a, 1) > 1)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def uses_our_axes(mesh: jax.sharding.AbstractMesh) -> bool:
    """True when ``mesh`` is non-empty and names at least one of ``MESH_AXES``."""
    return not mesh.empty and any(name in MESH_AXES for name in mesh.axis_names)


def fitting_spec(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh_axis_sizes: dict[str, int]
) -> PartitionSpec:
    """``logical_to_spec`` with every dimension its mesh axes do not divide left unsharded."""
    parts = []
    for dim, part in zip(shape, logical_to_spec(logical_axes, mesh_axis_sizes), strict=True):
        names = (part,) if isinstance(part, str) else (part or ())
        parts.append(part if dim % math.prod(mesh_axis_sizes[n] for n in names) == 0 else None)
    return PartitionSpec(*parts)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names; a no-op outside a mesh
    (or under a mesh without any of ``MESH_AXES``, such as another framework's).

    A dimension whose mesh axes do not divide it is left unconstrained (XLA decides),
    so odd activation shapes (a decode step of one token) never fail here.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh):
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {x.shape}")
    return jax.lax.with_sharding_constraint(
        x, fitting_spec(x.shape, logical_axes, dict(mesh.shape))
    )
