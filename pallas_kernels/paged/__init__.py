"""Ragged paged attention for serving: one call attends a packed batch of prefill chunks
and decodes to a paged KV cache.

* :func:`ragged_paged_attention`: the op, dispatched per backend
  (:mod:`~pallas_kernels.paged.dispatch`).
* :func:`write_kv_pages`: scatter new tokens' K/V into their cache slots.

Files: ``layout.py`` (token -> sequence map, page layout, the cache write),
``reference.py`` (pure jnp oracle), ``xla.py`` (blocked online softmax, the CPU path),
``gpu.py`` (Pallas Triton kernel), ``tpu.py`` (jax's Mosaic kernel, wrapped),
``dispatch.py`` (the public op and routing).
"""

from pallas_kernels.paged.dispatch import ragged_paged_attention
from pallas_kernels.paged.layout import write_kv_pages

__all__ = ["ragged_paged_attention", "write_kv_pages"]
