"""Public attention ops: one API, the implementation picked per backend.

``implementation``:

* ``"xla"``: plain ``jax.numpy`` attention computed one query block at a time, skipping
  key blocks the mask hides (:mod:`pallas_kernels.attention.xla`, built on the reference's
  core); runs under jit, grad and sharding on every backend.
* ``"pallas"``: our fused kernels: Triton on GPU (:mod:`flash_gpu`,
  :mod:`decode_gpu`), Mosaic on TPU (:mod:`flash_tpu`, :mod:`decode_tpu`). On CPU
  the GPU kernels run in Pallas interpret mode (slow, for tests).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only,
  and only for masks cuDNN expresses exactly (see :func:`cudnn_unsupported_reason`).
* ``"auto"``: TPU -> pallas; GPU -> cudnn where it expresses the call, else pallas;
  CPU -> xla (:func:`auto_route`). On GPU, a call cuDNN expresses but for its segment ids
  picks at run time, inside one compiled program: cuDNN without segment ids when every
  row of the batch is a single segment, the Pallas kernel with them otherwise
  (:func:`by_segment_count`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import platform
from pallas_kernels.attention import decode_gpu, decode_tpu, flash_gpu, flash_tpu
from pallas_kernels.attention.masks import MaskSpec
from pallas_kernels.attention.reference import decode_attention_reference
from pallas_kernels.attention.validation import check_attention_inputs, check_decode_inputs
from pallas_kernels.attention.xla import blocked_attention

IMPLEMENTATIONS = ("auto", "pallas", "cudnn", "xla")
XLA_BLOCK_Q = 128
"""Query block of the ``"xla"`` implementation (``block_q`` overrides it)."""
CUDNN_OR_PALLAS = "cudnn-or-pallas"
""":func:`auto_route`'s answer when only segment ids keep cuDNN out: the route is picked
per batch on device by :func:`by_segment_count`."""


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
    if platform.backend() != "gpu":
        return f"cuDNN attention needs a GPU backend, this is {platform.backend()!r}"
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


def auto_route(
    q: jax.Array,
    k: jax.Array,
    *,
    causal: bool,
    q_segment_ids: jax.Array | None,
    sliding_window: int | None,
    num_sink_tokens: int,
    logit_soft_cap: float | None,
) -> str:
    """What ``implementation="auto"`` runs for this call (decided at trace time).

    ``"xla"`` on CPU, ``"pallas"`` on TPU. On GPU: ``"cudnn"`` when cuDNN expresses the
    call; :data:`CUDNN_OR_PALLAS` when only the segment ids stand in its way (training
    always passes them, though most rows of long documents hold a single one); else
    ``"pallas"``.
    """
    backend = platform.backend()
    if backend != "gpu":
        return "pallas" if backend == "tpu" else "xla"
    reason = cudnn_unsupported_reason(
        q,
        k,
        causal=causal,
        q_segment_ids=None,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens,
        logit_soft_cap=logit_soft_cap,
    )
    if reason is not None:
        return "pallas"
    return "cudnn" if q_segment_ids is None else CUDNN_OR_PALLAS


def single_segment_rows(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Scalar bool: in every row, all query and key ids equal the row's first query id.

    Then the segment ids hide nothing and attention without them is the same. A row of one
    document followed by padding under a pad id of its own (``jaxstack.data`` leaves 0 for
    padding) holds two segments, so it does not count as single.

    Args:
      q_segment_ids: ``[b, sq]`` int; kv_segment_ids: ``[b, skv]`` int.
    """
    first = q_segment_ids[:, :1]
    return jnp.all(q_segment_ids == first) & jnp.all(kv_segment_ids == first)


def by_segment_count(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    single: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    several: Callable[..., jax.Array],
) -> jax.Array:
    """``single(q, k, v)`` when every row is one segment (:func:`single_segment_rows`),
    else ``several(q, k, v, q_segment_ids, kv_segment_ids)``.

    A ``lax.cond``: both branches are compiled once into the same program and the branch
    is picked on device per batch, so batches with and without packed documents never
    recompile; gradients flow through the branch that ran. Under ``shard_map`` every
    shard decides for its own rows. Both branches must return the same shape and dtype.
    """
    return lax.cond(
        single_segment_rows(q_segment_ids, kv_segment_ids),
        lambda q, k, v, q_seg, kv_seg: single(q, k, v),
        several,
        q,
        k,
        v,
        q_segment_ids,
        kv_segment_ids,
    )


def _cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None,
    scale: float | None,
) -> jax.Array:
    """cuDNN flash attention through ``jax.nn`` (no segment ids, no cap, no sinks)."""
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation="cudnn",
    )


def _pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    spec: MaskSpec,
    scale: float | None,
    logit_soft_cap: float | None,
    block_q: int | None,
    block_kv: int | None,
    interpret: bool,
) -> jax.Array:
    """Our flash kernels: Mosaic on TPU, Triton elsewhere (interpret mode on CPU)."""
    kernel = flash_tpu.flash_attention if platform.backend() == "tpu" else flash_gpu.flash_attention
    return kernel(
        q,
        k,
        v,
        q_segment_ids,
        kv_segment_ids,
        mask=spec,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        logit_soft_cap=logit_soft_cap,
        block_q=block_q,
        block_kv=block_kv,
        interpret=interpret,
    )


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
    masks = dict(
        causal=causal,
        sliding_window=sliding_window,
        num_sink_tokens=num_sink_tokens,
        logit_soft_cap=logit_soft_cap,
    )
    if implementation == "auto":
        implementation = auto_route(q, k, q_segment_ids=q_segment_ids, **masks)
    elif implementation == "cudnn":
        reason = cudnn_unsupported_reason(q, k, q_segment_ids=q_segment_ids, **masks)
        if reason is not None:
            raise ValueError(f"implementation='cudnn' cannot run this call: {reason}.")
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
    cudnn = functools.partial(
        _cudnn_attention, causal=causal, sliding_window=sliding_window, scale=scale
    )
    if implementation == "cudnn":
        return cudnn(q, k, v)
    pallas = functools.partial(
        _pallas_attention,
        spec=spec,
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        block_q=block_q,
        block_kv=block_kv,
        interpret=platform.interpret_mode(interpret),
    )
    if implementation == CUDNN_OR_PALLAS:
        return by_segment_count(
            q, k, v, q_segment_ids, kv_segment_ids, single=cudnn, several=pallas
        )
    return pallas(q, k, v, q_segment_ids, kv_segment_ids)


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
    backend = platform.backend()
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
        interpret=platform.interpret_mode(interpret),
    )
