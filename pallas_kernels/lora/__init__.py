"""Batched gathered LoRA matmul for serving many adapters in one batch (Punica BGMV / S-LoRA).

* :func:`lora_bgmv` ``(x [t, d_in], A [n, d_in, r], B [n, r, d_out], adapter_idx [t],
  scale [n]) -> [t, d_out]``: each token through its own adapter (-1: none), dispatched per
  backend (:mod:`~pallas_kernels.lora.dispatch`).
* :func:`lora_bgmv_reference`: the per-token gather oracle; :func:`stack_adapters` pads
  adapters of unequal rank to a rank bucket.

Files: ``reference.py``, ``xla.py`` (two dense matmuls, CPU/TPU), ``gpu.py`` (Pallas Triton),
``dispatch.py``.
"""

from pallas_kernels.lora.dispatch import lora_bgmv
from pallas_kernels.lora.reference import (
    RANK_BUCKETS,
    lora_bgmv_reference,
    rank_bucket,
    stack_adapters,
)

__all__ = ["RANK_BUCKETS", "lora_bgmv", "lora_bgmv_reference", "rank_bucket", "stack_adapters"]
