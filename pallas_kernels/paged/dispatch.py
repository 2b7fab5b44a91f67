"""The public ragged paged attention op: one API, the implementation picked per backend.

``implementation``:

* ``"reference"``: :mod:`~pallas_kernels.paged.reference`, gather everything, masked
  softmax (the oracle; memory ``T`` times the longest sequence).
* ``"xla"``: :mod:`~pallas_kernels.paged.xla`, per-row key blocks with online softmax;
  runs everywhere, the CPU path.
* ``"pallas_tpu"``: jax's own Mosaic kernel
  (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``), wrapped
  (:mod:`~pallas_kernels.paged.tpu`); no attention sinks.
* ``"pallas_gpu"``: our Triton kernel (:mod:`~pallas_kernels.paged.gpu`).
* ``"auto"``: TPU -> ``pallas_tpu``, GPU -> ``pallas_gpu``, CPU -> ``xla``; and ``xla``
  wherever the backend's kernel cannot run the call (:func:`auto_route`, which says why).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.attention.masks import MaskSpec
from pallas_kernels.paged import gpu, tpu
from pallas_kernels.paged.layout import PagedBatch, zero_padding_rows
from pallas_kernels.paged.reference import paged_attention_reference
from pallas_kernels.paged.xla import paged_attention_xla

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


def _check_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, window, sinks):
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 [tokens, q_heads, head_dim], got shape {q.shape}.")
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2:
        raise ValueError(
            "kv_pages must have rank 4 [pages, page_size, 2 * kv_heads, head_dim] (K at even, "
            f"V at odd indices of axis 2), got shape {kv_pages.shape}."
        )
    for name, x in (("q", q), ("kv_pages", kv_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")
    if q.shape[2] != kv_pages.shape[3]:
        raise ValueError(
            f"q {q.shape} and kv_pages {kv_pages.shape} must agree on head_dim (last axis)."
        )
    hq, hkv = q.shape[1], kv_pages.shape[2] // 2
    if hq % hkv:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of kv heads ({hkv} = kv_pages.shape[2] // 2)."
        )
    if page_indices.ndim != 2:
        raise ValueError(
            f"page_indices must have rank 2 [max_seqs, pages_per_seq], got {page_indices.shape}."
        )
    s = page_indices.shape[0]
    for name, x, shape in (
        ("page_indices", page_indices, page_indices.shape),
        ("kv_lens", kv_lens, (s,)),
        ("cu_q_lens", cu_q_lens, (s + 1,)),
        ("num_seqs", num_seqs, (1,)),
    ):
        if x.shape != shape or x.dtype != jnp.int32:
            raise ValueError(
                f"{name} must be int32 of shape {shape} (max_seqs = page_indices.shape[0] = "
                f"{s}), got {x.dtype}{x.shape}."
            )
    if not (isinstance(sm_scale, int | float) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite number, got {sm_scale!r}.")
    for name, value, least in (("sliding_window", window, 1), ("sinks", sinks, 0)):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        if value is not None and not ok:
            raise ValueError(f"{name} must be an int >= {least} or None, got {value!r}.")


def _kernel_unsupported_reason(name: str, q, kv_pages, sinks: int | None) -> str | None:
    return (tpu if name == "pallas_tpu" else gpu).unsupported_reason(q, kv_pages, sinks=sinks)


def auto_route(q: jax.Array, kv_pages: jax.Array, sinks: int | None) -> tuple[str, str | None]:
    """``(implementation, why not the kernel)`` that ``implementation="auto"`` runs
    (``sinks``: None unless a window is set).

    ``"pallas_tpu"`` on TPU and ``"pallas_gpu"`` on GPU where that kernel can run the call;
    otherwise ``"xla"``, with the reason (None on CPU, where ``xla`` is the plan).
    """
    backend = platform.backend()
    if backend not in ("gpu", "tpu"):
        return "xla", None
    name = f"pallas_{backend}"
    reason = _kernel_unsupported_reason(name, q, kv_pages, sinks)
    return ("xla", f"{name}: {reason}") if reason else (name, None)


def ragged_paged_attention(
    q: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    sinks: int | None = None,
    implementation: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """Attention of a packed batch of new tokens (prefill chunks and decodes mixed) to a
    paged KV cache.

    Query ``j`` of sequence ``i`` sits at position ``kv_lens[i] - q_len_i + j`` (its new
    tokens are the last of its keys, already written with :func:`write_kv_pages`) and
    sees keys at positions ``<=`` its own; with ``sliding_window=w`` only those ``> p - w``,
    plus with ``sinks=k`` always keys ``0 .. k-1`` (StreamingLLM; no effect without a
    window). GQA: query head ``n`` reads kv head ``n // (hq // hkv)``.

    Args:
      q: ``[T, hq, d]`` the new tokens, sequence after sequence.
      kv_pages: ``[P, page_size, 2 * hkv, d]`` one layer's cache; K of kv head ``h`` at
        index ``2h`` of axis 2, V at ``2h + 1`` (the layout of jax's TPU kernel).
      kv_lens: ``i32[S]`` each sequence's KV length including its new tokens, at least
        its new-token count and at most ``pages_per_seq * page_size``.
      page_indices: ``i32[S, pages_per_seq]`` each sequence's pages in order; entries
        past a sequence's last page are never used (any value).
      cu_q_lens: ``i32[S + 1]`` sequence ``i``'s queries are ``q[cu[i]:cu[i + 1]]``
        (``cu[0] = 0``, non-decreasing up to ``num_seqs``).
      num_seqs: ``i32[1]`` sequences in use; rows from ``cu_q_lens[num_seqs]`` on are
        padding and come back as zeros. Entries past ``num_seqs`` are ignored.
      sm_scale: logit scale (usually ``1 / sqrt(d)``).
      sliding_window, sinks: see above.
      implementation: ``"auto" | "reference" | "xla" | "pallas_tpu" | "pallas_gpu"``
        (module docstring).
      interpret: run the chosen Pallas kernel in interpret mode (CPU testing; the TPU
        kernel under ``pltpu.force_tpu_interpret_mode``, which jax 0.10's TPU
        interpreter cannot run: it lacks ref reshapes).

    Returns:
      ``[T, hq, d]`` in ``q.dtype``.

    Raises:
      ValueError / TypeError: bad shapes, dtypes or options, naming the fix; a
        ``pallas_*`` implementation asked for a call its kernel cannot run.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    _check_inputs(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, sliding_window, sinks
    )
    if sliding_window is None:
        sinks = None  # every key up to the query is visible anyway
    if implementation == "auto":
        implementation, _ = auto_route(q, kv_pages, sinks)
    elif implementation.startswith("pallas"):
        reason = _kernel_unsupported_reason(implementation, q, kv_pages, sinks)
        if reason is not None:
            raise ValueError(
                f"implementation={implementation!r} cannot run this call: {reason}. Use "
                "'auto' (falls back to 'xla') or 'xla'."
            )
    # Slots past a sequence's pages may hold anything; keep every gather in bounds.
    page_indices = jnp.clip(page_indices, 0, kv_pages.shape[0] - 1)
    batch = PagedBatch(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if implementation == "pallas_tpu":
        out = tpu.paged_attention(
            batch, sm_scale=float(sm_scale), sliding_window=sliding_window, interpret=interpret
        )
        return zero_padding_rows(out, cu_q_lens, num_seqs)
    mask = MaskSpec(
        causal=True,
        sliding_window=sliding_window,
        num_sink_tokens=sinks or 0,
    )
    if implementation == "pallas_gpu":
        out = gpu.paged_attention(batch, sm_scale=float(sm_scale), mask=mask, interpret=interpret)
        return zero_padding_rows(out, cu_q_lens, num_seqs)
    impl = paged_attention_reference if implementation == "reference" else paged_attention_xla
    return impl(batch, sm_scale=float(sm_scale), mask=mask)
