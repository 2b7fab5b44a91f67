"""Grouped matmuls for mixture-of-experts layers.

* :func:`gmm`: rows grouped by expert times per-expert weights, ``[m, k] x [g, k, n] ->
  [m, n]``; :func:`tgmm`: the transposed product (the weight gradient), ``[m, k] x
  [m, n] -> [g, k, n]``. Both differentiable, dispatched per backend
  (:mod:`~pallas_kernels.moe.dispatch`).
* :func:`gmm_reference`, :func:`tgmm_reference`: the ``jax.lax.ragged_dot`` oracles.

Files: ``reference.py`` (XLA), ``gpu.py`` (Pallas Triton), ``tpu.py`` (megablox, Pallas
Mosaic), ``dispatch.py`` (public ops, routing, the custom VJPs).
"""

from pallas_kernels.moe.dispatch import gmm, tgmm
from pallas_kernels.moe.reference import gmm_reference, tgmm_reference

__all__ = ["gmm", "gmm_reference", "tgmm", "tgmm_reference"]
