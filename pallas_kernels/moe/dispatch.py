"""Public grouped matmuls ``gmm`` / ``tgmm``: one API, the kernels picked per backend,
one ``custom_vjp`` for all of them.

``implementation``:

* ``"xla"``: ``jax.lax.ragged_dot`` (:mod:`pallas_kernels.moe.reference`); every backend.
* ``"pallas"``: megablox (Mosaic) on TPU (:mod:`pallas_kernels.moe.tpu`), our Triton
  kernels elsewhere (:mod:`pallas_kernels.moe.gpu`; in Pallas interpret mode on CPU,
  slow, for tests). Raises for a call the kernel cannot run
  (:func:`pallas_unsupported_reason`).
* ``"auto"``: TPU -> megablox, GPU -> Triton, CPU -> xla; and xla wherever
  :func:`pallas_unsupported_reason` names a reason (:func:`auto_route`).

The Mosaic GPU ragged dots jax ships (``ops/gpu/ragged_dot_mgpu.py``,
``transposed_ragged_dot_mgpu.py``) are not routed to: they run on Hopper only, assume
132 SMs, need ``k`` (resp. ``m`` and ``n``) to be tile multiples, and nothing about them
can be checked on a CPU machine (docs/kernels.md, "GPU: why Triton").

**Backward.** Whatever the implementation, differentiation goes through one
``custom_vjp`` per op whose backward is again grouped matmuls of the same kernels::

    gmm:   out = gmm(lhs, rhs)         d_lhs = gmm(d_out, rhs^T)    d_rhs = tgmm(lhs, d_out)
    tgmm:  out = tgmm(lhs, grad)       d_lhs = gmm(grad, d_out^T)   d_grad = gmm(lhs, d_out)

(``rhs^T``, ``d_out^T``: the last two axes swapped inside the kernel, never copied).

**Memory.** The ``gmm`` backward saves exactly ``(lhs, rhs, group_sizes)`` with ``rhs``
the array the caller passed in, so pass the weights as stored (float32 master weights
with bfloat16 activations are fine: the kernels cast weight tiles to ``lhs.dtype``,
megablox and XLA after a transient cast that is recomputed in the backward, never
saved). Under ``lax.scan`` over layers that residual is the layer's slice of the
stacked weights, which scan forwards instead of stacking. Casting or transposing the
weights *before* calling ``gmm`` would make that cast/transposed copy the residual, and
scan would stack one per layer: the ``[layers, experts, k, n]`` copy that runs MoE
training out of memory. ``tests/pallas_kernels/test_gmm.py`` checks both sides.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.moe import gpu, tpu
from pallas_kernels.moe.reference import (
    gmm_reference,
    gmm_transposed_reference,
    tgmm_reference,
)
from pallas_kernels.platform import Interpret

IMPLEMENTATIONS = ("auto", "pallas", "xla")
TRITON_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
"""Operand dtypes the Triton kernels take (Triton has no float64 dot)."""


# ---------------------------------------------------------------------------
# The kernels one call runs, and the custom VJPs over them.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kernels:
    """Static (hashable) choice of raw kernels: ``"xla"``, ``"triton"`` or ``"megablox"``."""

    name: str
    tiling: tuple[int, int, int] | None = None
    interpret: Interpret = False

    def gmm(self, lhs, rhs, group_sizes, *, transpose_rhs: bool = False) -> jax.Array:
        """``[m, k] x [g, k, n] -> [m, n]`` (``rhs: [g, n, k]`` if ``transpose_rhs``)."""
        if self.name == "xla":
            ref = gmm_transposed_reference if transpose_rhs else gmm_reference
            return ref(lhs, rhs, group_sizes)
        kernel = tpu.gmm if self.name == "megablox" else gpu.gmm
        return kernel(
            lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, tiling=self.tiling,
            interpret=self.interpret,
        )  # fmt: skip

    def tgmm(self, lhs, grad, group_sizes, *, out_dtype: jnp.dtype) -> jax.Array:
        """``[m, k] x [m, n] -> [g, k, n]``."""
        if self.name == "xla":
            return tgmm_reference(lhs, grad, group_sizes, out_dtype)
        kernel = tpu.tgmm if self.name == "megablox" else gpu.tgmm
        return kernel(
            lhs, grad, group_sizes, out_dtype=out_dtype, tiling=self.tiling,
            interpret=self.interpret,
        )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(kernels: _Kernels, lhs, rhs, group_sizes):
    return kernels.gmm(lhs, rhs, group_sizes)


def _gmm_fwd(kernels: _Kernels, lhs, rhs, group_sizes):
    # The caller's arrays, nothing derived from them (module docstring, "Memory").
    return kernels.gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(kernels: _Kernels, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs = kernels.gmm(d_out, rhs, group_sizes, transpose_rhs=True)  # [m, n] x [g, k, n]^T
    d_rhs = kernels.tgmm(lhs, d_out, group_sizes, out_dtype=rhs.dtype)  # [g, k, n]
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tgmm(kernels: _Kernels, out_dtype: jnp.dtype, lhs, grad, group_sizes):
    return kernels.tgmm(lhs, grad, group_sizes, out_dtype=out_dtype)


def _tgmm_fwd(kernels: _Kernels, out_dtype: jnp.dtype, lhs, grad, group_sizes):
    return kernels.tgmm(lhs, grad, group_sizes, out_dtype=out_dtype), (lhs, grad, group_sizes)


def _tgmm_bwd(kernels: _Kernels, out_dtype: jnp.dtype, residuals, d_out):
    lhs, grad, group_sizes = residuals
    d_lhs = kernels.gmm(grad, d_out, group_sizes, transpose_rhs=True)  # [m, n] x [g, k, n]^T
    d_grad = kernels.gmm(lhs, d_out, group_sizes)  # [m, k] x [g, k, n]
    return d_lhs, d_grad, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


# ---------------------------------------------------------------------------
# Routing.
# ---------------------------------------------------------------------------


def pallas_unsupported_reason(
    dtype: jnp.dtype, m: int, k: int, n: int, num_groups: int
) -> str | None:
    """Why this backend's Pallas kernel cannot run an ``[m, k] x [g, k, n]`` grouped matmul
    (or its ``tgmm``) with operands of ``dtype``; None when it can."""
    if 0 in (m, k, n, num_groups):
        return f"an empty operand (m, k, n, groups = {m}, {k}, {n}, {num_groups})"
    dtype = jnp.dtype(dtype)
    if platform.backend() == "tpu" and dtype not in tpu.SUPPORTED_DTYPES:
        return f"megablox takes bfloat16/float32 operands, got {dtype}"
    if platform.backend() != "tpu" and dtype not in TRITON_DTYPES:
        return f"the Triton kernels take bfloat16/float16/float32 operands, got {dtype}"
    return None


def auto_route(dtype: jnp.dtype, m: int, k: int, n: int, num_groups: int) -> str:
    """The kernels ``implementation="auto"`` runs: ``"megablox"`` on TPU, ``"triton"`` on
    GPU, ``"xla"`` on CPU or where :func:`pallas_unsupported_reason` gives a reason."""
    backend = platform.backend()
    if backend not in ("gpu", "tpu") or pallas_unsupported_reason(dtype, m, k, n, num_groups):
        return "xla"
    return "megablox" if backend == "tpu" else "triton"


def _kernels(
    implementation: str,
    dtype: jnp.dtype,
    shape: tuple[int, int, int, int],
    tiling: tuple[int, int, int] | None,
    interpret: Interpret | None,
) -> _Kernels:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    if tiling is not None and not (
        isinstance(tiling, tuple)
        and len(tiling) == 3
        and all(isinstance(t, int) and t > 0 for t in tiling)
    ):
        raise ValueError(f"tiling must be a tuple of 3 positive ints (m, k, n), got {tiling!r}.")
    if implementation == "auto":
        name = auto_route(dtype, *shape)
    elif implementation == "pallas":
        reason = pallas_unsupported_reason(dtype, *shape)
        if reason is not None:
            raise ValueError(
                f"implementation='pallas' cannot run this call: {reason}. Use 'auto' (falls "
                "back to XLA) or 'xla'."
            )
        name = "megablox" if platform.backend() == "tpu" else "triton"
    else:
        name = "xla"
    if name == "xla":
        return _Kernels("xla")
    return _Kernels(name, tiling=tiling, interpret=platform.interpret_mode(interpret))


# ---------------------------------------------------------------------------
# Public ops.
# ---------------------------------------------------------------------------


def _check_rank(name: str, x: jax.Array, rank: int, dims: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {dims}, got shape {x.shape}.")


def _check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")


def _check_group_sizes(group_sizes: jax.Array, num_groups: int | None) -> None:
    _check_rank("group_sizes", group_sizes, 1, "[groups]")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise TypeError(f"group_sizes must be an integer array, got dtype {group_sizes.dtype}.")
    if num_groups is not None and group_sizes.shape[0] != num_groups:
        raise ValueError(
            f"group_sizes has {group_sizes.shape[0]} groups but rhs has {num_groups} (rhs: "
            "[groups, k, n]); pass one size per expert, zeros for experts with no rows."
        )


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "auto",
    interpret: Interpret | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Grouped matmul: the rows of each group times that group's matrix (MoE experts).

    ``out[r] = lhs[r] @ rhs[i]`` for the rows ``r`` of group ``i``, the groups being
    consecutive runs of rows: ``[0, s_0), [s_0, s_0 + s_1), ...`` for
    ``group_sizes = [s_0, s_1, ...]``. Same values as ``jax.lax.ragged_dot``.
    Differentiable in ``lhs`` and ``rhs`` (module docstring: backward and memory).

    Args:
      lhs: ``[m, k]`` float, rows sorted by group (tokens sorted by expert).
      rhs: ``[g, k, n]`` float, one matrix per group; pass the weights as stored, any
        float dtype (they are cast to ``lhs.dtype`` inside; the gradient comes back in
        ``rhs.dtype``).
      group_sizes: ``[g]`` int, rows per group. Rows at or past ``sum(group_sizes)``
        belong to no group.
      implementation: ``"auto" | "pallas" | "xla"`` (module docstring).
      interpret: force Pallas interpret mode (True, or ``pltpu.InterpretParams()`` for
        megablox under the TPU interpreter); None = interpret on CPU only.
      tiling: ``(m, k, n)`` tile sizes of every product of the call (forward and
        backward); None = per-backend tables. Triton: powers of two >= 16; TPU:
        multiples of 128 (``k``, ``n`` tiles may equal the dimension).

    Returns:
      ``[m, n]`` in ``lhs.dtype``; rows of no group are zeros.

    Raises:
      ValueError / TypeError: bad ranks, dtypes, group count or options;
        ``"pallas"`` for a call the kernel cannot run.
    """
    _check_rank("lhs", lhs, 2, "[m, k]")
    _check_rank("rhs", rhs, 3, "[groups, k, n]")
    _check_floating("lhs", lhs)
    _check_floating("rhs", rhs)
    _check_group_sizes(group_sizes, rhs.shape[0])
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"lhs {lhs.shape} and rhs {rhs.shape} must agree on k (lhs dim 1, rhs dim 1)."
        )
    (m, k), (g, _, n) = lhs.shape, rhs.shape
    kernels = _kernels(implementation, lhs.dtype, (m, k, n, g), tiling, interpret)
    return _gmm(kernels, lhs, rhs, group_sizes.astype(jnp.int32))


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: jnp.dtype | None = None,
    implementation: str = "auto",
    interpret: Interpret | None = None,
    tiling: tuple[int, int, int] | None = None,
) -> jax.Array:
    """Transposed grouped matmul, per group ``lhs[rows]^T @ grad[rows]``: the expert
    weight gradient of :func:`gmm`.

    Args:
      lhs: ``[m, k]``; grad: ``[m, n]``, one float dtype, rows sorted by group.
      group_sizes: ``[g]`` int, rows per group (rows past their sum are ignored).
      preferred_element_type: output dtype; None = ``lhs.dtype``. Accumulates in float32.
      implementation, interpret, tiling: as in :func:`gmm`.

    Returns:
      ``[g, k, n]``; empty groups are zeros. Differentiable in ``lhs`` and ``grad``.

    Raises:
      ValueError / TypeError: bad ranks, dtypes, row counts or options.
    """
    _check_rank("lhs", lhs, 2, "[m, k]")
    _check_rank("grad", grad, 2, "[m, n]")
    _check_floating("lhs", lhs)
    _check_floating("grad", grad)
    _check_group_sizes(group_sizes, None)
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"lhs {lhs.shape} and grad {grad.shape} must have the same rows (m).")
    if lhs.dtype != grad.dtype:
        raise TypeError(
            f"lhs and grad must share one dtype, got {lhs.dtype} and {grad.dtype}; cast them "
            "to the compute dtype (preferred_element_type sets the output's)."
        )
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"preferred_element_type must be a float dtype, got {out_dtype}.")
    (m, k), n, g = lhs.shape, grad.shape[1], group_sizes.shape[0]
    kernels = _kernels(implementation, lhs.dtype, (m, k, n, g), tiling, interpret)
    return _tgmm(kernels, out_dtype, lhs, grad, group_sizes.astype(jnp.int32))
