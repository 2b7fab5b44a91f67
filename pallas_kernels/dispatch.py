"""Public attention ops: one API, the implementation picked per backend.

``implementation``:

* ``"xla"``: plain ``jax.numpy`` attention computed one query block at a time, skipping
  key blocks the mask hides (:mod:`pallas_kernels.xla_attention`, built on the reference's
  core); runs under jit, grad and sharding on every backend.
* ``"pallas"``: our fused kernels: Triton on GPU (:mod:`flash_gpu`,
  :mod:`decode_gpu`), Mosaic on TPU (:mod:`flash_tpu`, :mod:`decode_tpu`). On CPU
  the GPU kernels run in Pallas interpret mode (slow, for tests).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only,
  and only for masks cuDNN expresses exactly (see :func:`cudnn_unsupported_reason`).
* ``"auto"``: TPU -> pallas; GPU -> cudnn where it expresses the call, else pallas;
  CPU -> xla.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import decode_gpu, decode_tpu, flash_gpu, flash_tpu
from pallas_kernels.masks import MaskSpec
from pallas_kernels.reference import decode_attention_reference
from pallas_kernels.validation import check_attention_inputs, check_decode_inputs
from pallas_kernels.xla_attention import blocked_attention

IMPLEMENTATIONS = ("auto", "pallas", "cudnn", "xla")
XLA_BLOCK_Q = 128
"""Query block of the ``"xla"`` implementation (``block_q`` overrides it)."""


def _check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )


def cudnn_unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    sliding_window: int | None,
    num_sink_tokens: int,
    logit_soft_cap: float | None,
) -> str | None:
    """Why ``jax.nn.dot_product_attention(implementation="cudnn")`` cannot run this call.

    Returns None when cuDNN expresses the call exactly. A window is only ever
    routed to cuDNN together with ``is_causal=True``: without it, this jax
    version silently lets a windowed cuDNN call attend to future tokens.
    """
    if jax.default_backend() != "gpu":
        return f"cuDNN attention needs a GPU backend, this is {jax.default_backend()!r}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16/float16 inputs, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"cuDNN needs head_dim a multiple of 8 and <= 128, got {q.shape[-1]}"
    if q_segment_ids is not None:
        return "cuDNN (via jax.nn) has no segment ids"
    if logit_soft_cap is not None:
        return "cuDNN (via jax.nn) has no logit soft-capping"
    if sliding_window is not None and not causal:
        return "cuDNN windows are only exact together with causal=True"
    if sliding_window is not None and num_sink_tokens:
        return "cuDNN has no attention-sink tokens"
    if causal and q.shape[1] != k.shape[1]:
        return "cuDNN's causal mask is top-left aligned; ours aligns the ends when sq != skv"
    return None


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else interpret


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Fused multi-head / grouped-query attention.

    Args:
      q: ``[b, sq, hq, d]`` queries.
      k, v: ``[b, skv, hkv, d]`` keys and values with ``hq % hkv == 0`` (GQA; K/V are
        never repeated).
      causal: key ``j`` visible from query ``i`` only if ``j <= i + skv - sq`` (ends
        aligned; with ``sq == skv`` this is ``j <= i``).
      q_segment_ids: ``[b, sq]`` int; tokens attend only within equal ids (packing).
      kv_segment_ids: ``[b, skv]`` int; defaults to ``q_segment_ids``.
      sliding_window: key ``j`` visible from query position ``p`` only if ``p - j < window``.
      num_sink_tokens: keys ``j < num_sink_tokens`` stay visible despite the window
        (no effect without a window).
      logit_soft_cap: ``logits -> cap * tanh(logits / cap)``, applied after ``scale``.
      scale: logit scale, default ``1 / sqrt(d)``.
      implementation: ``"auto" | "pallas" | "cudnn" | "xla"`` (module docstring).
      interpret: force Pallas interpret mode; None = interpret on CPU only.
      block_q, block_kv: Pallas tile sizes; None = per-backend defaults.

    Returns:
      ``[b, sq, hq, d]`` in ``q.dtype``. Rows that see no key are zeros.

    Raises:
      ValueError / TypeError: bad shapes, dtypes or options; ``"cudnn"`` requested for a
        call cuDNN cannot express.
    """
    _check_implementation(implementation)
    check_attention_inputs(
        q, k, v, q_segment_ids, kv_segment_ids, sliding_window, num_sink_tokens,
        logit_soft_cap, scale,
    )  # fmt: skip
    backend = jax.default_backend()
    reason = cudnn_unsupported_reason(
        q,
        k,
        causal=causal,
        q_segment_ids=q_segment_ids,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens,
        logit_soft_cap=logit_soft_cap,
    )
    if implementation == "auto":
        implementation = {"tpu": "pallas", "gpu": "pallas" if reason else "cudnn"}.get(
            backend, "xla"
        )
    spec = MaskSpec.for_attention(
        q.shape[1],
        k.shape[1],
        causal=causal,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens,
    )
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    if implementation == "xla":
        return blocked_attention(
            q,
            k,
            v,
            spec,
            q_segment_ids,
            kv_segment_ids,
            scale=scale,
            logit_soft_cap=logit_soft_cap,
            block_q=block_q or XLA_BLOCK_Q,
        )
    if implementation == "cudnn":
        if reason is not None:
            raise ValueError(f"implementation='cudnn' cannot run this call: {reason}.")
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=causal,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
            implementation="cudnn",
        )
    d = q.shape[-1]
    kernel = flash_tpu.flash_attention if backend == "tpu" else flash_gpu.flash_attention
    return kernel(
        q,
        k,
        v,
        q_segment_ids,
        kv_segment_ids,
        mask=spec,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale),
        logit_soft_cap=logit_soft_cap,
        block_q=block_q,
        block_kv=block_kv,
        interpret=_interpret(interpret),
    )


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
    logit_soft_cap: float | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    interpret: bool | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Attention of one new query token per row against a KV cache (generation).

    Args:
      q: ``[b, hq, d]``; row ``i``'s query sits at position ``lengths[i] - 1``.
      k_cache, v_cache: ``[b, S, hkv, d]`` with ``hq % hkv == 0``.
      lengths: ``[b]`` int; keys ``[0, lengths[i])`` are valid. Length 0 gives zeros.
      sliding_window, num_sink_tokens, logit_soft_cap, scale: as in :func:`attention`.
      implementation: ``"auto"`` (TPU/GPU -> pallas, CPU -> xla), ``"pallas"`` or
        ``"xla"``. ``"cudnn"`` raises: cuDNN has no decode kernel with per-row lengths.
      interpret: force Pallas interpret mode; None = interpret on CPU only.
      block_kv: KV tile size of the Pallas kernel; None = per-backend default.

    Returns:
      ``[b, hq, d]`` in ``q.dtype``.
    """
    _check_implementation(implementation)
    check_decode_inputs(
        q, k_cache, v_cache, lengths, sliding_window, num_sink_tokens, logit_soft_cap, scale
    )
    backend = jax.default_backend()
    if implementation == "cudnn":
        raise ValueError(
            "implementation='cudnn' has no decode kernel (per-row lengths with the query at "
            "the end of each row); use 'pallas' or 'xla'."
        )
    if implementation == "auto":
        implementation = "pallas" if backend in ("gpu", "tpu") else "xla"
    if implementation == "xla":
        return decode_attention_reference(
            q,
            k_cache,
            v_cache,
            lengths,
            sliding_window=sliding_window,
            num_sink_tokens=num_sink_tokens,
            logit_soft_cap=logit_soft_cap,
            scale=scale,
        )
    spec = MaskSpec(
        causal=True,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens if sliding_window is not None else 0,
    )
    kernel = decode_tpu.decode_attention if backend == "tpu" else decode_gpu.decode_attention
    return kernel(
        q,
        k_cache,
        v_cache,
        lengths.astype(jnp.int32),
        mask=spec,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        logit_soft_cap=logit_soft_cap,
        block_kv=block_kv,
        interpret=_interpret(interpret),
    )
