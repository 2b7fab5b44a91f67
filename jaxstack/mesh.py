"""The one place jaxstack creates device meshes."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding_rules import MESH_AXES

BATCH_AXES = ("data", "fsdp", "expert")
"""Mesh axes the global batch is split over (``expert`` too: outside the mixture-of-experts
layers it is one more data-parallel axis; inside them tokens travel to their experts)."""


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    expert: int = 1,
    sequence: int = 1,
    stage: int = 1,
    devices: list | None = None,
) -> Mesh:
    """A mesh with axes ``(stage, data, fsdp, tensor, expert, sequence)`` over ``devices``
    (default all); ``stage`` (pipeline stages, ``jaxstack.layers.pipeline``) is outermost, so
    its neighbours are the farthest apart (across slices or nodes).

    One axis may be ``-1``: it takes whatever the others leave. Axes are ``Auto``, so XLA
    propagates shardings from parameters, inputs and ``sharding_rules.constrain`` hints.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"stage": stage, "data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert,
             "sequence": sequence}  # fmt: skip
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh axes {sizes}: sizes must be positive, at most one may be -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"{len(devices)} devices cannot be split into mesh axes {sizes}: the fixed axes "
                f"multiply to {fixed}, which does not divide {len(devices)}"
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh axes {sizes} multiply to {math.prod(sizes.values())} but there are "
            f"{len(devices)} devices; make the product equal the device count "
            "(or set one axis to -1)"
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding for a batch array: leading dim over ``BATCH_AXES``; the second (the sequence
    of ``[batch, seq, ...]`` arrays) over ``sequence`` when that axis is larger than 1 (context
    parallelism); the rest replicated."""
    seq = ["sequence"] if ndim > 1 and mesh.shape.get("sequence", 1) > 1 else []
    rest = [None] * (ndim - 1 - len(seq))
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *seq, *rest))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split (product of the batch axes)."""
    return math.prod(mesh.shape[name] for name in BATCH_AXES)


MeshSpec = Mesh | str | dict[str, int] | None
"""What a user may pass as a mesh: a ``Mesh``, ``"data=4,tensor=2"``, ``{"data": 4, ...}``,
``"auto"`` (chosen from the model by the caller) or None (all devices data-parallel)."""


def resolve_mesh(mesh: MeshSpec, devices: list | None = None) -> Mesh:
    """A ``Mesh`` from any ``MeshSpec`` but ``"auto"``, whose caller decides it.

    Raises:
        ValueError: an unknown axis, a malformed string, sizes that do not multiply to the
            device count, or ``"auto"``.
        TypeError: anything else.
    """
    if isinstance(mesh, Mesh):
        return mesh
    if mesh is None:
        return make_mesh(devices=devices)
    if isinstance(mesh, str):
        if mesh.strip() == "auto":
            raise ValueError("mesh='auto' is chosen from the model: pass it to the Trainer")
        return make_mesh(**parse_mesh(mesh), devices=devices)
    if isinstance(mesh, dict):
        unknown = sorted(set(mesh) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh {mesh}: unknown axes {unknown}; axes are {MESH_AXES}")
        return make_mesh(**mesh, devices=devices)
    raise TypeError(
        f"mesh must be a jax.sharding.Mesh, 'auto', a string like 'data=4,tensor=2' or a dict "
        f"like {{'data': 4, 'tensor': 2}}; got {type(mesh).__name__}"
    )


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,tensor=4"`` -> ``{"data": 2, "tensor": 4}`` (keywords of ``make_mesh``)."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(
                f"mesh {text!r}: write axes as name=size, e.g. data=2,tensor=4"
            ) from None
    return sizes
