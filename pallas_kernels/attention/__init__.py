"""Attention for training, prefill and decode: one public op each, the kernel picked per backend.

* :func:`attention`: flash attention for training and prefill (``[b, s, h, d]``).
* :func:`decode_attention`: one query token per row against a KV cache.
* :func:`attention_reference`, :func:`decode_attention_reference`: the pure ``jax.numpy``
  oracles.

Modules: :mod:`~pallas_kernels.attention.dispatch` (the public ops, routing),
:mod:`~pallas_kernels.attention.reference`, :mod:`~pallas_kernels.attention.xla` (the
``"xla"`` route), the Pallas kernels (``flash_gpu``, ``flash_tpu``, ``decode_gpu``,
``decode_tpu``) and what they share: :mod:`~pallas_kernels.attention.masks` (also used by
the paged and context-parallel kernels), ``blocks`` and ``validation``.

``pallas_kernels.attention`` (the attribute) is the op; import this package's modules
with ``from pallas_kernels.attention import flash_gpu``, not
``import pallas_kernels.attention.flash_gpu as ...``.
"""

from pallas_kernels.attention.dispatch import attention, decode_attention
from pallas_kernels.attention.reference import attention_reference, decode_attention_reference

__all__ = ["attention", "attention_reference", "decode_attention", "decode_attention_reference"]
