"""The one table: logical axis names -> mesh axes.

Modules name the axes of their activations logically (``("batch", "seq", "embed")``);
this table decides which mesh axes shard them. Mesh axes of size 1, or missing from the
current mesh, drop out, so the same annotations run on one device and on a pod.
"""

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": ("sequence",),
    "embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
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
        axes = tuple(
            a for a in LOGICAL_AXIS_RULES.get(name, ()) if mesh_axis_sizes.get(a, 1) > 1
        )
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding by logical axis names; a no-op outside a mesh.

    A dimension whose mesh axes do not divide it is left unconstrained (XLA decides),
    so odd activation shapes (a decode step of one token) never fail here.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {x.shape}")
    sizes = dict(mesh.shape)
    spec = logical_to_spec(logical_axes, sizes)
    parts = []
    for dim, part in zip(x.shape, spec, strict=True):
        names = (part,) if isinstance(part, str) else (part or ())
        total = 1
        for name in names:
            total *= sizes[name]
        parts.append(part if dim % total == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*parts))
