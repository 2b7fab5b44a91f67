"""Tensor parallelism with sequence-parallel activations, optionally by collective matmuls.

``LlamaConfig.tensor_parallel`` picks how a block's activations live on the ``tensor`` axis
between its tensor-parallel regions (attention's q/k/v ... o, the MLP's gate/up ... down):

* ``"plain"``: the residual stream, norms included, is whole on every ``tensor`` device;
  a row-parallel projection (o, down) ends in an all-reduce.
* ``"sequence_parallel"`` (Megatron-SP, Korthikanti et al. 2022): the residual stream and
  the norms are split over the sequence on ``tensor`` as well (``[b, s / (sequence x
  tensor), d]`` per device), so their activation memory falls with ``tensor``. Each
  column-parallel projection (q/k/v, gate/up) all-gathers the tokens over ``tensor`` and
  then multiplies; each row-parallel one (o, down) multiplies and then reduce-scatters
  (explicitly, in ``shard_map``: XLA:CPU would write an all-reduce and a slice).
* ``"collective_matmul"``: the same layout, with that all-gather and reduce-scatter
  decomposed into ring steps that overlap the projection's matmul
  (:mod:`pallas_kernels.collectives`): the Pallas TPU kernels on TPU when their buffers fit
  VMEM, else the ``shard_map`` + ``ppermute`` ring, both ways on TPU and one way elsewhere
  (:func:`choose_ops`).
* ``"collective_matmul_bidirectional"``: as ``collective_matmul``, always by the
  bidirectional ``shard_map`` ring (half of each ring both ways, about half the steps).

The column-parallel projections of one input (q/k/v; gate/up) gather it once for all of
them (:func:`project`): one ring whose every step multiplies the block at hand by each
kernel, or one all-gather in ``sequence_parallel``.

The split modes act only under a mesh with ``tensor`` > 1 and without a KV cache
(training, scoring): a decode step has one token and stays ``plain``. Every tensor-parallel
width (query heads, key/value heads, MLP width) must then be a multiple of ``tensor``, and
the sequence a multiple of ``sequence x tensor`` (:func:`check`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from jaxstack.layers.dense import dense_dot_general
from pallas_kernels.collectives import matmul as ring
from pallas_kernels.collectives import reference
from pallas_kernels.collectives import tpu as pallas_tpu
from sharding_rules import constrain, fitting_spec, uses_our_axes

TENSOR_PARALLEL = (
    "plain", "sequence_parallel", "collective_matmul", "collective_matmul_bidirectional"
)  # fmt: skip

IMPLEMENTATION: dict[str, str | None] = {
    "sequence_parallel": "collective",
    "collective_matmul": None,
    "collective_matmul_bidirectional": "ring_bidirectional",
}
"""The ``OPS`` key of each split mode; None: :func:`choose_ops` by platform and size."""

TPU_VMEM_BUDGET = 16 * 2**20
"""Bytes of per-device operands up to which ``collective_matmul`` uses the Pallas TPU
kernels, which hold every operand and step buffer in VMEM at once (16 MiB: TPU's default
scoped VMEM limit); larger projections take the ``shard_map`` ring."""


def _sizes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    return dict(mesh.shape) if uses_our_axes(mesh) else {}


def mode(option: str, plain: bool) -> str:
    """The mode that applies: ``option`` under a mesh with ``tensor`` > 1 unless ``plain``
    (a KV cache, or initialisation), else ``"plain"``."""
    if option == "plain" or plain or _sizes().get("tensor", 1) == 1:
        return "plain"
    return option


def check(widths: dict[str, int], seq_len: int, multiple: int = 1) -> None:
    """Raise a ``ValueError`` naming a working choice when the split modes cannot run.

    Args:
      widths: the tensor-parallel widths by name (``{"num_heads": 32, ...}``); each must be a
        multiple of ``tensor``.
      seq_len: the sequence length; it must be a multiple of ``sequence x tensor`` and of
        ``multiple`` (e.g. 2 x ``sequence`` for context parallelism's zig-zag layout).
    """
    sizes = _sizes()
    tensor, sequence = sizes.get("tensor", 1), sizes.get("sequence", 1)
    bad = {name: width for name, width in widths.items() if width % tensor}
    if bad:
        common = math.gcd(*widths.values())
        fits = max(t for t in range(1, tensor + 1) if common % t == 0 and tensor % t == 0)
        listed = ", ".join(f"{name}={width}" for name, width in widths.items())
        raise ValueError(
            f"sequence-parallel tensor parallelism splits every tensor-parallel width over "
            f"tensor={tensor}, but {', '.join(f'{k}={v}' for k, v in bad.items())} is not a "
            f"multiple of {tensor}; use tensor={fits} (it divides {listed}), widths that are "
            "multiples of the tensor axis, or tensor_parallel='plain'."
        )
    step = math.lcm(sequence * tensor, multiple)
    if seq_len % step:
        below, above = seq_len // step * step, (seq_len // step + 1) * step
        choices = f"{above} or {below}" if below else str(above)
        zigzag = f", and of {multiple} for context parallelism's zig-zag" if multiple > 1 else ""
        raise ValueError(
            f"sequence-parallel tensor parallelism splits the sequence length {seq_len} over "
            f"sequence={sequence} x tensor={tensor}{zigzag}: use a multiple of {step}, e.g. "
            f"{choices}."
        )


def _seq_axes(sizes: dict[str, int], split: bool) -> str | tuple[str, ...] | None:
    """The mesh axes of the sequence dim: ``sequence`` (inside a region), and ``tensor`` too
    (``split``: the residual stream between regions), sequence-major."""
    axes = tuple(a for a in ("sequence",) if sizes.get(a, 1) > 1) + (("tensor",) if split else ())
    return axes[0] if len(axes) == 1 else (axes or None)


def _batch_axes(shape: tuple[int, ...], sizes: dict[str, int]):
    return fitting_spec(shape[:1], ("batch",), sizes)[0]


def constrain_residual(x: jax.Array, mode_: str) -> jax.Array:
    """Constrain the residual stream ``[b, s, embed]``: split over the sequence on
    ``tensor`` too in the split modes, as ``constrain(x, ("batch", "seq", "embed"))`` in
    ``plain``."""
    if mode_ == "plain":
        return constrain(x, ("batch", "seq", "embed"))
    sizes = _sizes()
    spec = PartitionSpec(_batch_axes(x.shape, sizes), _seq_axes(sizes, split=True), None)
    return lax.with_sharding_constraint(x, spec)


def choose_ops(buffer_bytes: int, platform: str | None = None) -> str:
    """``"pallas_tpu"`` on TPU (``platform``, default the default backend's) when the
    kernel's per-device buffers, ``buffer_bytes``, fit ``TPU_VMEM_BUDGET``; else the ring,
    ``"ring_bidirectional"`` where ``ring.default_bidirectional`` says so (TPU), else
    ``"ring"``."""
    platform = platform or jax.default_backend()
    if platform == "tpu" and buffer_bytes <= TPU_VMEM_BUDGET:
        return "pallas_tpu"
    return "ring_bidirectional" if ring.default_bidirectional(platform) else "ring"


def tpu_all_gather_matmul(x, ws, *, axis_name, interpret=False):
    """The TPU kernel (2-D rows) on ``x [b, m, k]`` and weights ``ws`` (``[k, f_i]``): they
    are concatenated into one (one kernel call, the tokens travel once) and the product is
    split back; the gathered rows come device-major, ``[n, b, m]``, and are reordered to
    ``[b, n m]``."""
    b, m, _ = x.shape
    y = pallas_tpu.all_gather_matmul(x.reshape(b * m, -1), jnp.concatenate(ws, axis=1),
                                     axis_name=axis_name, interpret=interpret)  # fmt: skip
    n = y.shape[0] // (b * m)
    y = y.reshape(n, b, m, -1).transpose(1, 0, 2, 3).reshape(b, n * m, -1)
    return tuple(jnp.split(y, np.cumsum([w.shape[1] for w in ws])[:-1], axis=-1))


def tpu_matmul_reduce_scatter(x, w, *, axis_name, interpret=False):
    """The TPU kernel on ``x [b, n m, k]``: rows reordered device-major so that device r's
    block of the result is its ``[b, m]`` tokens."""
    n = lax.axis_size(axis_name)
    b, rows, k = x.shape
    blocks = x.reshape(b, n, rows // n, k).transpose(1, 0, 2, 3).reshape(rows * b, k)
    y = pallas_tpu.matmul_reduce_scatter(blocks, w, axis_name=axis_name, interpret=interpret)
    return y.reshape(b, rows // n, -1)


def _ring(bidirectional: bool) -> tuple[Callable, Callable]:
    return tuple(functools.partial(op, bidirectional=bidirectional)
                 for op in (ring.all_gather_matmul, ring.matmul_reduce_scatter))  # fmt: skip


OPS: dict[str, tuple[Callable, Callable]] = {
    "collective": (
        reference.all_gather_matmul_reference,
        reference.matmul_reduce_scatter_reference,
    ),
    "ring": _ring(bidirectional=False),
    "ring_bidirectional": _ring(bidirectional=True),
    "pallas_tpu": (tpu_all_gather_matmul, tpu_matmul_reduce_scatter),
}
"""``(all_gather_matmul, matmul_reduce_scatter)`` on ``[b, rows, k]`` per implementation
(the first takes a tuple of weights and returns a tuple of products): the whole collective
then the matmul (``collective``), the ``shard_map`` ring one way or both ways, the Pallas
TPU kernels."""


def _trailing_contraction(lhs, rhs, dimension_numbers, precision, preferred_element_type):
    """The number of contracted dims, checking the form flax's Dense layers pass."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    n = len(lhs_contract)
    if (
        any(batch)
        or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
        or tuple(rhs_contract) != tuple(range(n))
        or lhs.ndim - n != 2
        or precision is not None
        or preferred_element_type is not None
    ):
        raise ValueError(
            "collective matmul takes activations [batch, seq, *in] against a kernel [*in, "
            f"*out] at default precision; got {lhs.shape} . {rhs.shape} with "
            f"{dimension_numbers}, precision={precision}, "
            f"preferred_element_type={preferred_element_type}"
        )
    return n


def column_matmuls(
    x: jax.Array, kernels: Sequence[jax.Array], implementation: str | None = None
) -> tuple[jax.Array, ...]:
    """Column-parallel projections of one input, ``x [b, s, k] @ kernel [k, out, ...]`` for
    each kernel (``out`` split over ``tensor``): ``x`` arrives split over the sequence on
    ``tensor``, is all-gathered once, ring step by ring step while each step's block is
    multiplied by every kernel, and the products leave whole along the sequence (within its
    ``sequence`` shard) with ``out`` split over ``tensor``. ``implementation``: a key of
    ``OPS``, or None to :func:`choose_ops` by platform and size."""
    sizes = _sizes()
    batch = _batch_axes(x.shape, sizes)
    tails = [(None,) * (kernel.ndim - 2) for kernel in kernels]

    def local(x, *kernels):
        ws = tuple(kernel.reshape(kernel.shape[0], -1) for kernel in kernels)
        n, f = lax.axis_size("tensor"), sum(w.shape[1] for w in ws)
        # the TPU kernel's buffers: x, the weights, the outputs and the gathered x
        size = x.size * (1 + n) + sum(w.size for w in ws) + n * x.shape[0] * x.shape[1] * f
        gather = OPS[implementation or choose_ops(size * x.dtype.itemsize)][0]
        ys = gather(x, ws, axis_name="tensor")
        return tuple(y.reshape(*y.shape[:2], *kernel.shape[1:])
                     for y, kernel in zip(ys, kernels, strict=True))  # fmt: skip

    return jax.shard_map(
        local,
        in_specs=(PartitionSpec(batch, _seq_axes(sizes, True), None),
                  *(PartitionSpec(None, "tensor", *tail) for tail in tails)),
        out_specs=tuple(PartitionSpec(batch, _seq_axes(sizes, False), "tensor", *tail)
                        for tail in tails),
        check_vma=False,
    )(x, *kernels)  # fmt: skip


def column_dot_general(implementation: str | None = None) -> Callable:
    """A flax ``dot_general`` for one column-parallel projection ``x [b, s, k] @ w [k, out,
    ...]``: :func:`column_matmuls` with that one kernel."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        _trailing_contraction(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        return column_matmuls(lhs, (rhs,), implementation)[0]

    return dot_general


def _check_projections(layers: Sequence[nn.Module]) -> None:
    first = layers[0]
    for layer in layers:
        if (
            not isinstance(layer, nn.Dense | nn.DenseGeneral)
            or getattr(layer, "axis", -1) not in (-1, (-1,))
            or getattr(layer, "batch_dims", ())
            or layer.precision is not None
            or (layer.dtype, layer.param_dtype) != (first.dtype, first.param_dtype)
        ):
            raise ValueError(
                "project takes nn.Dense / nn.DenseGeneral layers over the input's last axis, "
                "without batch dims, at default precision and with one dtype and param_dtype; "
                f"got {type(layer).__name__} {layer.name!r}"
            )


def project(x: jax.Array, layers: Sequence[nn.Module], mode_: str) -> list[jax.Array]:
    """``[layer(x) for layer in layers]`` for column-parallel ``nn.Dense`` /
    ``nn.DenseGeneral`` layers of one input ``x [b, s, k]`` (q/k/v; gate/up).

    In the split modes the tokens are gathered once for all of them: the layers' kernels are
    read from their parameters and multiplied in one :func:`column_matmuls` (one ring whose
    every step multiplies the block at hand by each kernel, or one all-gather in
    ``sequence_parallel``), then each layer's bias is added as its ``__call__`` would, after
    the same dtype promotion. Parameters and checkpoints are those of the layers. In
    ``plain``, and while initialising (the parameters do not exist yet), each layer is
    called.
    """
    if mode_ == "plain" or layers[0].is_initializing():
        return [layer(x) for layer in layers]
    _check_projections(layers)
    promoted = []
    for layer in layers:
        params = layer.variables["params"]
        promoted.append(
            layer.promote_dtype(x, params["kernel"], params.get("bias"), dtype=layer.dtype)
        )
    xs, kernels, biases = zip(*promoted, strict=True)  # xs: x in the layers' one dtype
    ys = column_matmuls(xs[0], kernels, IMPLEMENTATION[mode_])
    return [y if bias is None else y + bias for y, bias in zip(ys, biases, strict=True)]


def row_dot_general(implementation: str | None = None) -> Callable:
    """A flax ``dot_general`` for a row-parallel projection ``h [b, s, in, ...] @ w [in,
    ..., k]`` (``in`` split over ``tensor``): each device's partial product is
    reduce-scattered over the sequence by ring steps overlapping its matmul chunks, leaving
    ``[b, s, k]`` split over the sequence on ``tensor`` (the residual-stream layout)."""

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        n = _trailing_contraction(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        sizes = _sizes()
        batch, tail, out_dims = _batch_axes(lhs.shape, sizes), (None,) * (n - 1), rhs.shape[n:]

        def local(h, w):
            k = math.prod(w.shape[:n])
            h, w = h.reshape(*h.shape[:2], k), w.reshape(k, -1)
            # the TPU kernel's buffers: h, w, the output and two float32 slots per step
            size = (h.size + w.size) * h.dtype.itemsize + 9 * h.shape[0] * h.shape[1] * w.shape[1]
            scatter = OPS[implementation or choose_ops(size)][1]
            y = scatter(h, w, axis_name="tensor")
            return y.reshape(*y.shape[:2], *out_dims)

        return jax.shard_map(
            local,
            in_specs=(PartitionSpec(batch, _seq_axes(sizes, False), "tensor", *tail),
                      PartitionSpec("tensor", *tail, *(None,) * len(out_dims))),
            out_specs=PartitionSpec(batch, _seq_axes(sizes, True), *(None,) * len(out_dims)),
            check_vma=False,
        )(lhs, rhs)  # fmt: skip

    return dot_general


def dot_generals(mode_: str) -> tuple[Callable, Callable]:
    """``(column, row)`` ``dot_general`` s for the Dense layers of a block in ``mode_``: the
    plain collective then the matmul in ``sequence_parallel``, the overlapped collective
    matmuls in the ``collective_matmul`` modes (``IMPLEMENTATION``), ``dense_dot_general``
    in ``plain`` (XLA places the all-reduces the sharding implies)."""
    if mode_ == "plain":
        return dense_dot_general, dense_dot_general
    implementation = IMPLEMENTATION[mode_]
    return column_dot_general(implementation), row_dot_general(implementation)
