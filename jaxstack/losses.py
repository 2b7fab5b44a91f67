"""Cross-entropy over the LM head without ever holding the [tokens, vocab] logits.

``fused_cross_entropy(hidden, head_kernel, targets, mask)`` computes the head matmul and the
softmax cross-entropy together, a chunk of sequence positions at a time (the idea of
MaxText's vocabulary tiling and of tokamax's linear-softmax-cross-entropy): only one chunk's
float32 logits exist at once, in the forward pass and in the backward pass, which recomputes
them (a ``jax.custom_vjp``) instead of storing them.

Shapes, the einsum way: ``hidden: [b, s, d]`` (or ``[t, d]``, one row of ``t`` positions),
``head_kernel: [d, v]``, ``targets``, ``mask``: ``[b, s]``. Each row's positions are padded to
``n x c`` (``n = ceil(s / chunk_size)`` chunks of ``c = ceil(s / n) <= chunk_size``) and
split *strided*: chunk ``j`` holds positions ``j, j + n, j + 2n, ...`` of every row, so a
``[n, b, c, d]`` scan keeps the batch (and a sequence-sharded ``s``) where they were and every
device works on its own tokens at each step.

Per chunk, in float32 over a ``bfloat16`` or ``float32`` hidden (the matmul runs in the
hidden's dtype and accumulates in float32)::

    z    = h @ w                                 [b, c, v]
    z    = cap * tanh(z / cap)                   optional logit soft cap
    lse  = logsumexp(z, -1)                      [b, c]
    loss = lse - z[target] + z_loss * lse**2     per token
    dz   = g * (softmax(z) * (1 + 2 z_loss lse) - onehot(target))    backward, recomputed
    dh   = dz @ w.T;   dw += h.T @ dz            dw accumulates in float32

The function is plain ``jax.numpy`` inside: under ``jit`` on a mesh with the head sharded
``P(None, "tensor")`` (vocab-parallel), GSPMD turns every reduction over ``v`` (max, sum,
target pick) into a local reduction plus an all-reduce of ``[b, c]`` values, and
``sharding_rules`` reads the same reductions when it decides that the head is vocab-parallel.
On a mesh the backward keeps one float32 partial ``dw`` per batch shard (``data x fsdp``)
and sums them after the last chunk: the head gradient crosses the batch axes once per step,
not once per chunk.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sharding_rules import LOGICAL_AXIS_RULES, uses_our_axes

DEFAULT_CHUNK_SIZE = 512
"""Sequence positions per chunk and row: one chunk's logits are ``b x 512 x v`` float32."""


class CrossEntropyOutput(NamedTuple):
    """What ``fused_cross_entropy`` returns; every field is float32."""

    loss_sum: jax.Array
    """``[]``: the summed per-token loss over unmasked tokens (divide by ``num_tokens``)."""
    num_tokens: jax.Array
    """``[]``: the number of unmasked target tokens (the sum of ``mask``)."""
    num_correct: jax.Array
    """``[]``: unmasked tokens whose target is a top prediction (ties count)."""
    token_loss: jax.Array
    """``[...]``, shaped like ``targets``: each token's loss times its mask."""
    token_correct: jax.Array
    """``[...]``, shaped like ``targets``: 1 where the target is a top prediction, times mask."""


def chunk_layout(seq_len: int, chunk_size: int) -> tuple[int, int]:
    """``(num_chunks, positions_per_chunk)`` for rows of ``seq_len`` positions.

    The fewest chunks of at most ``chunk_size`` positions, evened out so that padding is
    below one position per chunk: ``seq_len=512, chunk_size=200 -> (3, 171)``.

    Raises:
      ValueError: ``chunk_size`` or ``seq_len`` is below 1.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size!r}; pass a positive int (positions per chunk, e.g. "
            f"{DEFAULT_CHUNK_SIZE})"
        )
    if seq_len < 1:
        raise ValueError(f"cannot chunk rows of {seq_len} positions; pass a non-empty batch")
    num_chunks = -(-seq_len // chunk_size)
    return num_chunks, -(-seq_len // num_chunks)


def fused_cross_entropy(
    hidden: jax.Array,
    head_kernel: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_soft_cap: float | None = None,
    z_loss: float = 0.0,
) -> CrossEntropyOutput:
    """Softmax cross-entropy of ``hidden @ head_kernel`` against ``targets``, chunked.

    Args:
      hidden: ``[b, s, d]`` (or ``[t, d]``; any leading dims) final hidden states, float32 or
        bfloat16; the head matmul runs in this dtype with float32 accumulation.
      head_kernel: ``[d, v]``: the LM head (for tied embeddings, the table's transpose).
      targets: integer ids, shaped like ``hidden[..., 0]``.
      mask: shaped like ``targets``, bool or 0/1 (a float weights each token); None counts
        every token. Masked tokens may hold any target id.
      chunk_size: at most this many positions of every row per chunk; one chunk's
        ``[b, chunk, v]`` float32 logits are the largest temporary.
      logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma 2).
      z_loss: weight of ``logsumexp(logits)**2`` added to each token's loss (PaLM).

    Returns:
      A ``CrossEntropyOutput``: ``loss_sum``, ``num_tokens`` and ``num_correct`` scalars and
      the masked per-token ``token_loss`` and ``token_correct``. Gradients flow to ``hidden``
      and ``head_kernel`` through ``loss_sum`` and ``token_loss``.

    Raises:
      ValueError: mismatched shapes, a non-integer ``targets``, ``chunk_size < 1``, a
        non-positive ``logit_soft_cap`` or a negative ``z_loss``.
    """
    if hidden.ndim < 2 or head_kernel.ndim != 2 or head_kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"hidden {hidden.shape} and head_kernel {head_kernel.shape} do not fit: pass "
            "hidden [..., d] and head_kernel [d, vocab] (for tied embeddings, the table's .T)"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets {targets.shape} must be hidden's leading shape {hidden.shape[:-1]}"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask {mask.shape} must be shaped like targets {targets.shape}")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"logit_soft_cap={logit_soft_cap!r}; pass a positive float or None")
    if not z_loss >= 0:
        raise ValueError(f"z_loss={z_loss!r}; pass a weight >= 0 (0 turns it off)")
    lead, d = targets.shape, hidden.shape[-1]
    rows, seq = math.prod(lead[:-1]), lead[-1]
    n, c = chunk_layout(seq, chunk_size)
    pad = n * c - seq

    def to_chunks(x: jax.Array) -> jax.Array:  # [rows, seq, ...] -> [n, rows, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(rows, c, n, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    def from_chunks(x: jax.Array) -> jax.Array:  # [n, rows, c] -> targets' shape
        return jnp.moveaxis(x, 0, 2).reshape(rows, n * c)[:, :seq].reshape(lead)

    loss, correct = _chunked_cross_entropy(
        to_chunks(hidden.reshape(rows, seq, d)),
        head_kernel,
        to_chunks(targets.reshape(rows, seq)),
        logit_soft_cap,
        float(z_loss),
    )
    weight = jnp.ones(lead, jnp.float32) if mask is None else mask.astype(jnp.float32)
    token_loss = from_chunks(loss) * weight
    token_correct = from_chunks(correct) * weight
    return CrossEntropyOutput(
        loss_sum=token_loss.sum(),
        num_tokens=weight.sum(),
        num_correct=token_correct.sum(),
        token_loss=token_loss,
        token_correct=token_correct,
    )


# -- the chunked core: h [n, b, c, d], w [d, v], t [n, b, c] -> loss, correct [n, b, c] -----
def _logits(h: jax.Array, w: jax.Array, soft_cap: float | None) -> jax.Array:
    """One chunk's float32 logits [b, c, v]: the matmul in h's dtype, float32 accumulation."""
    z = jnp.einsum("bcd,dv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return z if soft_cap is None else soft_cap * jnp.tanh(z / soft_cap)


def _is_target(t: jax.Array, vocab: int) -> jax.Array:
    """[b, c, v] one-hot of the targets as a comparison (local on a vocab-sharded chunk)."""
    return t[..., None] == jax.lax.broadcasted_iota(t.dtype, (*t.shape, vocab), t.ndim)


def _chunk_forward(h, w, t, soft_cap, z_loss):
    z = _logits(h, w, soft_cap)
    top = z.max(-1)
    lse = top + jnp.log(jnp.exp(z - top[..., None]).sum(-1))
    target = jnp.where(_is_target(t, z.shape[-1]), z, 0.0).sum(-1)
    loss = lse - target + z_loss * lse * lse
    return loss, (target >= top).astype(jnp.float32), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_cross_entropy(h, w, t, soft_cap, z_loss):
    return _forward_scan(h, w, t, soft_cap, z_loss)[:2]


def _forward_scan(h, w, t, soft_cap, z_loss):
    def step(_, chunk):
        h_c, t_c = chunk
        return None, _chunk_forward(h_c, w, t_c, soft_cap, z_loss)

    return jax.lax.scan(step, None, (h, t))[1]


def _fwd(h, w, t, soft_cap, z_loss):
    loss, correct, lse = _forward_scan(h, w, t, soft_cap, z_loss)
    return (loss, correct), (h, w, t, lse)


def _bwd(soft_cap, z_loss, residuals, cotangents):
    h, w, t, lse = residuals
    g = cotangents[0]  # the accuracy is a step function: its cotangent contributes nothing
    shards, spec = _batch_partials(h.shape[1])

    def step(dw, chunk):
        h_c, t_c, lse_c, g_c = chunk
        z = _logits(h_c, w, soft_cap)
        p = jnp.exp(z - lse_c[..., None]) * (1.0 + 2.0 * z_loss * lse_c)[..., None]
        dz = (p - _is_target(t_c, z.shape[-1])) * g_c[..., None]
        if soft_cap is not None:  # d(cap tanh(x / cap))/dx = 1 - tanh^2
            dz = dz * (1.0 - jnp.square(z / soft_cap))
        dz = dz.astype(h.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dz, w.astype(h.dtype), preferred_element_type=jnp.float32)
        # one partial head gradient per batch shard, summed once after the loop
        split = lambda x: x.reshape(shards, -1, *x.shape[1:])  # noqa: E731
        part = jnp.einsum(
            "kbcd,kbcv->kdv", split(h_c), split(dz), preferred_element_type=jnp.float32
        )
        return _constrain(dw + part, spec), dh.astype(h.dtype)

    zeros = _constrain(jnp.zeros((shards, *w.shape), jnp.float32), spec)
    dw, dh = jax.lax.scan(step, zeros, (h, t, lse, g))
    return dh, dw.sum(0).astype(w.dtype), None


def _batch_partials(rows: int) -> tuple[int, PartitionSpec | None]:
    """How many batch shards the current mesh splits ``rows`` over, and the spec that keeps
    one partial head gradient ``[shards, d, v]`` on each: summing every chunk's gradient over
    the batch inside the loop would all-reduce the whole head once per chunk."""
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh):
        return 1, None
    sizes = dict(mesh.shape)
    axes = tuple(a for a in LOGICAL_AXIS_RULES["batch"] if sizes.get(a, 1) > 1)
    shards = math.prod(sizes[a] for a in axes)
    if shards == 1 or rows % shards:
        return 1, None
    return shards, PartitionSpec(axes, PartitionSpec.UNCONSTRAINED, PartitionSpec.UNCONSTRAINED)


def _constrain(x: jax.Array, spec: PartitionSpec | None) -> jax.Array:
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


_chunked_cross_entropy.defvjp(_fwd, _bwd)
