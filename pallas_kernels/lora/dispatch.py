"""The public batched LoRA matmul: validation, then the kernel for the backend.

``implementation``: ``"xla"`` (:mod:`pallas_kernels.lora.xla`, every backend), ``"pallas"``
(the Triton kernel, :mod:`pallas_kernels.lora.gpu`; in interpret mode on CPU, for tests),
``"auto"``: Triton on GPU, XLA elsewhere (there is no Mosaic TPU kernel yet: on TPU the XLA
form's two dense matmuls run on the MXU).
"""

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.lora import gpu
from pallas_kernels.lora.xla import lora_bgmv_xla
from pallas_kernels.platform import Interpret

IMPLEMENTATIONS = ("auto", "pallas", "xla")


def lora_bgmv(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    adapter_idx: jax.Array,
    scale: jax.Array,
    *,
    implementation: str = "auto",
    interpret: Interpret | None = None,
) -> jax.Array:
    """``out[t] = scale[i] * (x[t] @ A[i]) @ B[i]`` with ``i = adapter_idx[t]`` (0 where -1).

    Args:
      x: ``[t, d_in]`` activations.
      a: ``[n, d_in, r]`` stacked adapters' A (ranks zero-padded to ``r``: ``stack_adapters``).
      b: ``[n, r, d_out]`` their B.
      adapter_idx: ``[t]`` int, each token's adapter in ``[0, n)`` or -1 for none.
      scale: ``[n]`` each adapter's ``alpha / rank``.
      implementation: ``auto``, ``pallas`` or ``xla`` (module doc).
      interpret: Pallas interpret mode; None: on CPU only.

    Returns:
      ``[t, d_out]`` in ``x.dtype``. Not differentiable through the Pallas kernel (serving).

    Raises:
      ValueError: shapes that do not chain, or an unknown implementation.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; choose one of {IMPLEMENTATIONS}")
    _check(x, a, b, adapter_idx, scale)
    use_pallas = implementation == "pallas" or (
        implementation == "auto" and platform.backend() == "gpu"
    )
    if not use_pallas:
        return lora_bgmv_xla(x, a, b, adapter_idx, scale)
    return gpu.lora_bgmv(
        x, a, b, adapter_idx, scale, interpret=bool(platform.interpret_mode(interpret))
    )


def _check(x, a, b, adapter_idx, scale) -> None:
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3:
        raise ValueError(
            f"lora_bgmv takes x [t, d_in], A [n, d_in, r], B [n, r, d_out]; got x {x.shape}, "
            f"A {a.shape}, B {b.shape}"
        )
    (t, d_in), (n, a_in, rank) = x.shape, a.shape
    if a_in != d_in or b.shape[:2] != (n, rank):
        raise ValueError(
            f"lora_bgmv: x {x.shape}, A {a.shape}, B {b.shape} do not chain (need A "
            f"[n, {d_in}, r] and B [n, r, d_out] with the same n and r)"
        )
    if adapter_idx.shape != (t,) or not jnp.issubdtype(adapter_idx.dtype, jnp.integer):
        raise ValueError(
            f"adapter_idx must be int [{t}], got {adapter_idx.dtype} {adapter_idx.shape}"
        )
    if scale.shape != (n,):
        raise ValueError(f"scale must be [{n}] (one per adapter), got {scale.shape}")
