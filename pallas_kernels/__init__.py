"""Fused Pallas kernels with pure-jnp references and per-backend dispatch.

Public ops:

* :func:`attention`: flash attention for training and prefill (``[b, s, h, d]``).
* :func:`decode_attention`: one query token per row against a KV cache.
* :func:`attention_reference`, :func:`decode_attention_reference`: the oracles.
  These four live in the package ``pallas_kernels/attention/``; the attribute
  ``pallas_kernels.attention`` is the op, so import that package's modules with
  ``from pallas_kernels.attention import flash_gpu``.
* :func:`gmm`, :func:`tgmm`: MoE grouped matmuls (:mod:`pallas_kernels.moe`), with the
  ``jax.lax.ragged_dot`` oracles :func:`gmm_reference`, :func:`tgmm_reference`.
* :func:`ragged_paged_attention`, :func:`write_kv_pages`: serving attention of mixed
  prefill/decode batches over a paged KV cache (:mod:`pallas_kernels.paged`).
* :func:`context_attention` (``ring_attention``, ``all_gather_attention``), and
  :func:`all_gather_matmul`, :func:`matmul_reduce_scatter`: per-device collective ops for a
  sequence split over a mesh axis and overlapped tensor parallelism
  (:mod:`pallas_kernels.collectives`; the Pallas TPU kernels in its ``tpu`` module).
* :func:`backend`: the backend every op picks its kernels for (:mod:`pallas_kernels.platform`).
"""

from pallas_kernels.attention import (
    attention,
    attention_reference,
    decode_attention,
    decode_attention_reference,
)
from pallas_kernels.collectives import (
    all_gather_attention,
    all_gather_matmul,
    context_attention,
    matmul_reduce_scatter,
    ring_attention,
)
from pallas_kernels.moe import gmm, gmm_reference, tgmm, tgmm_reference
from pallas_kernels.paged import ragged_paged_attention, write_kv_pages
from pallas_kernels.platform import backend

__all__ = [
    "all_gather_attention",
    "all_gather_matmul",
    "attention",
    "attention_reference",
    "backend",
    "context_attention",
    "decode_attention",
    "decode_attention_reference",
    "gmm",
    "gmm_reference",
    "matmul_reduce_scatter",
    "ragged_paged_attention",
    "ring_attention",
    "tgmm",
    "tgmm_reference",
    "write_kv_pages",
]
